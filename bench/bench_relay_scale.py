"""Scale benchmark: many idle paired TCP sessions (relay RSS), and 1,000 active sessions' latency.

Idle: IDLE_SESSIONS sessions are paired through one relay process and held open; the relay's
resident memory is read from /proc. The client sockets are spread over worker processes, since
each process may hold only as many descriptors as its hard limit allows.

Active: 1,000 sessions each send a 100-byte message every 100 ms for a while; the one-way
latency (sender and receiver share a clock, in this process) through the relay is compared with
the same traffic over direct loopback connections, and the added p99 reported.

    .venv/bin/python bench/bench_relay_scale.py [--idle 10000] [--active 1000] [--seconds 10]
"""

from __future__ import annotations

import argparse
import heapq
import multiprocessing
import select
import socket
import statistics
import struct
import time

import trio
from bench_relay_support import process_rss_kib, raise_fd_limit, relay_process, token

from protocol.identity import SigningIdentity
from protocol.relay_token import Side
from relay.client import connect_tcp

MESSAGE_SIZE = 100
INTERVAL_SECONDS = 0.1
CONNECT_CONCURRENCY = 64
WORKER_SOCKETS = 9_000  # client sockets per worker process, under a 20,000 hard limit
RELAY_FD_MARGIN = 64  # the relay's listeners, log, metrics and the like


