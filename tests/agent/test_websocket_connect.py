"""Opening the control channel's WebSocket against a rendezvous that accepts the connection and
then says nothing: the socket is closed at once when the connect times out or is cancelled (not
left open until collected), and the timeout names the step that took too long."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from trio_websocket import ConnectionTimeout

from agent.control_client import _describe
from agent.websocket_connect import open_websocket
from tests.agent.session_helpers import trio_test

CONNECT_TIMEOUT = 0.3
WAIT_SECONDS = 10


@asynccontextmanager
async def silent_server() -> AsyncIterator[tuple[int, list[trio.SocketStream]]]:
    """A TCP listener on loopback that accepts and never answers; the accepted streams."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    accepted: list[trio.SocketStream] = []

    async def accept_forever() -> None:
        while True:
            accepted.append(await listener.accept())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept_forever)
        yield listener.socket.getsockname()[1], accepted
        nursery.cancel_scope.cancel()
    for stream in accepted:
        await stream.aclose()
    await listener.aclose()


async def _connect(port: int, ssl_context: ssl.SSLContext | None = None) -> None:
    async with open_websocket(
        f"{'wss' if ssl_context else 'ws'}://127.0.0.1:{port}/v1/agent", ssl_context,
        max_message_size=1 << 16, message_queue_size=4,
        connect_timeout=CONNECT_TIMEOUT, disconnect_timeout=CONNECT_TIMEOUT,
    ):  # fmt: skip
        pytest.fail("the silent server completed a WebSocket handshake")


async def _closed_by_the_client(stream: trio.SocketStream, wait: float = WAIT_SECONDS) -> bool:
    """Whether the peer of ``stream`` has closed its end (EOF after whatever it sent)."""
    with trio.move_on_after(wait):
        while await stream.receive_some(65536):
            pass
        return True
    return False


@trio_test
async def test_a_websocket_handshake_that_times_out_closes_its_socket_at_once() -> None:
    async with silent_server() as (port, accepted):
        with pytest.raises(ConnectionTimeout) as caught:
            await _connect(port)
        # Kept referenced (as a caller's logging or retry loop would): nothing may rely on the
        # stream being collected.
        assert len(accepted) == 1
        assert await _closed_by_the_client(accepted[0])
        assert "WebSocket handshake timed out" in str(caught.value)
        assert _describe(caught.value).startswith("the WebSocket handshake timed out after")


@trio_test
async def test_a_connect_cancelled_mid_handshake_closes_its_socket_at_once() -> None:
    closed: list[bool] = []
    async with silent_server() as (port, accepted):
        with trio.move_on_after(CONNECT_TIMEOUT / 2) as stopped:  # the agent stops
            try:
                await _connect(port)
            except BaseException:  # Cancelled (in a group when the reader task had started)
                # While the cancellation is still on its way out (its traceback holding what
                # the connect left): the socket is closed already, not when it is collected.
                with trio.CancelScope(shield=True):
                    closed.append(await _closed_by_the_client(accepted[0], wait=1.0))
                raise
        assert stopped.cancelled_caught
        assert len(accepted) == 1
        assert closed == [True]


@trio_test
async def test_a_tls_handshake_that_times_out_is_named_as_such() -> None:
    async with silent_server() as (port, accepted):
        with pytest.raises(ConnectionTimeout) as caught:
            await _connect(port, ssl.create_default_context())
        assert _describe(caught.value).startswith("the TLS handshake timed out after")
        assert "WebSocket" not in _describe(caught.value)
        assert await _closed_by_the_client(accepted[0])
