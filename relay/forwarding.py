"""The TCP data path: move bytes from one socket to another until EOF, then half-close.

By default the bytes are copied through one buffer shared by every session (no per-session
buffer memory). With splice (Linux) they go socket → pipe → socket and never enter Python; if no
pipe can be had (the open-file limit is reached) that session copies instead. On loopback the
copy path measured faster than splice (bench/RESULTS-relay.md), hence the default. Either way
each chunk is reported to ``record``, which counts it and answers how long to pause to honour
the bandwidth caps.

While a bulk transfer runs, a pump asks to be woken only once a good batch of bytes is queued
(SO_RCVLOWAT), not at every arriving segment. With the sender, the relay and the receiver
sharing two cores, that made the relay sleep about 6x less often per GiB, wait about half as
long for a CPU, and move a GiB about 15 % faster (bench/RESULTS-relay.md). A batched wait is
bounded by BULK_WAIT_LIMIT_SECONDS and then ends batching, so the tail of a burst is late by
about that at most, and small messages between bursts are never held back.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from collections.abc import Callable

import trio

from relay.sockio import send_all, shutdown_write

SPLICE_AVAILABLE = sys.platform == "linux" and hasattr(os, "splice")
# SO_RCVLOWAT's effect on poll and on the receive window is Linux's; elsewhere, no batching.
BATCHING_AVAILABLE = sys.platform == "linux" and hasattr(socket, "SO_RCVLOWAT")
SPLICE_CHUNK_SIZE = 1 << 20
PIPE_CAPACITY = 1 << 20
# 2 MiB chunks measured faster than 1 MiB and 4 MiB on loopback (bench/RESULTS-relay.md).
COPY_BUFFER_SIZE = 2 * 1024 * 1024
MAX_CHUNK_SIZE = max(COPY_BUFFER_SIZE, SPLICE_CHUNK_SIZE)
# Yield to other tasks after this many chunks moved back to back.
MAX_CHUNKS_WITHOUT_YIELD = 16
# During bulk transfer, wake once this much is queued (capped at a quarter of the buffer) ...
BULK_LOW_WATER = 1 << 20
# ... but no batching with less than this to gain: small buffers stay woken per arrival.
MIN_BULK_LOW_WATER = 256 * 1024
# A single read of at least low-water / 4 means bytes arrive faster than one wake-up each.
BULK_ENTRY_DIVISOR = 4
# Longest a batched wait holds back bytes that are already queued; then batching ends.
BULK_WAIT_LIMIT_SECONDS = 0.001
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

# Safe to share: a pump copies out of it before it ever awaits with bytes still unsent.
_shared_buffer = bytearray(COPY_BUFFER_SIZE)

Recorder = Callable[[int], float]


def bulk_low_water(socket_buffer: int) -> int:
    """The batching low-water mark for connections with fixed ``socket_buffer``; 0: no batching.

    Only for fixed buffers: on an autotuned socket, Linux also clamps the receive window to the
    low-water mark, which would cap a long-distance session's throughput.
    """
    if socket_buffer <= 0 or not BATCHING_AVAILABLE:
        return 0
    low_water = min(BULK_LOW_WATER, socket_buffer // 4)
    return low_water if low_water >= MIN_BULK_LOW_WATER else 0


class SourceWaiter:
    """Waits for a source socket to be readable: per arrival, or per batch during bulk transfer."""

    def __init__(self, sock: socket.socket, low_water: int) -> None:
        self.sock = sock
        self.low_water = low_water
        self.entry_size = low_water // BULK_ENTRY_DIVISOR if low_water else 0
        self.batching = False

    def observe(self, received: int) -> None:
        """Note a read of ``received`` bytes: large reads start batching, small ones end it."""
        if self.low_water and (received >= self.entry_size) != self.batching:
            self._set_batching(not self.batching)

    async def wait(self) -> None:
        """Wait until readable; a batched wait that runs out of time ends batching."""
        if not self.batching:
            await trio.lowlevel.wait_readable(self.sock)
            return
        with trio.move_on_after(BULK_WAIT_LIMIT_SECONDS) as limit:
            await trio.lowlevel.wait_readable(self.sock)
        if limit.cancelled_caught:
            self._set_batching(False)

    def _set_batching(self, batching: bool) -> None:
        low_water = self.low_water if batching else 1
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, low_water)
        self.batching = batching


async def pump(
    source: socket.socket,
    destination: socket.socket,
    record: Recorder,
    *,
    use_splice: bool,
    chunk_limit: int = MAX_CHUNK_SIZE,
    low_water: int = 0,
) -> None:
    """Forward ``source`` to ``destination`` until EOF, then half-close ``destination``.

    A non-zero ``low_water`` (see ``bulk_low_water``) batches wake-ups during bulk transfer.
    """
    await trio.lowlevel.wait_readable(source)
    waiter = SourceWaiter(source, low_water)
    pipe = _open_pipe() if use_splice and SPLICE_AVAILABLE else None
    if pipe is None:
        await _pump_copy(source, destination, record, min(chunk_limit, COPY_BUFFER_SIZE), waiter)
        return
    read_end, write_end = pipe
    try:
        await _pump_splice(
            source, destination, record, min(chunk_limit, SPLICE_CHUNK_SIZE), read_end, write_end,
            waiter,
        )
    finally:
        os.close(read_end)
        os.close(write_end)


def _open_pipe() -> tuple[int, int] | None:
    try:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_CAPACITY)
    except OSError:
        pass  # the default pipe size still works, in smaller steps
    return read_end, write_end


async def _pump_splice(
    source: socket.socket,
    destination: socket.socket,
    record: Recorder,
    chunk_limit: int,
    read_end: int,
    write_end: int,
    waiter: SourceWaiter,
) -> None:
    source_fd, destination_fd = source.fileno(), destination.fileno()
    streak = 0
    while True:
        try:
            moved = os.splice(source_fd, write_end, chunk_limit, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            streak = 0
            await waiter.wait()
            continue
        if moved == 0:
            shutdown_write(destination)
            return
        waiter.observe(moved)
        pending = moved
        while pending:
            try:
                pending -= os.splice(read_end, destination_fd, pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(destination)
        streak = await _pace(record(moved), streak)


async def _pump_copy(
    source: socket.socket,
    destination: socket.socket,
    record: Recorder,
    chunk_limit: int,
    waiter: SourceWaiter,
) -> None:
    # The per-message path is inlined (waiter.wait's unbatched case, waiter.observe's test,
    # the pacing): each coroutine or method call it saves is paid twice per keystroke.
    view = memoryview(_shared_buffer)[:chunk_limit]
    wait_readable = trio.lowlevel.wait_readable
    low_water, entry_size = waiter.low_water, waiter.entry_size
    streak = 0
    while True:
        try:
            received = source.recv_into(view)
        except BlockingIOError:
            streak = 0
            await waiter.wait()
            continue
        if received == 0:
            shutdown_write(destination)
            return
        if low_water and (received >= entry_size) != waiter.batching:
            waiter.observe(received)
        try:
            sent = destination.send(view[:received])
        except BlockingIOError:
            sent = 0
        if sent < received:
            # Copy the rest out of the shared buffer before waiting.
            await send_all(destination, bytes(view[sent:received]))
        delay = record(received)
        if received < chunk_limit:
            # The read emptied the socket: wait for more rather than first reading nothing
            # (a system call and an exception per forwarded keystroke). The wait is a
            # checkpoint, so no pacing checkpoint is needed before it.
            streak = 0
            if delay > 0:
                await trio.sleep(delay)
            if waiter.batching:
                await waiter.wait()
            else:
                await wait_readable(source)
        else:
            streak = await _pace(delay, streak)


async def _pace(delay: float, streak: int) -> int:
    if delay > 0:
        await trio.sleep(delay)
        return 0
    streak += 1
    if streak >= MAX_CHUNKS_WITHOUT_YIELD:
        await trio.lowlevel.checkpoint()
        return 0
    return streak
