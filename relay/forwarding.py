"""The TCP data path: move bytes from one socket to another until EOF, then half-close.

By default the bytes are copied through one buffer shared by every session (no per-session
buffer memory). With splice (Linux) they go socket → pipe → socket and never enter Python; if no
pipe can be had (the open-file limit is reached) that session copies instead. On loopback the
copy path measured faster than splice (bench/RESULTS-relay.md), hence the default. Either way
each chunk is reported to ``record``, which counts it and answers how long to pause to honour
the bandwidth caps.
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
SPLICE_CHUNK_SIZE = 1 << 20
PIPE_CAPACITY = 1 << 20
# 2 MiB chunks measured faster than 1 MiB and 4 MiB on loopback (bench/RESULTS-relay.md).
COPY_BUFFER_SIZE = 2 * 1024 * 1024
MAX_CHUNK_SIZE = max(COPY_BUFFER_SIZE, SPLICE_CHUNK_SIZE)
# Yield to other tasks after this many chunks moved back to back.
MAX_CHUNKS_WITHOUT_YIELD = 16
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

# Safe to share: a pump copies out of it before it ever awaits with bytes still unsent.
_shared_buffer = bytearray(COPY_BUFFER_SIZE)

Recorder = Callable[[int], float]


async def pump(
    source: socket.socket,
    destination: socket.socket,
    record: Recorder,
    *,
    use_splice: bool,
    chunk_limit: int = MAX_CHUNK_SIZE,
) -> None:
    """Forward ``source`` to ``destination`` until EOF, then half-close ``destination``."""
    await trio.lowlevel.wait_readable(source)
    pipe = _open_pipe() if use_splice and SPLICE_AVAILABLE else None
    if pipe is None:
        await _pump_copy(source, destination, record, min(chunk_limit, COPY_BUFFER_SIZE))
        return
    read_end, write_end = pipe
    try:
        await _pump_splice(
            source, destination, record, min(chunk_limit, SPLICE_CHUNK_SIZE), read_end, write_end
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
) -> None:
    source_fd, destination_fd = source.fileno(), destination.fileno()
    streak = 0
    while True:
        try:
            moved = os.splice(source_fd, write_end, chunk_limit, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            streak = 0
            await trio.lowlevel.wait_readable(source)
            continue
        if moved == 0:
            shutdown_write(destination)
            return
        pending = moved
        while pending:
            try:
                pending -= os.splice(read_end, destination_fd, pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                await trio.lowlevel.wait_writable(destination)
        streak = await _pace(record(moved), streak)


async def _pump_copy(
    source: socket.socket, destination: socket.socket, record: Recorder, chunk_limit: int
) -> None:
    view = memoryview(_shared_buffer)[:chunk_limit]
    streak = 0
    while True:
        try:
            received = source.recv_into(view)
        except BlockingIOError:
            streak = 0
            await trio.lowlevel.wait_readable(source)
            continue
        if received == 0:
            shutdown_write(destination)
            return
        try:
            sent = destination.send(view[:received])
        except BlockingIOError:
            sent = 0
        if sent < received:
            # Copy the rest out of the shared buffer before waiting.
            await send_all(destination, bytes(view[sent:received]))
        streak = await _pace(record(received), streak)


async def _pace(delay: float, streak: int) -> int:
    if delay > 0:
        await trio.sleep(delay)
        return 0
    streak += 1
    if streak >= MAX_CHUNKS_WITHOUT_YIELD:
        await trio.lowlevel.checkpoint()
        return 0
    return streak
