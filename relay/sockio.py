"""Async I/O on plain non-blocking sockets, driven by trio's readiness waits.

The relay keeps standard-library sockets (not trio socket wrappers) so the data path can hand
raw descriptors to os.splice; these helpers give the few awaitable operations it needs.
"""

from __future__ import annotations

import errno
import socket

import trio

CONNECTION_LOST_ERRORS = (ConnectionError, BrokenPipeError, TimeoutError)


async def recv_exactly(sock: socket.socket, size: int) -> bytes:
    """Receive exactly ``size`` bytes; raise EOFError if the peer closes first."""
    chunks = bytearray()
    while len(chunks) < size:
        try:
            data = sock.recv(size - len(chunks))
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not data:
            raise EOFError("peer closed the connection")
        chunks += data
    return bytes(chunks)


async def recv_line(sock: socket.socket, max_size: int) -> bytes:
    """Receive one ``\\n``-terminated line of at most ``max_size`` bytes, one byte at a time.

    Byte-wise reads never consume data that follows the line, which belongs to the session.
    """
    line = bytearray()
    while not line.endswith(b"\n"):
        if len(line) >= max_size:
            raise EOFError("line is longer than allowed")
        line += await recv_exactly(sock, 1)
    return bytes(line)


async def send_all(sock: socket.socket, data: bytes | memoryview) -> None:
    """Send all of ``data``, waiting for the socket to be writable as needed."""
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


def send_now(sock: socket.socket, data: bytes) -> bool:
    """Best-effort send without waiting (for a last status line); return whether all was sent."""
    try:
        return sock.send(data) == len(data)
    except OSError:
        return False


def peek_state(sock: socket.socket) -> str:
    """Without consuming anything: "data" if bytes are waiting, "eof" if closed, "empty" if not."""
    try:
        data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return "empty"
    except OSError:
        return "eof"
    return "data" if data else "eof"


def shutdown_write(sock: socket.socket) -> None:
    """Half-close: tell the peer no more bytes are coming, keep reading."""
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError as error:
        if error.errno not in (errno.ENOTCONN, errno.EBADF):
            raise


def close_socket(sock: socket.socket) -> None:
    """Close a socket other tasks may be waiting on, waking them first."""
    if sock.fileno() != -1:
        trio.lowlevel.notify_closing(sock)
    sock.close()
