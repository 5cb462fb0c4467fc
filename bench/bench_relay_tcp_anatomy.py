"""Where a relayed TCP transfer's time goes: the middle process's CPU, sleeps and run-queue wait.

Drives 1 GiB through a middle process with the TCP bench's own sender and receiver, and reads
the middle's /proc counters around the transfer: CPU time, voluntary context switches (sleeps),
involuntary ones (preemptions) and run-queue delay (runnable but waiting for a core), plus the
sender's and receiver's CPU. These are robust to other load where wall time is not. Middles:

  relay        `tucdesk-relay serve` (the default configuration), paired by hello as in use
  relay@PATH   the same, importing the relay package from another tree (for before/after)
  pump         a bare trio process running relay.forwarding.pump with the relay's buffers

    .venv/bin/python bench/bench_relay_tcp_anatomy.py [--repeats 6] [--middles relay,pump]

Before/after of a change: `git archive HEAD relay | tar -x -C /tmp/before`, then
`--middles relay@/tmp/before,relay`. Middles are interleaved within each repeat.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_relay_support import connect_paired_blocking, read_status, relay_process, token

from protocol.identity import SigningIdentity
from protocol.relay_token import Side

CHUNK = 1 << 20
PUMP_PROGRAM = """
import functools, socket, sys, trio
from relay.forwarding import bulk_low_water, pump
from relay.config import DEFAULT_SOCKET_BUFFER

async def main():
    listener = socket.create_server(("127.0.0.1", 0))
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        listener.setsockopt(socket.SOL_SOCKET, option, DEFAULT_SOCKET_BUFFER)
    print(listener.getsockname()[1], flush=True)
    sides = []
    for _ in range(2):
        sock, _ = listener.accept()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sides.append(sock)
    receiver, sender = sides
    forward = functools.partial(pump, record=lambda moved: 0.0, use_splice=False,
                                low_water=bulk_low_water(DEFAULT_SOCKET_BUFFER))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(forward, receiver, sender))
        await forward(sender, receiver)

