"""A hello dropped to make room never spends its token: the client's retry of
too_many_connections (relay/client.py) gets in with the same token instead of token_reused."""

from __future__ import annotations

import socket

import pytest
import trio

from protocol.identity import SigningIdentity
from protocol.relay_token import Side
from relay.client import connect_tcp
from relay.wire import encode_hello

from .harness import make_token, running_relay, trio_test, wait_until


@pytest.fixture
def signer() -> SigningIdentity:
    return SigningIdentity.generate()


def read_status(sock: socket.socket) -> str:
    sock.settimeout(5)
    line = b""
    while not line.endswith(b"\n"):
        data = sock.recv(1)
        if not data:
            break
        line += data
    return line.decode().strip()


@trio_test
async def test_a_hello_evicted_after_it_arrived_does_not_spend_its_token(signer):
    async with running_relay(signer, max_pending=1, max_pending_per_source=1) as relay:
        operator_token = make_token(signer, "evicted", Side.OPERATOR)
        # Without yielding to the relay: A connects and its whole hello is buffered, then B
        # connects, so the accept loop takes both in one batch and B's slot evicts A's before
        # A's task runs (it then finds its hello already there, with no checkpoint).
        first = socket.create_connection(relay.tcp_address)
        first.sendall(encode_hello(operator_token))
        second = socket.create_connection(relay.tcp_address)
        try:
            await trio.sleep(0.2)
            assert await trio.to_thread.run_sync(read_status, first) == "too_many_connections"
        finally:
            first.close()
            second.close()
        # The retry with the same token is taken: it was not remembered as used.
        streams = {}

        async def join(side: Side, token: str) -> None:
            streams[side] = await connect_tcp(*relay.tcp_address, token, pair_timeout=5)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(join, Side.OPERATOR, operator_token)
            nursery.start_soon(join, Side.AGENT, make_token(signer, "evicted", Side.AGENT))
        await streams[Side.OPERATOR].send_all(b"through")
        assert await streams[Side.AGENT].receive_some(100) == b"through"
        assert relay.metrics.refusal_count("tcp", "token_reused") == 0
        for stream in streams.values():
            await stream.aclose()


@trio_test
async def test_a_hello_evicted_after_its_token_was_accepted_goes_on_to_pair(signer, monkeypatch):
    async with running_relay(signer, max_pending=1, max_pending_per_source=1) as relay:
        admission = relay.tcp.admission
        real_check_token = admission.check_token
        evicted = []

        def check_then_evict(token: str, now_wall: float):
            # The accept loop may run between the token check and the end of the hello phase
            # (a JWKS refetch woke the task): a newcomer then evicts this hello's slot for real.
            checked = real_check_token(token, now_wall)
            if relay.tcp.waiting and not evicted:
                newcomer = admission.admit_connection(("127.0.0.9", 40000), trio.current_time())
                evicted.append(newcomer)
            return checked

        monkeypatch.setattr(admission, "check_token", check_then_evict)
        streams = {}

        async def join(side: Side) -> None:
            streams[side] = await connect_tcp(
                *relay.tcp_address, make_token(signer, "late-evict", side), pair_timeout=5
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(join, Side.AGENT)
            await wait_until(lambda: len(relay.tcp.waiting) == 1)
            # Only the operator's hello is pending now: the newcomer evicts exactly it.
            nursery.start_soon(join, Side.OPERATOR)
        admission.hello_finished(evicted[0])
        await streams[Side.OPERATOR].send_all(b"through")
        assert await streams[Side.AGENT].receive_some(100) == b"through"
        assert relay.metrics.refusal_count("tcp", "token_reused") == 0
        assert relay.metrics.refusal_count("tcp", "too_many_connections") == 0
        for stream in streams.values():
            await stream.aclose()
