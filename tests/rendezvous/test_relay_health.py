"""Sessions avoid a configured relay that refuses connections (rendezvous/relay_health.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from rendezvous.config import RelayEndpoint
from rendezvous.relay_health import RelayHealth, check_relays_forever, reachable
from rendezvous.store import Store
from tests.rendezvous.sessions_support import agent_channel, enroll_agent, served_instance

pytestmark = pytest.mark.anyio

SESSIONS = 12
WAIT_SECONDS = 10.0


@contextmanager
def listening_port() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel completes them from the backlog)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield listener.getsockname()[1]


@contextmanager
def refusing_port() -> Iterator[int]:
    """A loopback port held but not listening: a connection to it is refused."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]


async def test_reachable_tells_a_listening_relay_from_one_that_refuses() -> None:
    with listening_port() as up, refusing_port() as down:
        assert await reachable(RelayEndpoint("up", "127.0.0.1", up))
        assert not await reachable(RelayEndpoint("down", "127.0.0.1", down))


def test_when_every_relay_is_down_every_relay_stays_a_candidate() -> None:
    relays = (RelayEndpoint("a", "127.0.0.1", 1), RelayEndpoint("b", "127.0.0.1", 2))
    health = RelayHealth()
    health.mark(relays[0], reachable=False)
    assert {health.choose(relays).id for _ in range(40)} == {"b"}
    health.mark(relays[1], reachable=False)
    assert {health.choose(relays).id for _ in range(40)} == {"a", "b"}
    health.mark(relays[0], reachable=True)
    assert {health.choose(relays).id for _ in range(40)} == {"a"}


async def test_sessions_go_only_to_the_relay_that_accepts_connections(
    store: Store, tmp_path: Path
) -> None:
    with listening_port() as up, refusing_port() as down:
        relays = (f"relay-up=127.0.0.1:{up}", f"relay-down=127.0.0.1:{down}")
        async with served_instance(
            store, tmp_path / "data", relays=relays, relay_check_seconds=0.2
        ) as (service, url), trio.open_nursery() as nursery:
            nursery.start_soon(check_relays_forever, service.ctx)
            team = await service.team("ops")
            admin = await service.operator(team, "admin")
            operator = await service.operator(team, "operator")
            agent = await enroll_agent(service, admin)
            with trio.fail_after(WAIT_SECONDS):
                while "relay-down" not in service.ctx.relay_health.down:  # noqa: ASYNC110 - the check task sets it
                    await trio.sleep(0.05)
            chosen = set()
            async with agent_channel(url, agent) as channel:
                for _ in range(SESSIONS):
                    body = {"target": "web-1", "mode": "exec", "command": ["true"]}
                    response = await service.call(operator, "POST", "/v1/sessions", body)
                    assert response.status_code == 201, response.text
                    chosen.add(response.json()["relay"]["id"])
                    await channel.receive("session_offer")
            nursery.cancel_scope.cancel()
    assert chosen == {"relay-up"}
