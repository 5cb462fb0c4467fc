"""`tucdesk-relay serve` as a process: start, pair two clients, scrape metrics, SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import trio

from protocol.identity import SigningIdentity
from protocol.relay_token import Side
from relay.client import connect_tcp

from .harness import make_token, trio_test

STARTUP_TIMEOUT_SECONDS = 15
STARTED = re.compile(r"relay_started .* tcp=(\S+):(\d+) udp=(\S+):(\d+) metrics=(\S+):(\d+)")
RELAY_BINARY = Path(sys.executable).with_name("tucdesk-relay")


def start_relay(tmp_path: Path, signer: SigningIdentity) -> tuple[subprocess.Popen, dict]:
    key_file = tmp_path / "relay-token.pub"
    key_file.write_bytes(signer.public.to_pem())
    process = subprocess.Popen(
        [str(RELAY_BINARY), "serve", "--listen", "127.0.0.1:0", "--udp", "127.0.0.1:0",
         "--metrics", "127.0.0.1:0", "--relay-id", "relay-test", "--token-key", str(key_file),
         "--grace", "2", "--max-sessions", "100"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "TUCDESK_RELAY_LOG_LEVEL": "info"},
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    lines = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        lines.append(line)
        match = STARTED.search(line)
        if match:
            return process, {
                "tcp": (match[1], int(match[2])),
                "metrics": (match[5], int(match[6])),
            }
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError("relay did not start: " + "".join(lines))


async def scrape(address: tuple[str, int]) -> str:
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    body = bytearray()
    while data := await stream.receive_some(65536):
        body += data
    return body.decode()


def test_relay_process_pairs_two_clients_and_stops_gracefully(tmp_path):
    signer = SigningIdentity.generate()
    process, addresses = start_relay(tmp_path, signer)
    try:
        run_clients(signer, addresses)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        log = process.stderr.read()
        assert "session_closed transport=tcp sid='p-1'" in log
        assert "bytes_from_operator=5 bytes_from_agent=3" in log
        assert "relay_stopped" in log
        assert "mark!" not in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@trio_test
async def run_clients(signer: SigningIdentity, addresses: dict) -> None:
    streams = {}

    async def join(side: Side) -> None:
        streams[side] = await connect_tcp(*addresses["tcp"], make_token(signer, "p-1", side))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(join, Side.OPERATOR)
        nursery.start_soon(join, Side.AGENT)
    await streams[Side.OPERATOR].send_all(b"mark!")
    assert await streams[Side.AGENT].receive_some(10) == b"mark!"
    await streams[Side.AGENT].send_all(b"hey")
    assert await streams[Side.OPERATOR].receive_some(10) == b"hey"
    metrics = await scrape(addresses["metrics"])
    assert 'tucdesk_relay_sessions_active{transport="tcp"} 1.0' in metrics
    assert 'tucdesk_relay_refusals_total{reason="token_reused",transport="tcp"} 0.0' in metrics
    for stream in streams.values():
        await stream.aclose()
    with trio.fail_after(5):
        # Bounded poll: the process's state is only visible through its metrics.
        while 'tucdesk_relay_sessions_active{transport="tcp"} 0.0' not in await scrape(  # noqa: ASYNC110
            addresses["metrics"]
        ):
            await trio.sleep(0.05)
