"""A hello_timeout refusal is retried: the relay sends it while the hello is still arriving,
before it read the token (relay/tcp.py _read_hello), so the token is unspent and the retry
pairs. Under load a client's hello can reach the relay late (1 of 100 parallel execs)."""

from __future__ import annotations

import pytest
import trio

from protocol.identity import SigningIdentity
from protocol.relay_token import Side
from relay.client import connect_tcp
from relay.wire import Reason

from .harness import make_token, running_relay, trio_test

HELLO_TIMEOUT_SECONDS = 2.0  # the least the relay accepts (relay/config.py)


@pytest.fixture
def signer() -> SigningIdentity:
    return SigningIdentity.generate()


async def _pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
    try:
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await sink.aclose()


async def _slow_path_then_fast(
    relay_address: tuple[str, int], task_status: trio.TaskStatus[int]
) -> None:
    """A loopback forwarder to the relay whose first connection never delivers the client's
    bytes (as a hello stuck behind a loaded host), so the relay times that hello out; later
    connections are forwarded as they come."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    first = True
    async with trio.open_nursery() as nursery:
        while True:
            client = await listeners[0].accept()
            upstream = await trio.open_tcp_stream(*relay_address)
            if first:
                first = False
                nursery.start_soon(_pipe, upstream, client)
                nursery.start_soon(_discard, client)
            else:
                nursery.start_soon(_pipe, client, upstream)
                nursery.start_soon(_pipe, upstream, client)


async def _discard(stream: trio.SocketStream) -> None:
    try:
        while await stream.receive_some(65536):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@trio_test
async def test_a_hello_timed_out_by_the_relay_is_retried_and_pairs_with_the_same_token(signer):
    async with running_relay(signer, hello_timeout=HELLO_TIMEOUT_SECONDS,
                             pair_timeout=10.0) as relay:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(_slow_path_then_fast, relay.tcp_address)
            streams = {}

            async def join(side: Side, address: tuple[str, int]) -> None:
                streams[side] = await connect_tcp(
                    *address, make_token(signer, "slow-hello", side), pair_timeout=10
                )

            async with trio.open_nursery() as sides:
                sides.start_soon(join, Side.AGENT, ("127.0.0.1", port))
                sides.start_soon(join, Side.OPERATOR, relay.tcp_address)
            assert relay.metrics.refusal_count("tcp", Reason.HELLO_TIMEOUT.value) == 1
            await streams[Side.AGENT].send_all(b"ok")
            assert await streams[Side.OPERATOR].receive_some(10) == b"ok"
            for stream in streams.values():
                await stream.aclose()
            nursery.cancel_scope.cancel()
