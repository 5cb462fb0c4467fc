"""`tucdesk-relay serve` as a process: start, pair two clients, scrape metrics, SIGTERM."""

from __future__ import annotations

import importlib.metadata
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
from relay.errors import RelayError, RelayRefusedError
from relay.wire import Reason

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


def test_sighup_reloads_the_token_keys_and_keeps_live_sessions(tmp_path):
    signer, rotated = SigningIdentity.generate(), SigningIdentity.generate()
    process, addresses = start_relay(tmp_path, signer)
    try:
        rotate_keys_under_a_live_session(process, tmp_path / "relay-token.pub", signer, rotated,
                                         addresses)
        assert process.poll() is None, f"relay died on SIGHUP (rc {process.returncode})"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        log = process.stderr.read()
        assert "signal=SIGHUP reload" in log
        assert f"reload token_keys={rotated.public.fingerprint} changed=yes" in log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@trio_test
async def rotate_keys_under_a_live_session(
    process: subprocess.Popen, key_file: Path, signer: SigningIdentity,
    rotated: SigningIdentity, addresses: dict,
) -> None:
    streams = {}

    async def join(key: SigningIdentity, session_id: str, side: Side) -> None:
        streams[side] = await connect_tcp(*addresses["tcp"], make_token(key, session_id, side))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(join, signer, "h-1", Side.OPERATOR)
        nursery.start_soon(join, signer, "h-1", Side.AGENT)
    await trio.Path(key_file).write_bytes(rotated.public.to_pem())
    process.send_signal(signal.SIGHUP)
    # The live session is untouched; once the reload is done, the rotated key is trusted.
    await streams[Side.OPERATOR].send_all(b"after-hup")
    assert await streams[Side.AGENT].receive_some(100) == b"after-hup"
    attempt = 0
    with trio.fail_after(5):
        while True:
            attempt += 1
            try:
                await connect_tcp(
                    *addresses["tcp"], make_token(rotated, f"h-new-{attempt}", Side.AGENT),
                    pair_timeout=0.05,
                )
            except RelayRefusedError as refused:
                assert refused.reason == Reason.TOKEN_INVALID
                await trio.sleep(0.05)
            except RelayError:  # waiting, then timed out: the rotated key was accepted
                break
    await streams[Side.AGENT].send_all(b"still")
    assert await streams[Side.OPERATOR].receive_some(100) == b"still"
    for stream in streams.values():
        await stream.aclose()


def test_systemd_unit_reloads_with_sighup():
    unit = Path(__file__).resolve().parents[2] / "deploy" / "relay" / "tucdesk-relay.service"
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit.read_text().splitlines()


def test_version_flag_prints_the_installed_version():
    result = subprocess.run([str(RELAY_BINARY), "--version"], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == f"tucdesk-relay {importlib.metadata.version('tucdesk')}"


def test_a_private_token_key_file_stops_the_relay_with_a_clear_message(tmp_path):
    private_key = tmp_path / "relay-token.key"
    SigningIdentity.generate().save(private_key)
    result = subprocess.run(
        [str(RELAY_BINARY), "serve", "--listen", "127.0.0.1:0", "--relay-id", "relay-test",
         "--token-key", str(private_key)],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"tucdesk-relay: --token-key {private_key} holds a private key; give the relay only the "
        "public key: tucdesk-rendezvous keys show --pem relay-token"
    )


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