def _idle_worker(address, tokens: list[tuple[str, str]], ready, release) -> None:
    raise_fd_limit()

    async def main() -> None:
        streams = []
        limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)

        async def join(agent_token: str, operator_token: str) -> None:
            async with limiter, trio.open_nursery() as nursery:
                async def one(relay_token: str) -> None:
                    streams.append(await connect_tcp(*address, relay_token, pair_timeout=60))

                nursery.start_soon(one, agent_token)
                nursery.start_soon(one, operator_token)

        async with trio.open_nursery() as nursery:
            for agent_token, operator_token in tokens:
                nursery.start_soon(join, agent_token, operator_token)
        ready.send(len(streams) // 2)
        await trio.to_thread.run_sync(release.recv)
        for stream in streams:
            await stream.aclose()

    try:
        trio.run(main)
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which stops
        # The first failure, before the relay stops and every other worker fails after it.
        ready.send(f"worker failed: {_first_failure(error)!r}")


def _first_failure(error: BaseException) -> BaseException:
    """The first leaf of a (nested) exception group: the error that started it."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def idle_sessions(signer: SigningIdentity, count: int) -> None:
    """Pair ``count`` idle sessions through one relay process and report its RSS."""
    max_sessions = count + 16
    with relay_process(
        signer, "--max-sessions", str(max_sessions), "--max-waiting", str(count),
        "--max-pending", "256", "--pair-timeout", "120",
    ) as (tcp, _udp, pid):
        rss_before = process_rss_kib(pid)
        pairs = [
            (token(signer, f"idle-{i}", Side.AGENT), token(signer, f"idle-{i}", Side.OPERATOR))
            for i in range(count)
        ]
        per_worker = WORKER_SOCKETS // 2
        workers = []
        started = time.perf_counter()
        for offset in range(0, count, per_worker):
            ready_end, ready_child = multiprocessing.Pipe()
            release_end, release_child = multiprocessing.Pipe()
            worker = multiprocessing.Process(
                target=_idle_worker,
                args=(tcp, pairs[offset : offset + per_worker], ready_child, release_child),
            )
            worker.start()
            workers.append((worker, ready_end, release_end))
        answers = [ready.recv() for _, ready, _ in workers]
        failures = [answer for answer in answers if isinstance(answer, str)]
        if failures:
            for (_, _, release), answer in zip(workers, answers, strict=True):
                if not isinstance(answer, str):
                    release.send("go")  # a failed worker has exited already
            raise RuntimeError(f"{len(failures)} of {len(workers)} workers failed; first: "
                               f"{failures[0]}")
        paired = sum(answers)
        elapsed = time.perf_counter() - started
        time.sleep(1)
        rss_after = process_rss_kib(pid)
        for _, _, release in workers:
            release.send("go")
        for worker, _, _ in workers:
            worker.join(timeout=60)
    print(f"Idle: {paired} paired TCP sessions ({2 * paired} relay sockets) in {elapsed:.1f} s")
    print(f"  relay RSS {rss_after / 1024:.1f} MiB (idle relay {rss_before / 1024:.1f} MiB; "
          f"{(rss_after - rss_before) / max(paired, 1):.2f} KiB per session); target <= 250 MiB "
          f"at 10,000")


def _drive_latency(
    pairs: list[tuple[socket.socket, socket.socket]], seconds: float
) -> list[float]:
    """Send on every pair's first socket on a fixed schedule; time arrivals on the second.

    A plain epoll loop rather than trio, so the driver adds as little latency as it can.
    """
    latencies: list[float] = []
    padding = bytes(MESSAGE_SIZE - 8)
    poller = select.epoll()
    receivers: dict[int, tuple[socket.socket, bytearray]] = {}
    for _, receiving in pairs:
        receiving.setblocking(False)
        poller.register(receiving.fileno(), select.EPOLLIN)
        receivers[receiving.fileno()] = (receiving, bytearray())
    start = time.perf_counter()
    schedule = [(start + INTERVAL_SECONDS * i / len(pairs), i) for i in range(len(pairs))]
    heapq.heapify(schedule)
    stop_at = start + seconds
    while schedule:
        now = time.perf_counter()
        while schedule and schedule[0][0] <= now:
            due, index = heapq.heappop(schedule)
            pairs[index][0].send(struct.pack("!q", time.perf_counter_ns()) + padding)
            if due + INTERVAL_SECONDS < stop_at:
                heapq.heappush(schedule, (due + INTERVAL_SECONDS, index))
        timeout = max(0.0, schedule[0][0] - time.perf_counter()) if schedule else 0.5
        for fd, _ in poller.poll(timeout):
            receiving, buffered = receivers[fd]
            data = receiving.recv(65536)
            arrived = time.perf_counter_ns()
            buffered += data
            while len(buffered) >= MESSAGE_SIZE:
                (sent,) = struct.unpack_from("!q", buffered)
                latencies.append((arrived - sent) / 1e6)
                del buffered[:MESSAGE_SIZE]
    drain_until = time.perf_counter() + 1
    while time.perf_counter() < drain_until:
        for fd, _ in poller.poll(0.1):
            receiving, buffered = receivers[fd]
            arrived = time.perf_counter_ns()
            buffered += receiving.recv(65536)
            while len(buffered) >= MESSAGE_SIZE:
                (sent,) = struct.unpack_from("!q", buffered)
                latencies.append((arrived - sent) / 1e6)
                del buffered[:MESSAGE_SIZE]
    poller.close()
    return latencies


async def _relay_pairs(address, signer: SigningIdentity, count: int):
    pairs = []
    limiter = trio.CapacityLimiter(CONNECT_CONCURRENCY)

    async def join(index: int) -> None:
        found: dict[Side, trio.SocketStream] = {}
        async with limiter, trio.open_nursery() as nursery:
            async def one(side: Side) -> None:
                found[side] = await connect_tcp(*address, token(signer, f"active-{index}", side))

            nursery.start_soon(one, Side.AGENT)
            nursery.start_soon(one, Side.OPERATOR)
        pairs.append((_detach(found[Side.OPERATOR]), _detach(found[Side.AGENT])))

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(join, index)
    return pairs


async def _direct_pairs(count: int):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    pairs = []
    for _ in range(count):
        sending = await trio.open_tcp_stream("127.0.0.1", port)
        receiving = await listeners[0].accept()
        pairs.append((_detach(sending), _detach(receiving)))
    await listeners[0].aclose()
    return pairs


def _detach(stream: trio.SocketStream) -> socket.socket:
    """A blocking stdlib socket for a trio stream's connection (TCP_NODELAY stays set)."""
    sock = socket.socket(fileno=stream.socket.detach())
    sock.setblocking(True)
    return sock


def percentile(values: list[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def active_sessions(signer: SigningIdentity, count: int, seconds: float) -> None:
    """Compare one-way latency of 100-byte messages every 100 ms: relay vs direct loopback."""
    with relay_process(signer, "--max-sessions", str(count + 16)) as (tcp, _udp, _pid):
        relay_latency = _measure(lambda: _relay_pairs(tcp, signer, count), seconds)
    direct_latency = _measure(lambda: _direct_pairs(count), seconds)
    print(f"Active: {count} sessions, {MESSAGE_SIZE}-byte message every "
          f"{INTERVAL_SECONDS * 1000:.0f} ms each, {seconds:.0f} s")
    for name, values in (("direct", direct_latency), ("relay", relay_latency)):
        print(f"  {name:6s} n={len(values):7d} p50={percentile(values, 0.5):.3f} ms "
              f"p99={percentile(values, 0.99):.3f} ms max={max(values):.3f} ms")
    added = percentile(relay_latency, 0.99) - percentile(direct_latency, 0.99)
    print(f"  added p99 = {added:.3f} ms (target <= 2 ms); added median = "
          f"{statistics.median(relay_latency) - statistics.median(direct_latency):.3f} ms")


def _measure(make_pairs, seconds: float) -> list[float]:
    pairs = trio.run(make_pairs)
    latencies = _drive_latency(pairs, seconds)
    for sending, receiving in pairs:
        sending.close()
        receiving.close()
    return latencies


def main() -> None:
    """Run the idle and the active scale measurements."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle", type=int, default=10_000)
    parser.add_argument("--active", type=int, default=1_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    arguments = parser.parse_args()
    limit = raise_fd_limit()
    signer = SigningIdentity.generate()
    idle = arguments.idle
    most = (limit - RELAY_FD_MARGIN) // 2
    if idle > most:
        # The relay would stop accepting at its limit and the rest would time out unpaired.
        print(f"open-file hard limit {limit} lets one relay process hold "
              f"{most} sessions of two sockets each: measuring {most}, not {idle}")
        idle = most
    if idle:
        idle_sessions(signer, idle)
    if arguments.active:
        active_sessions(signer, arguments.active, arguments.seconds)


if __name__ == "__main__":
    multiprocessing.set_start_method("fork")
    main()
