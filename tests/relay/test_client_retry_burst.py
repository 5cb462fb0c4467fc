"""A fleet-wide exec from one address (a CI runner, a NAT): more sessions at once than the
relay's default burst, every one pairs because connect_tcp rides out the rate limit."""

from __future__ import annotations

import dataclasses

import pytest
import trio

from protocol.identity import SigningIdentity
from protocol.relay_token import Side
from relay.client import connect_tcp
from relay.config import RelayConfig

from .harness import make_token, running_relay, trio_test

# The relay's own defaults (tucdesk-relay with no options): 10 a second, a burst of 40.
DEFAULTS = {field.name: field.default for field in dataclasses.fields(RelayConfig)}
def agent_address(session: int) -> str:
    """Each agent on a host of its own (loopback answers for all of 127.0.0.0/8)."""
    return f"127.0.{1 + session // 250}.{1 + session % 250}"


async def open_all(relay, signer: SigningIdentity, sessions: int, *, agents_apart: bool) -> int:
    """Open ``sessions`` sessions at once, every operator side from 127.0.0.1; return how many
    paired and carried a byte each way."""
    streams: dict[tuple[int, Side], trio.SocketStream] = {}

    async def join(session: int, side: Side) -> None:
        token = make_token(signer, f"fleet-{session}", side)
        if agents_apart and side is Side.AGENT:
            streams[session, side] = await connect_tcp(
                *relay.tcp_address, token, pair_timeout=DEFAULTS["pair_timeout"],
                local_host=agent_address(session),
            )
        else:  # the relay listens on loopback, so connections come from 127.0.0.1
            streams[session, side] = await connect_tcp(
                *relay.tcp_address, token, pair_timeout=DEFAULTS["pair_timeout"]
            )

    async with trio.open_nursery() as nursery:
        for session in range(sessions):
            for side in Side:
                nursery.start_soon(join, session, side)
    carried = 0
    for session in range(sessions):
        operator, agent = streams[session, Side.OPERATOR], streams[session, Side.AGENT]
        await operator.send_all(b"%d" % session)
        await agent.send_all(b"ok")
        if (await agent.receive_some(16) == b"%d" % session
                and await operator.receive_some(16) == b"ok"):
            carried += 1
        await operator.aclose()
        await agent.aclose()
    return carried


@pytest.mark.parametrize(
    ("sessions", "agents_apart"),
    [
        (50, False),  # the loopback repro: both sides of 50 execs from one address
        (100, True),  # 100 execs from one runner, each agent on its own host
    ],
)
@trio_test
async def test_more_sessions_from_one_address_than_the_default_burst_all_pair(
    sessions: int, agents_apart: bool
) -> None:
    signer = SigningIdentity.generate()
    async with running_relay(
        signer, rate_limit=DEFAULTS["rate_limit"], rate_burst=DEFAULTS["rate_burst"],
        pair_timeout=DEFAULTS["pair_timeout"],
    ) as relay:
        assert await open_all(relay, signer, sessions, agents_apart=agents_apart) == sessions
        # The burst really was over the limit: the relay refused, the clients came back.
        assert relay.metrics.refusal_count("tcp", "rate_limited") > 0
