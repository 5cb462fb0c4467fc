"""UDP benchmark: 1,200-byte datagrams forwarded per second by the relay and by socat.

Both run in the same invocation, each in its own process; a forked sender sends flat out for
DURATION seconds and a forked receiver counts what arrives. Reports delivered datagrams per
second (the target: relay >= 1x socat) and the loss each path had under that load.

    .venv/bin/python bench/bench_relay_udp.py [--seconds 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import time

from bench_relay_support import free_port, relay_process, socat_process, token, udp_join

from protocol.identity import SigningIdentity
from protocol.relay_token import Side
from relay.datagram import DATA

DATAGRAM_SIZE = 1200
BUFFER_SIZE = 8 * 1024 * 1024
QUIET_SECONDS = 0.5


def _big_buffers(sock: socket.socket) -> None:
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, BUFFER_SIZE)


def _count(sock: socket.socket, result_pipe) -> None:
    """Count datagrams until QUIET_SECONDS pass with none; report (count, first, last)."""
    buffer = bytearray(65536)
    sock.settimeout(30)
    sock.recv_into(buffer)
    first = last = time.perf_counter()
    count = 1
    sock.settimeout(QUIET_SECONDS)
    try:
        while True:
            sock.recv_into(buffer)
            count += 1
            if count & 1023 == 0:
                last = time.perf_counter()
    except TimeoutError:
        pass
    result_pipe.send((count, first, last))


def _blast(sock: socket.socket, destination, payload: bytes, seconds: float, result_pipe) -> None:
    sent = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for _ in range(256):
            try:
                sock.sendto(payload, destination)
                sent += 1
            except (BlockingIOError, ConnectionRefusedError):
                pass
    result_pipe.send(sent)


def measure(sender: socket.socket, destination, payload: bytes, receiver: socket.socket,
            seconds: float) -> tuple[float, float]:
    """Run one measurement; return (delivered per second, fraction lost)."""
    count_end, count_child = multiprocessing.Pipe()
    sent_end, sent_child = multiprocessing.Pipe()
    counter = multiprocessing.Process(target=_count, args=(receiver, count_child))
    counter.start()
    blaster = multiprocessing.Process(
        target=_blast, args=(sender, destination, payload, seconds, sent_child)
    )
    blaster.start()
    sent = sent_end.recv()
    count, first, last = count_end.recv()
    blaster.join()
    counter.join()
    return count / max(last - first, 1e-9), 1 - count / max(sent, 1)


def via_socat(seconds: float) -> tuple[float, float]:
    """Sender → socat UDP forwarder → receiver."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    _big_buffers(receiver)
    receiver.bind(("127.0.0.1", 0))
    socat_port = free_port(socket.SOCK_DGRAM)
    with socat_process(f"UDP4-LISTEN:{socat_port},bind=127.0.0.1",
                       f"UDP4:127.0.0.1:{receiver.getsockname()[1]}"):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        _big_buffers(sender)
        return measure(sender, ("127.0.0.1", socat_port), bytes(DATAGRAM_SIZE), receiver, seconds)


def via_relay(signer: SigningIdentity, seconds: float) -> tuple[float, float]:
    """Sender → relay (paired UDP session) → receiver."""
    with relay_process(signer) as (_tcp, udp, _pid):
        session_id = f"udp-bench-{time.time_ns()}"
        receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for sock in (receiver, sender):
            _big_buffers(sock)
            sock.bind(("127.0.0.1", 0))
        assert udp_join(receiver, udp, token(signer, session_id, Side.AGENT)) == "waiting"
        assert udp_join(sender, udp, token(signer, session_id, Side.OPERATOR)) == "paired"
        receiver.settimeout(2)
        while receiver.recv(65536)[1:] != b"paired":
            pass
        # The relay datagram carries a one-byte kind in front of the 1,200-byte payload.
        payload = bytes([DATA]) + bytes(DATAGRAM_SIZE)
        return measure(sender, udp, payload, receiver, seconds)


def main() -> None:
    """Alternate socat and relay runs, then print medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    arguments = parser.parse_args()
    signer = SigningIdentity.generate()
    results: dict[str, list[tuple[float, float]]] = {"socat": [], "relay": []}
    for _ in range(arguments.repeats):
        results["socat"].append(via_socat(arguments.seconds))
        results["relay"].append(via_relay(signer, arguments.seconds))
    print(f"UDP {DATAGRAM_SIZE}-byte datagrams, flat-out sender for {arguments.seconds} s, "
          f"median of {arguments.repeats}")
    rates = {}
    for name, runs in results.items():
        rates[name] = statistics.median(rate for rate, _ in runs)
        loss = statistics.median(lost for _, lost in runs)
        print(f"  {name:6s} {rates[name]:10.0f} datagrams/s delivered  (loss {loss:.1%})")
    print(f"  relay / socat = {rates['relay'] / rates['socat']:.2f}x (target >= 1x)")


if __name__ == "__main__":
    multiprocessing.set_start_method("fork")
    main()
