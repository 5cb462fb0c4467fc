"""connect_tcp retries a refusal sent before the relay read the token, and nothing else."""

from __future__ import annotations

import dataclasses

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
async def test_a_lasting_rate_limit_is_retried_with_growing_jittered_pauses_within_the_bound(
    signer, monkeypatch
):
    # A short bound keeps the test quick; the schedule is the real one.
    monkeypatch.setattr(client, "MAX_RETRY_SECONDS", 3.0)
    async with running_relay(signer, rate_limit=0.001, rate_burst=1) as relay:
        await (await trio.open_tcp_stream(*relay.tcp_address)).aclose()
        started = trio.current_time()
        with pytest.raises(RelayRefusedError) as refused:
            await connect_tcp(*relay.tcp_address, make_token(signer, "lasting", Side.AGENT))
        assert refused.value.reason == Reason.RATE_LIMITED
        assert str(refused.value) == "the relay refused the connection: rate_limited"
        took = trio.current_time() - started
        assert 3.0 - 1.5 <= took <= 3.0 + 0.5
        # 0.25, 0.5, then 1 s pauses, each jittered to 50-150 %: 3 to 8 tries in 3 s.
        assert 1 + 3 <= accepted(relay) <= 1 + 8


def test_the_retry_bound_rides_out_a_burst_inside_the_pairing_window():
    # A side that got in first waits the relay's pair_timeout for this one, and the tokens
    # the rendezvous mints live SESSION_OFFER_SECONDS: retrying must end well before either.
    from relay.config import RelayConfig
    from rendezvous.session_broker import SESSION_OFFER_SECONDS

    pair_timeout = next(field.default for field in dataclasses.fields(RelayConfig)
                        if field.name == "pair_timeout")
    assert isinstance(pair_timeout, float)
    assert 10.0 <= MAX_RETRY_SECONDS <= pair_timeout - 10.0
    assert MAX_RETRY_SECONDS < SESSION_OFFER_SECONDS / 2
    pauses = [client._retry_delay(attempt, 0.0) for attempt in range(1, 40)]
    assert all(pause is not None and pause <= 1.5 * client.RETRY_MAX_BACKOFF_SECONDS
               for pause in pauses)
    assert client._retry_delay(1, MAX_RETRY_SECONDS) is None


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
