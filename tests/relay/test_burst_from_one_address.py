"""A burst of sessions from one address under the default limits: every one pairs."""

from __future__ import annotations

import trio

from protocol.identity import SigningIdentity
from protocol.relay_token import Side
from relay.client import connect_tcp

from .harness import make_token, running_relay, trio_test

SESSIONS = 20  # 40 connections at once from 127.0.0.1: the default burst


@trio_test
async def test_forty_parallel_connections_from_one_address_all_pair_under_default_limits():
    signer = SigningIdentity.generate()
    async with running_relay(signer, rate_limit=10.0, rate_burst=40,
                             max_pending_per_source=10) as relay:
        streams: list[trio.SocketStream] = []

        async def join(session: int, side: Side) -> None:
            token = make_token(signer, f"burst-{session}", side)
            streams.append(await connect_tcp(*relay.tcp_address, token, pair_timeout=10))

        async with trio.open_nursery() as nursery:
            for session in range(SESSIONS):
                for side in Side:
                    nursery.start_soon(join, session, side)
        assert len(streams) == 2 * SESSIONS
        # None was refused, not even one a retry would have saved.
        for reason in ("rate_limited", "too_many_connections"):
            assert relay.metrics.refusal_count("tcp", reason) == 0
        for stream in streams:
            await stream.aclose()
