"""OutputWriter against real sockets and pipes whose readers lag."""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios
import threading
import time

import trio

from operator_cli.stdio import OutputWriter


def _loop_gaps_while_writing(writer: OutputWriter, data: bytes, cancel_after: float) -> float:
    """The longest the trio loop went without running another task during the write."""
    ticks: list[float] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def tick() -> None:
                while True:
                    ticks.append(time.monotonic())
                    await trio.sleep(0.01)

            nursery.start_soon(tick)
            with trio.move_on_after(cancel_after):
                await writer.write(data)
            nursery.cancel_scope.cancel()

    ticks.append(time.monotonic())
    trio.run(main)
    ticks.append(time.monotonic())
    return max(later - earlier for earlier, later in zip(ticks, ticks[1:], strict=False))


def test_a_socket_that_lags_does_not_stall_the_loop() -> None:
    # stdout on a socket (the systemd journal, socat) whose reader takes nothing for a while.
    ours, theirs = socket.socketpair()
    # Drained later, so that even a write blocking the loop ends and the test reports it.
    drainer = threading.Timer(2.0, lambda: _drain(theirs))
    drainer.start()
    writer = OutputWriter(ours.fileno())
    try:
        longest_gap = _loop_gaps_while_writing(writer, b"x" * 4_000_000, cancel_after=0.3)
        flags = fcntl.fcntl(ours.fileno(), fcntl.F_GETFL)
    finally:
        theirs.shutdown(socket.SHUT_RDWR)
        drainer.join()
        writer.close()
        ours.close()
        theirs.close()
    assert longest_gap < 0.5  # 2 s when the write blocks the loop until the drain
    assert not flags & os.O_NONBLOCK  # the shared description was left as it was


def test_a_socket_that_keeps_up_gets_every_byte_in_order() -> None:
    ours, theirs = socket.socketpair()
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(_drain(theirs)))
    reader.start()
    chunks = [os.urandom(size) for size in (150_000, 1, 0, 65_536, 999_999)]
    writer = OutputWriter(ours.fileno())
    try:
        assert trio.run(writer.write_many, chunks)
    finally:
        writer.close()
        ours.shutdown(socket.SHUT_WR)
        reader.join()
        ours.close()
        theirs.close()
    assert bytes(received) == b"".join(chunks)


def test_a_cancelled_write_writes_nothing_after_it_returns() -> None:
    # ~. while a slow terminal takes a flood: once the write has returned (and the terminal
    # is restored), no more of the flood may reach it.
    read_end, write_end = os.pipe()
    lock = threading.Lock()
    total = 0
    stop = threading.Event()

    def read_slowly() -> None:
        nonlocal total
        while not stop.is_set():
            with lock:  # never blocks in read() while holding it
                if _queued(read_end):
                    total += len(os.read(read_end, 1024))
            time.sleep(0.002)

    reader = threading.Thread(target=read_slowly)
    writer = OutputWriter(write_end)

    async def flood() -> None:
        with trio.move_on_after(0.3):
            await writer.write(b"z" * 4_000_000)

    reader.start()
    try:
        trio.run(flood)
        with lock:
            queued = _queued(read_end)
            read_at_return = total
        time.sleep(0.5)  # ample for the rest of a 64 KiB slice at this pace
        with lock:
            while _queued(read_end):
                total += len(os.read(read_end, 65536))
            read_after_return = total - read_at_return
    finally:
        stop.set()
        writer.close()
        os.close(write_end)
        reader.join()
        os.close(read_end)
    assert read_after_return == queued


def _drain(connection: socket.socket) -> bytes:
    received = bytearray()
    while data := connection.recv(65536):
        received.extend(data)
    return bytes(received)


def _queued(read_end: int) -> int:
    """Bytes waiting in a pipe."""
    return int(struct.unpack("i", fcntl.ioctl(read_end, termios.FIONREAD, b"\0" * 4))[0])
