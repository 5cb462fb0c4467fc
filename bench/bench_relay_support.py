"""Shared pieces of the relay benchmarks: a relay in its own process, socat, blocking clients."""

from __future__ import annotations

import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from protocol.identity import SigningIdentity
from protocol.relay_token import Side, issue_relay_token
from relay.datagram import STATUS, encode_udp_hello, parse_status_datagram
from relay.wire import encode_hello, parse_status

RELAY_ID = "bench-relay"
STARTED = re.compile(r"relay_started .* tcp=(\S+):(\d+) udp=(\S+):(\d+)")
RELAY_BINARY = Path(sys.executable).with_name("tucdesk-relay")


def raise_fd_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port the kernel just handed out (for socat, which needs a number)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def relay_process(signer: SigningIdentity, *extra: str):
    """Run `tucdesk-relay serve` on loopback in its own process; yield (tcp, udp, pid)."""
    with tempfile.TemporaryDirectory() as directory:
        key_file = Path(directory) / "relay-token.pub"
        key_file.write_bytes(signer.public.to_pem())
        log_path = Path(directory) / "relay.log"
        with log_path.open("w") as log_file:
            process = subprocess.Popen(
                [str(RELAY_BINARY), "serve", "--listen", "127.0.0.1:0", "--udp", "127.0.0.1:0",
                 "--relay-id", RELAY_ID, "--token-key", str(key_file), "--rate-limit",
                 "1000000", "--rate-burst", "1000000", "--grace", "0", *extra],
                stdout=subprocess.DEVNULL, stderr=log_file,
            )
        try:
            deadline = time.monotonic() + 20
            match = None
            while match is None:
                match = STARTED.search(log_path.read_text())
                if process.poll() is not None:
                    raise RuntimeError("relay exited: " + log_path.read_text())
                if time.monotonic() > deadline:
                    raise RuntimeError("relay did not start: " + log_path.read_text())
                time.sleep(0.05)
            yield (match[1], int(match[2])), (match[3], int(match[4])), process.pid
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def socat_process(*arguments: str):
    """Run socat with the given addresses (default options) until the block ends."""
    process = subprocess.Popen(["socat", *arguments])
    try:
        time.sleep(0.3)  # socat prints nothing when ready; give it a moment to bind
        yield process
    finally:
        process.terminate()
        process.wait(timeout=10)


def token(signer: SigningIdentity, session_id: str, side: Side) -> str:
    """A relay token for the benchmark relay."""
    return issue_relay_token(
        signer, session_id=session_id, side=side, relay_id=RELAY_ID, now=time.time(),
        lifetime=300,
    )


def send_hello(sock: socket.socket, relay_token: str) -> None:
    """Send the TCP hello (blocking)."""
    sock.sendall(encode_hello(relay_token))


def read_status(sock: socket.socket) -> str:
    """Read one status line (blocking, a byte at a time)."""
    line = b""
    while not line.endswith(b"\n"):
        data = sock.recv(1)
        if not data:
            raise ConnectionError("relay closed the connection")
        line += data
    return parse_status(line).value


def connect_paired_blocking(address, relay_token: str, expect_waiting: bool) -> socket.socket:
    """Connect, send the hello and read statuses until ``paired`` (blocking)."""
    sock = socket.create_connection(address)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    send_hello(sock, relay_token)
    status = read_status(sock)
    if expect_waiting:
        assert status == "waiting", status
        return sock
    assert status == "paired", status
    return sock


def udp_join(sock: socket.socket, relay_address, relay_token: str) -> str:
    """Send the UDP hello and return the first status (blocking, with resends)."""
    sock.settimeout(0.5)
    for _ in range(20):
        sock.sendto(encode_udp_hello(relay_token), relay_address)
        try:
            data, _ = sock.recvfrom(65536)
        except TimeoutError:
            continue
        if data[:1] == bytes([STATUS]):
            return parse_status_datagram(data).value
    raise RuntimeError("no status from the relay")


def process_rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")