trio.run(main)
"""


def process_counters(pid: int) -> dict[str, float]:
    """CPU seconds, context switches and run-queue delay of every thread of ``pid``."""
    totals = {"cpu": 0.0, "sleeps": 0.0, "preemptions": 0.0, "run_delay": 0.0}
    for thread in Path(f"/proc/{pid}/task").iterdir():
        on_cpu, waiting, _ = (thread / "schedstat").read_text().split()
        totals["cpu"] += int(on_cpu) / 1e9
        totals["run_delay"] += int(waiting) / 1e9
        for line in (thread / "status").read_text().splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                totals["sleeps"] += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                totals["preemptions"] += int(line.split()[1])
    return totals


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _receive(sock: socket.socket, size: int, report) -> None:
    buffer = bytearray(CHUNK)
    started, received = own_cpu(), 0
    while received < size:
        count = sock.recv_into(buffer)
        if count == 0:
            raise ConnectionError(f"stream ended after {received} of {size} bytes")
        received += count
    report.send(own_cpu() - started)
    sock.sendall(b"k")
    sock.close()


def _send(sock: socket.socket, size: int) -> tuple[float, float]:
    block = memoryview(bytes(CHUNK))
    cpu, started = own_cpu(), time.perf_counter()
    for _ in range(size // CHUNK):
        sock.sendall(block)
    if sock.recv(1) != b"k":
        raise ConnectionError("receiver did not confirm")
    elapsed = time.perf_counter() - started
    sock.close()
    return elapsed, own_cpu() - cpu


def _measure(pid: int, sender: socket.socket, size: int, report) -> dict[str, float]:
    before = process_counters(pid)
    elapsed, sender_cpu = _send(sender, size)
    after = process_counters(pid)
    result = {key: after[key] - before[key] for key in before}
    result.update(wall=elapsed, sender_cpu=sender_cpu, receiver_cpu=report.recv())
    return result


def _relay_receiver(address, relay_token: str, report, size: int) -> None:
    sock = connect_paired_blocking(address, relay_token, expect_waiting=True)
    report.send("waiting")
    assert read_status(sock) == "paired"
    _receive(sock, size, report)


def through_relay(size: int, signer: SigningIdentity, tree: str | None) -> dict[str, float]:
    """One transfer through `tucdesk-relay serve` (importing ``relay`` from ``tree`` if given)."""
    saved = os.environ.get("PYTHONPATH")
    if tree:
        os.environ["PYTHONPATH"] = tree
    try:
        with relay_process(signer) as (address, _udp, pid):
            session_id = f"anatomy-{time.time_ns()}"
            parent_end, child_end = multiprocessing.Pipe()
            child = multiprocessing.Process(
                target=_relay_receiver,
                args=(address, token(signer, session_id, Side.AGENT), child_end, size),
            )
            child.start()
            assert parent_end.recv() == "waiting"
            sender = connect_paired_blocking(
                address, token(signer, session_id, Side.OPERATOR), expect_waiting=False
            )
            result = _measure(pid, sender, size, parent_end)
            child.join(timeout=60)
            return result
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def _pump_receiver(port: int, report, size: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    report.send("connected")
    _receive(sock, size, report)


def through_pump(size: int) -> dict[str, float]:
    """One transfer through a bare trio process running relay.forwarding.pump."""
    middle = subprocess.Popen([sys.executable, "-c", PUMP_PROGRAM], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert middle.stdout is not None
        port = int(middle.stdout.readline())
        parent_end, child_end = multiprocessing.Pipe()
        child = multiprocessing.Process(target=_pump_receiver, args=(port, child_end, size))
        child.start()
        # The receiver's connection is complete, so it is ahead of the sender's in the listener's
        # accept queue: the middle takes it first, as it expects.
        assert parent_end.recv() == "connected"
        sender = socket.create_connection(("127.0.0.1", port))
        sender.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        result = _measure(middle.pid, sender, size, parent_end)
        child.join(timeout=60)
        middle.wait(timeout=10)
        return result
    finally:
        if middle.poll() is None:
            middle.kill()
            middle.wait()


def main() -> None:
    """Run each middle REPEATS times, interleaved, and print medians."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--middles", default="relay,pump")
    arguments = parser.parse_args()
    size = arguments.size_mib << 20
    signer = SigningIdentity.generate()
    middles = arguments.middles.split(",")
    runs: dict[str, list[dict[str, float]]] = {middle: [] for middle in middles}
    for _ in range(arguments.repeats):
        for middle in middles:
            if middle == "pump":
                runs[middle].append(through_pump(size))
            elif middle == "relay" or middle.startswith("relay@"):
                runs[middle].append(through_relay(size, signer, middle.partition("@")[2] or None))
            else:
                raise SystemExit(f"unknown middle {middle!r}: relay, relay@PATH or pump")
    per_gib = (1 << 30) / size
    print(f"{arguments.size_mib} MiB through each middle, median of {arguments.repeats} "
          "(counts and CPU per GiB)")
    print(f"  {'middle':24s} {'wall s':>7s} {'min s':>6s} {'cpu s':>6s} {'sleeps':>7s} "
          f"{'preempt':>7s} {'runq s':>6s} {'send s':>6s} {'recv s':>6s}")
    for middle, results in runs.items():
        def median(key: str, results=results) -> float:
            return statistics.median(result[key] for result in results)

        print(f"  {middle:24s} {median('wall'):7.3f} {min(r['wall'] for r in results):6.3f} "
              f"{median('cpu') * per_gib:6.3f} {median('sleeps') * per_gib:7.0f} "
              f"{median('preemptions') * per_gib:7.0f} {median('run_delay') * per_gib:6.3f} "
              f"{median('sender_cpu') * per_gib:6.3f} {median('receiver_cpu') * per_gib:6.3f}")


if __name__ == "__main__":
    multiprocessing.set_start_method("fork")
    main()
