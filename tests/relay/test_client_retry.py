"""connect_tcp retries a refusal sent before the relay read the token, and nothing else."""

from __future__ import annotations

import pytest
import trio

from protocol.identity import SigningIdentity
from protocol.relay_token import Side
from relay import client
from relay.client import MAX_RETRY_SECONDS, connect_tcp
from relay.errors import RelayRefusedError
from relay.wire import Reason, encode_hello

from .harness import make_token, running_relay, trio_test


@pytest.fixture
def signer() -> SigningIdentity:
    return SigningIdentity.generate()


def accepted(relay) -> float:
    return relay.metrics.registry.get_sample_value(
        "tucdesk_relay_connections_accepted_total", {}
    ) or 0.0


@trio_test
async def test_a_burst_over_the_rate_limit_is_retried_and_pairs(signer):
    # One connection at once, then five a second: the second side is refused rate_limited
    # (before its token is read) and gets in on a retry.
    async with running_relay(signer, rate_limit=5, rate_burst=1) as relay:
        streams = {}

        async def join(side: Side) -> None:
            streams[side] = await connect_tcp(
                *relay.tcp_address, make_token(signer, "burst", side), pair_timeout=5
            )

        async with trio.open_nursery() as nursery:
            for side in Side:
                nursery.start_soon(join, side)
        assert relay.metrics.refusal_count("tcp", "rate_limited") >= 1
        await streams[Side.OPERATOR].send_all(b"ok")
        assert await streams[Side.AGENT].receive_some(10) == b"ok"
        for stream in streams.values():
            await stream.aclose()


@trio_test
async def test_a_lasting_rate_limit_fails_after_three_tries_within_the_bound(signer):
    async with running_relay(signer, rate_limit=0.001, rate_burst=1) as relay:
        await (await trio.open_tcp_stream(*relay.tcp_address)).aclose()
        started = trio.current_time()
        with pytest.raises(RelayRefusedError) as refused:
            await connect_tcp(*relay.tcp_address, make_token(signer, "lasting", Side.AGENT))
        assert refused.value.reason == Reason.RATE_LIMITED
        assert str(refused.value) == "the relay refused the connection: rate_limited"
        assert trio.current_time() - started <= MAX_RETRY_SECONDS + 0.5
        assert accepted(relay) == 1 + client.CONNECT_ATTEMPTS


@pytest.mark.parametrize("reason", [Reason.TOKEN_REUSED, Reason.TOO_MANY_WAITING])
@trio_test
async def test_a_refusal_after_the_token_was_read_is_never_retried(signer, reason):
    async with running_relay(signer, max_waiting=1) as relay:
        waiting = await trio.open_tcp_stream(*relay.tcp_address)
        token = make_token(signer, "once", Side.AGENT)
        await waiting.send_all(encode_hello(token))
        assert await waiting.receive_some(8) == b"waiting\n"
        before = accepted(relay)
        again = token if reason == Reason.TOKEN_REUSED else make_token(signer, "two", Side.AGENT)
        with pytest.raises(RelayRefusedError) as refused:
            await connect_tcp(*relay.tcp_address, again)
        assert refused.value.reason == reason
        assert accepted(relay) == before + 1
        await waiting.aclose()
