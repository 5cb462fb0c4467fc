"""TCP benchmark: a 1 GiB transfer through the relay, through socat, and over direct loopback.

Each path runs in the same invocation. The relay and socat are separate processes; the sender
is this process and the receiver a forked child. Reports the median of REPEATS runs per path
and the ratios the issue sets targets for (relay >= 2x socat, >= 0.5x direct).

    .venv/bin/python bench/bench_relay_tcp.py [--size-mib 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import time

from bench_relay_support import (
    connect_paired_blocking,
    free_port,
    read_status,
    relay_process,
    socat_process,
    token,
)

from protocol.identity import SigningIdentity
from protocol.relay_token import Side

CHUNK = 1 << 20
# The default configuration first, then the alternatives it was chosen over.
RELAY_CONFIGURATIONS = {
    "copy, default": ("--forwarding", "copy"),
    "copy, autotuned buffers": ("--forwarding", "copy", "--socket-buffer", "0"),
    "splice": ("--forwarding", "splice"),
}


def _receive_all(sock: socket.socket, size: int) -> None:
    buffer = bytearray(CHUNK)
    received = 0
    while received < size:
        count = sock.recv_into(buffer)
        if count == 0:
            raise ConnectionError(f"stream ended after {received} of {size} bytes")
        received += count
    sock.sendall(b"k")
    sock.close()


def _send_all_and_wait(sock: socket.socket, size: int) -> float:
    block = memoryview(bytes(CHUNK))
    started = time.perf_counter()
    remaining = size
    while remaining:
        step = min(CHUNK, remaining)
        sock.sendall(block[:step])
        remaining -= step
    if sock.recv(1) != b"k":
        raise ConnectionError("receiver did not confirm")
    elapsed = time.perf_counter() - started
    sock.close()
    return elapsed


def _listening_receiver(port_pipe, size: int) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port_pipe.send(listener.getsockname()[1])
    connection, _ = listener.accept()
    _receive_all(connection, size)


def run_via_listener(size: int, via_socat: bool) -> float:
    """Direct loopback (or via a socat forwarder) to a listening receiver; seconds taken."""
    parent_end, child_end = multiprocessing.Pipe()
    child = multiprocessing.Process(target=_listening_receiver, args=(child_end, size))
    child.start()
    port = parent_end.recv()
    try:
        if via_socat:
            socat_port = free_port()
            with socat_process(f"TCP4-LISTEN:{socat_port},reuseaddr,bind=127.0.0.1",
                               f"TCP4:127.0.0.1:{port}"):
                sock = socket.create_connection(("127.0.0.1", socat_port))
                return _send_all_and_wait(sock, size)
        sock = socket.create_connection(("127.0.0.1", port))
        return _send_all_and_wait(sock, size)
    finally:
        child.join(timeout=60)


def _relay_receiver(address, relay_token: str, ready_pipe, size: int) -> None:
    sock = connect_paired_blocking(address, relay_token, expect_waiting=True)
    ready_pipe.send("waiting")
    assert read_status(sock) == "paired"
    _receive_all(sock, size)


def run_via_relay(address, signer: SigningIdentity, session_id: str, size: int) -> float:
    """The same transfer through the relay; seconds taken."""
    parent_end, child_end = multiprocessing.Pipe()
    child = multiprocessing.Process(
        target=_relay_receiver,
        args=(address, token(signer, session_id, Side.AGENT), child_end, size),
    )
    child.start()
    try:
        assert parent_end.recv() == "waiting"
        sock = connect_paired_blocking(
            address, token(signer, session_id, Side.OPERATOR), expect_waiting=False
        )
        return _send_all_and_wait(sock, size)
    finally:
        child.join(timeout=60)


def main() -> None:
    """Run every path REPEATS times and print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    size = arguments.size_mib << 20
    signer = SigningIdentity.generate()
    results: dict[str, list[float]] = {}
    for _ in range(arguments.repeats):
        results.setdefault("direct loopback", []).append(run_via_listener(size, via_socat=False))
        results.setdefault("socat (default options)", []).append(
            run_via_listener(size, via_socat=True)
        )
        for mode, options in RELAY_CONFIGURATIONS.items():
            with relay_process(signer, *options) as (tcp, _udp, _pid):
                results.setdefault(f"relay ({mode})", []).append(
                    run_via_relay(tcp, signer, f"bench-{time.time_ns()}", size)
                )
    print(f"TCP transfer of {arguments.size_mib} MiB, median of {arguments.repeats} runs")
    throughput = {}
    for name, runs in results.items():
        median = statistics.median(runs)
        throughput[name] = size / median / 2**20
        print(f"  {name:32s} {median:7.3f} s  {throughput[name]:8.0f} MiB/s")
    for mode in RELAY_CONFIGURATIONS:
        relay = throughput[f"relay ({mode})"]
        print(
            f"  relay ({mode}) / socat = {relay / throughput['socat (default options)']:.2f}x "
            f"(target >= 2x); / direct = {relay / throughput['direct loopback']:.2f}x "
            f"(target >= 0.5x)"
        )


if __name__ == "__main__":
    multiprocessing.set_start_method("fork")
    main()
