"""Opening the control channel's WebSocket so that a failed TLS handshake ends the attempt at once.

trio-websocket's ``open_websocket_url`` leaves the TLS handshake to the first write, which its
background reader task makes; when that write fails (the rendezvous's certificate does not
verify) the reader task ends quietly and the connect waits out the whole connect timeout, then
reports only ``ConnectionTimeout``. Here the TCP connect and the TLS handshake happen first, in
the open, so their error (``ssl.SSLCertVerificationError`` inside the chain) ends the attempt as
soon as the handshake fails; only then is the stream handed to trio-websocket for the WebSocket
handshake. Failures keep trio-websocket's types: ``ConnectionTimeout`` when the whole connect
takes too long (its message names the step: TCP connect, TLS handshake or WebSocket handshake),
``HandshakeError`` (from the real cause) when TCP or TLS fails. The stream is closed at once when
anything fails or is cancelled before the WebSocket is handed over.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import NoReturn
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    ConnectionTimeout,
    DisconnectionTimeout,
    HandshakeError,
    WebSocketConnection,
    wrap_client_stream,
)

DEFAULT_PORTS = {"ws": 80, "wss": 443}
# The steps of a connect, as a ConnectionTimeout's message names the one that took too long.
TCP_PHASE = "TCP connect"
TLS_PHASE = "TLS handshake"
WEBSOCKET_PHASE = "WebSocket handshake"


@dataclass(frozen=True)
class WebSocketTarget:
    """Where a ws:// or wss:// URL points: host and port to connect to, Host header, resource."""

    host: str
    port: int
    host_header: str
    resource: str


def websocket_target(url: str) -> WebSocketTarget:
    """Split a ws:// or wss:// URL; ValueError for any other scheme or a URL without a host."""
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"not a WebSocket URL: {url!r}")
    if not parts.hostname:
        raise ValueError(f"the WebSocket URL {url!r} has no host")
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    # netloc keeps an IPv6 address's brackets, which the Host header needs.
    host_header = parts.netloc.rpartition("@")[2]
    if parts.port == DEFAULT_PORTS[parts.scheme]:
        host_header = host_header.rpartition(":")[0]
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WebSocketTarget(parts.hostname, port, host_header, resource)


@asynccontextmanager
async def open_websocket(
    url: str,
    ssl_context: ssl.SSLContext | None,
    *,
    max_message_size: int,
    message_queue_size: int,
    connect_timeout: float,
    disconnect_timeout: float,
) -> AsyncIterator[WebSocketConnection]:
    """A client WebSocket to ``url`` (TLS with ``ssl_context`` when given), closed on exit."""
    target = websocket_target(url)
    phase = [TCP_PHASE]
    try:
        async with trio.open_nursery() as nursery:
            try:
                with trio.fail_after(connect_timeout):
                    stream = await _open_stream(target, ssl_context, phase)
                    phase[0] = WEBSOCKET_PHASE
                    try:
                        websocket = await wrap_client_stream(
                            nursery, stream, target.host_header, target.resource,
                            max_message_size=max_message_size,
                            message_queue_size=message_queue_size,
                        )  # fmt: skip
                    except BaseException:
                        # Timed out, cancelled (the agent stops) or refused: the socket is
                        # closed now, not whenever the stream is collected.
                        await trio.aclose_forcefully(stream)
                        raise
            except trio.TooSlowError:
                raise ConnectionTimeout(
                    f"the {phase[0]} timed out after {connect_timeout:g} s"
                ) from None
            try:
                yield websocket
            finally:
                with trio.move_on_after(disconnect_timeout) as closing:
                    await websocket.aclose()
                if closing.cancelled_caught:
                    raise DisconnectionTimeout
    except BaseExceptionGroup as group:
        # The reader task ends quietly, so a group holds the one error of the connect or the
        # caller's block; re-raise that alone, as trio-websocket's own context manager does.
        if len(group.exceptions) == 1:
            _reraise(group.exceptions[0])
        raise


async def _open_stream(
    target: WebSocketTarget, ssl_context: ssl.SSLContext | None, phase: list[str]
) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    """TCP, then the TLS handshake when ``ssl_context`` is given; HandshakeError if either fails.
    ``phase[0]`` names the step under way (for a timeout's message)."""
    try:
        tcp = await trio.open_tcp_stream(target.host, target.port)
    except OSError as error:
        raise HandshakeError from error
    if ssl_context is None:
        return tcp
    phase[0] = TLS_PHASE
    stream = trio.SSLStream(tcp, ssl_context, server_hostname=target.host, https_compatible=True)
    try:
        await stream.do_handshake()
    except BaseException as error:
        await trio.aclose_forcefully(stream)
        if isinstance(error, trio.BrokenResourceError):
            raise HandshakeError from error
        raise
    return stream


def _reraise(error: BaseException) -> NoReturn:
    """Raise ``error`` again without making the group it came out of its context."""
    context = error.__context__
    try:
        raise error
    finally:
        error.__context__ = context
