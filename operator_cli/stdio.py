"""The local end of a session: reading our stdin and writing our stdout/stderr under trio.

The descriptors are shared with the shell that started us, so they are never switched to
non-blocking mode (that would leak into the shell after we exit). Pipes and terminals are waited
on with trio's readiness API and then read once, which cannot block; regular files and
/dev/null, which epoll refuses, are read in a worker thread instead (they never block for long).
Output to a slow reader waits in a worker thread (OutputWriter), so it never stalls the keystroke
side.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import threading
from collections.abc import Sequence

import trio

from relay.client import acquire_at_once

READ_CHUNK_BYTES = 64 * 1024
# Buffers per writev call (Linux's IOV_MAX is 1024).
MAX_WRITE_BUFFERS = 1024
# What a worker thread writes per blocking call when the reader is slow: after ~. at most this
# much more reaches the terminal (32 ms at 2 MB/s).
THREAD_SLICE_BYTES = 64 * 1024
# How long a cancelled write (or close) waits for the worker thread's current slice: it must not
# land after ~. has restored the terminal, but a reader that takes nothing at all must not hold
# ~. for longer than this.
THREAD_SLICE_GRACE_SECONDS = 0.5
# A send on the socket copy that never waits and never raises SIGPIPE.
_SOCKET_TRY_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


class InputReader:
    """Reads one file descriptor chunk by chunk; ``b""`` means end of input."""

    def __init__(self, fd: int, chunk_size: int = READ_CHUNK_BYTES) -> None:
        self.fd = fd
        self.chunk_size = chunk_size
        self._pollable = True

    async def read(self) -> bytes:
        """The next chunk of input, or b"" at end of input (or when the descriptor is gone)."""
        while self._pollable:
            try:
                await trio.lowlevel.wait_readable(self.fd)
            except PermissionError:
                self._pollable = False  # a regular file or /dev/null: epoll cannot watch it
                break
            except OSError:
                return b""
            try:
                return self._read_now()
            except BlockingIOError:
                continue  # another reader of a shared non-blocking description got there first
        return await trio.to_thread.run_sync(self._read_now, abandon_on_cancel=True)

    def _read_now(self) -> bytes:
        try:
            return os.read(self.fd, self.chunk_size)
        except OSError as error:
            if error.errno == errno.EIO:  # the terminal hung up
                return b""
            raise


class OutputWriter:
    """Writes whole buffers to one file descriptor without stalling the trio loop.

    ``broken`` once the reader has gone away. For a terminal or a pipe, what the reader can take
    at once (a keystroke's echo, output a fast reader keeps up with) goes in one non-blocking
    system call on a private open of the same terminal or pipe (a new file description, so the
    shared one keeps its mode). What it cannot take yet is written by a worker thread, blocking,
    in slices of THREAD_SLICE_BYTES: the loop stays free for keystrokes, the ``~.`` escape and
    signals while a slow terminal catches up, and cancelling the write stops the thread after
    its current slice, dropping the rest (as ssh drops pending output on ``~.``). The kernel
    does the waiting inside one blocking call, which costs far fewer system calls than waiting
    for room in trio after every few kilobytes a terminal takes. A socket (which cannot be
    reopened) is tried with MSG_DONTWAIT on a copy, and the rest goes to the worker thread the
    same way. Regular files (and anything else that cannot be reopened) are written directly:
    they do not keep a writer waiting.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.broken = False
        self._try_fd, self._private = _nonblocking_description(fd)
        # A socket (the systemd journal, socat) cannot be reopened; a copy sent to with
        # MSG_DONTWAIT tries without waiting and without changing the shared description.
        self._socket = None if self._private else _socket_copy(fd)
        self._thread_done: threading.Event | None = None  # the last worker thread has returned
        self._turn = trio.Lock()  # one writer at a time: a buffer is never split by another

    async def write(self, data: bytes) -> bool:
        """Write all of ``data``; False (and ``broken``) if the reader closed its end (EPIPE)."""
        return await self.write_many((data,))

    async def write_many(self, chunks: Sequence[bytes]) -> bool:
        """``write`` for several buffers in order, with as few system calls as they allow."""
        if self.broken:
            return False
        await acquire_at_once(self._turn)
        try:
            pending = [memoryview(chunk) for chunk in chunks if chunk]
            if not self._private and self._socket is None:
                return self._write_blocking(pending, None, _byte_count(pending))
            if not self._write_now(pending):
                return False
            if not pending:
                return True
            return await self._write_in_thread(pending)
        finally:
            self._turn.release()

    def close(self) -> None:
        """Wait (briefly) for a worker thread still in its last slice, then close the private
        descriptor, if one was opened (the shared one stays open)."""
        if self._thread_done is not None:
            self._thread_done.wait(THREAD_SLICE_GRACE_SECONDS)
        if self._private:
            self._private = False
            os.close(self._try_fd)
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def _write_in_thread(self, pending: list[memoryview]) -> bool:
        """Write the rest blocking, in a worker thread; cancelled, the thread stops after its
        current slice, and the turn is kept until it has (so nothing lands after ~.)."""
        stop, done = threading.Event(), threading.Event()
        self._thread_done = done

        def write_then_signal() -> bool:
            try:
                return self._write_blocking(pending, stop, THREAD_SLICE_BYTES)
            finally:
                done.set()

        try:
            return await trio.to_thread.run_sync(write_then_signal, abandon_on_cancel=True)
        finally:
            stop.set()  # cancelled: the thread stops after its current slice
            if not done.is_set():
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(done.wait, THREAD_SLICE_GRACE_SECONDS)

    def _write_now(self, pending: list[memoryview]) -> bool:
        """Write what the reader takes without waiting; the rest stays in ``pending``."""
        while pending:
            batch = pending[:MAX_WRITE_BUFFERS]
            try:
                if self._socket is not None:
                    written = self._socket.sendmsg(batch, (), _SOCKET_TRY_FLAGS)
                else:
                    written = os.writev(self._try_fd, batch)
            except BlockingIOError:
                return True
            except (BrokenPipeError, ConnectionResetError):
                self.broken = True
                return False
            short = written < _byte_count(batch)
            _advance(pending, written)
            if short:
                return True
        return True

    def _write_blocking(
        self, pending: list[memoryview], stop: threading.Event | None, slice_bytes: int
    ) -> bool:
        """Write ``pending`` on the shared descriptor, ``slice_bytes`` per call, until done or
        ``stop`` is set; False (and ``broken``) if the reader closed its end."""
        while pending:
            if stop is not None and stop.is_set():
                return True
            try:
                written = os.writev(self.fd, _first_bytes(pending, slice_bytes))
            except BlockingIOError:  # someone made the shared description non-blocking
                _wait_writable_blocking(self.fd)
                continue
            except (BrokenPipeError, ConnectionResetError):
                self.broken = True
                return False
            _advance(pending, written)
        return True


def _byte_count(views: Sequence[memoryview]) -> int:
    """The number of bytes in ``views``."""
    return sum(len(view) for view in views)


def _first_bytes(pending: list[memoryview], limit: int) -> list[memoryview]:
    """Views of the first ``limit`` bytes of ``pending`` (at most MAX_WRITE_BUFFERS of them)."""
    batch: list[memoryview] = []
    total = 0
    for view in pending[:MAX_WRITE_BUFFERS]:
        if total + len(view) >= limit:
            batch.append(view[: limit - total])
            break
        batch.append(view)
        total += len(view)
    return batch


def _advance(pending: list[memoryview], written: int) -> None:
    """Drop the first ``written`` bytes from ``pending``."""
    while pending and written >= len(pending[0]):
        written -= len(pending.pop(0))
    if written:
        pending[0] = pending[0][written:]


def _nonblocking_description(fd: int) -> tuple[int, bool]:
    """A non-blocking descriptor writing where ``fd`` does, and whether it is ours to close.

    Reopening /proc/self/fd/N gives a new open file description of the same terminal or pipe,
    so O_NONBLOCK on it does not leak to the shell that shares ``fd``. Regular files are not
    reopened (the offset and O_APPEND live in the description); neither are sockets (they
    cannot be).
    """
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or (stat.S_ISCHR(mode) and os.isatty(fd))):
            return fd, False
        private = os.open(f"/proc/self/fd/{fd}",
                          os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return fd, False
    return private, True


def _socket_copy(fd: int) -> socket.socket | None:
    """A socket object on a duplicate of ``fd`` if it is a socket, else None."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return None
        copy = os.dup(fd)
    except OSError:
        return None
    try:
        return socket.socket(fileno=copy)
    except OSError:
        os.close(copy)
        return None


def _wait_writable_blocking(fd: int) -> None:
    select.select([], [fd], [])
