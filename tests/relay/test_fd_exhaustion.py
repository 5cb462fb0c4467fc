"""A relay process out of file descriptors: /metrics still answers, the failures are counted and
the connections it cannot take are refused rather than left in the backlog."""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

from protocol.identity import SigningIdentity
from relay.admission import SpareDescriptor, shed_backlog

from .harness import running_relay, trio_test, wait_until

STARTUP_TIMEOUT_SECONDS = 15
STARTED = re.compile(r"relay_started .* tcp=(\S+):(\d+) udp=off metrics=(\S+):(\d+)")
RELAY_BINARY = Path(sys.executable).with_name("tucdesk-relay")
OPEN_FILE_LIMIT = 48
FLOOD_CONNECTIONS = 80


def start_relay(tmp_path: Path) -> tuple[subprocess.Popen, tuple[str, int], tuple[str, int]]:
    key_file = tmp_path / "relay-token.pub"
    key_file.write_bytes(SigningIdentity.generate().public.to_pem())
    process = subprocess.Popen(
        [str(RELAY_BINARY), "serve", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
         "--relay-id", "relay-test", "--token-key", str(key_file), "--hello-timeout", "30",
         "--max-pending-per-source", "1000", "--rate-limit", "1000", "--rate-burst", "1000"],
        stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    lines = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        lines.append(line)
        match = STARTED.search(line)
        if match:
            return process, (match[1], int(match[2])), (match[3], int(match[4]))
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError("relay did not start: " + "".join(lines))


def scrape(address: tuple[str, int], timeout: float = 5.0) -> str:
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        body = bytearray()
        while data := sock.recv(65536):
            body += data
    return body.decode()


def metric_value(exposition: str, sample: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} not exported")


def test_metrics_answer_and_the_backlog_is_refused_when_descriptors_run_out(tmp_path):
    process, relay, metrics = start_relay(tmp_path)
    flood: list[socket.socket] = []
    try:
        # Lowered after start-up, so the relay cannot raise it again (it runs as root here).
        resource.prlimit(process.pid, resource.RLIMIT_NOFILE, (OPEN_FILE_LIMIT, OPEN_FILE_LIMIT))
        for _ in range(FLOOD_CONNECTIONS):  # half-open: connected, no hello
            flood.append(socket.create_connection(relay, timeout=5))
        deadline = time.monotonic() + 10
        while len(os.listdir(f"/proc/{process.pid}/fd")) < OPEN_FILE_LIMIT - 2:
            assert time.monotonic() < deadline, "the flood did not use up the relay's descriptors"
            time.sleep(0.05)
        exposition = scrape(metrics)
        assert exposition.startswith("HTTP/1.1 200 OK")
        failures = metric_value(
            exposition,
            'tucdesk_relay_accept_failures_total{listener="relay",reason="too_many_open_files"}',
        )
        assert failures >= 1
        # Those the relay could not take were told so, not left hanging in the backlog.
        refused = 0
        for sock in flood:
            sock.settimeout(0.01)
            try:
                refused += sock.recv(64) == b"too_many_connections\n"
            except OSError:
                pass
        assert refused >= 1
        assert metric_value(exposition, "tucdesk_relay_connections_accepted_total") >= refused
        # A second scrape works too: the spare descriptor was taken back.
        assert scrape(metrics).startswith("HTTP/1.1 200 OK")
    finally:
        for sock in flood:
            sock.close()
        process.kill()
        process.wait()


def test_a_lost_spare_descriptor_is_taken_back_before_shedding():
    # A reopen that failed (another thread took the freed slot) left the spare unheld; the
    # next shed takes it back instead of leaving the backlog to hang for good.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        spare = SpareDescriptor()
        spare.close()  # as after a failed reopen
        assert not spare.held
        with socket.create_connection(listener.getsockname()) as waiting:
            assert shed_backlog(spare, listener, 4) == 1
            assert waiting.recv(64) == b"too_many_connections\n"
        assert spare.held
        spare.close()


@trio_test
async def test_the_relay_sweep_takes_a_lost_spare_descriptor_back():
    async with running_relay(SigningIdentity.generate()) as relay:
        spare = relay.tcp.admission.spare
        spare.close()  # as after a failed reopen
        await wait_until(lambda: spare.held)
