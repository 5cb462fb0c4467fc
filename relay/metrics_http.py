"""A minimal HTTP/1.1 responder for ``GET /metrics`` on trio: nothing else is served."""

from __future__ import annotations

import socket
from collections.abc import Callable

import trio

from relay.admission import DESCRIPTOR_EXHAUSTION_ERRORS, SpareDescriptor
from relay.sockio import close_socket, send_all

MAX_REQUEST_HEAD_SIZE = 8 * 1024
REQUEST_TIMEOUT_SECONDS = 5.0
MAX_CONCURRENT_SCRAPES = 16
ACCEPT_ERROR_BACKOFF_SECONDS = 0.1
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def metrics_response(request_head: bytes, exposition: Callable[[], bytes]) -> bytes:
    """The HTTP response for a request head: the exposition for GET /metrics, 404 otherwise."""
    request_line = request_head.split(b"\r\n", 1)[0]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _response("400 Bad Request", b"bad request\n")
    method, target = parts[0], parts[1].split(b"?", 1)[0]
    if target != b"/metrics":
        return _response("404 Not Found", b"only /metrics is served here\n")
    if method not in (b"GET", b"HEAD"):
        return _response("405 Method Not Allowed", b"use GET\n")
    body = exposition()
    response = _response("200 OK", body, CONTENT_TYPE)
    return response[: len(response) - len(body)] if method == b"HEAD" else response


async def serve_metrics(
    listener: socket.socket,
    exposition: Callable[[], bytes],
    *,
    spare: SpareDescriptor | None = None,
    on_accept_failed: Callable[[OSError], None] | None = None,
) -> None:
    """Answer metrics scrapes on ``listener`` until cancelled.

    ``spare`` (a descriptor held back, opened by the caller before the relay takes clients;
    by default opened here) lets scrapes still be answered, one at a time on its descriptor,
    when a flood has taken every descriptor the process may open. It is closed on return.
    """
    limiter = trio.CapacityLimiter(MAX_CONCURRENT_SCRAPES)
    if spare is None:
        spare = SpareDescriptor()
    try:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    sock, _ = listener.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(listener)
                    continue
                except OSError as error:
                    if on_accept_failed is not None:
                        on_accept_failed(error)
                    if error.errno in DESCRIPTOR_EXHAUSTION_ERRORS:
                        spare.reopen()  # if a scrape's close could not take it back
                        spared = spare.accept_instead(listener)
                        if spared is not None:
                            spared.setblocking(False)
                            # The spare is taken back as soon as this scrape's socket closes.
                            nursery.start_soon(_answer, spared, exposition, limiter, spare.reopen)
                            continue
                    await trio.sleep(ACCEPT_ERROR_BACKOFF_SECONDS)
                    continue
                sock.setblocking(False)
                nursery.start_soon(_answer, sock, exposition, limiter)
    finally:
        spare.close()


async def _answer(
    sock: socket.socket,
    exposition: Callable[[], bytes],
    limiter: trio.CapacityLimiter,
    after_close: Callable[[], None] | None = None,
) -> None:
    try:
        async with limiter:
            with trio.move_on_after(REQUEST_TIMEOUT_SECONDS):
                head = bytearray()
                while b"\r\n\r\n" not in head and len(head) < MAX_REQUEST_HEAD_SIZE:
                    try:
                        data = sock.recv(MAX_REQUEST_HEAD_SIZE - len(head))
                    except BlockingIOError:
                        await trio.lowlevel.wait_readable(sock)
                        continue
                    if not data:
                        return
                    head += data
                await send_all(sock, metrics_response(bytes(head), exposition))
    except OSError:
        pass
    finally:
        close_socket(sock)
        if after_close is not None:
            after_close()
