"""The local end of a session: reading our stdin and writing our stdout/stderr under trio.

The descriptors are shared with the shell that started us, so they are never switched to
non-blocking mode (that would leak into the shell after we exit). Pipes and terminals are waited
on with trio's readiness API and then read once, which cannot block; regular files and
/dev/null, which epoll refuses, are read in a worker thread instead (they never block for long).
"""

from __future__ import annotations

import errno
import os
import select
from collections.abc import Sequence

import trio

READ_CHUNK_BYTES = 64 * 1024
# Buffers per writev call (Linux's IOV_MAX is 1024).
MAX_WRITE_BUFFERS = 1024


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
    """Writes whole buffers to one file descriptor; ``broken`` once the reader has gone away."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.broken = False

    def write(self, data: bytes) -> bool:
        """Write all of ``data``; False (and ``broken``) if the reader closed its end (EPIPE)."""
        return self.write_many((data,))

    def write_many(self, chunks: Sequence[bytes]) -> bool:
        """``write`` for several buffers in order, with as few system calls as they allow."""
        if self.broken:
            return False
        pending = [memoryview(chunk) for chunk in chunks if chunk]
        while pending:
            try:
                written = os.writev(self.fd, pending[:MAX_WRITE_BUFFERS])
            except BlockingIOError:
                _wait_writable_blocking(self.fd)
                continue
            except (BrokenPipeError, ConnectionResetError):
                self.broken = True
                return False
            while pending and written >= len(pending[0]):
                written -= len(pending.pop(0))
            if written:
                pending[0] = pending[0][written:]
        return True


def _wait_writable_blocking(fd: int) -> None:
    select.select([], [fd], [])
