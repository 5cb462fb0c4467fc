"""Several rendezvous instances on one PostgreSQL database broker sessions as one."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from protocol.relay_token import Side, verify_relay_token
from protocol.session_grant import verify_session_grant
from rendezvous.store import open_store
from tests.pg_cluster import PostgresCluster
from tests.rendezvous.sessions_support import (
    agent_channel,
    enroll_agent,
    jwt_issuer_keys,
    relay_token_keys,
    served_instance,
    wait_for_session_state,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

_numbers = itertools.count(1)


@pytest.fixture
def shared_database(postgres_cluster: PostgresCluster) -> str:
    """A fresh PostgreSQL database for two instances to share."""
    return postgres_cluster.create_database(f"instances_{os.getpid()}_{next(_numbers)}")


async def test_offer_requested_at_one_instance_reaches_an_agent_held_by_another(
    shared_database: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"  # one service: the instances share their keys
    async with (
        open_store(shared_database) as store_a,
        open_store(shared_database) as store_b,
        served_instance(store_a, data) as (instance_a, _),
        served_instance(store_b, data) as (instance_b, url_b),
    ):
        assert instance_a.ctx.instance_id != instance_b.ctx.instance_id
        team = await instance_a.team("ops")
        admin = await instance_a.operator(team, "admin")
        agent = await enroll_agent(instance_a, admin)
        async with agent_channel(url_b, agent) as channel:
            assert instance_a.ctx.connections is not None
            assert not instance_a.ctx.connections.channels(team, agent.agent_id)
            body = {"target": "web-1", "mode": "exec", "command": ["hostname"]}
            response = await instance_a.call(admin, "POST", "/v1/sessions", body)
            assert response.status_code == 201, response.text
            offer = await channel.receive("session_offer")
            answer = response.json()
            assert offer["session_id"] == answer["session_id"]
            now = instance_b.clock.now
            agent_side = verify_relay_token(
                offer["relay_token"], relay_token_keys(instance_a), relay_id="relay-1",
                issuer=instance_a.config.issuer, now=now,
            )  # fmt: skip
            assert (agent_side.session_id, agent_side.side) == (offer["session_id"], Side.AGENT)
            verify_session_grant(
                answer["grant"], jwt_issuer_keys(instance_b), issuer=instance_b.config.issuer,
                agent_id=agent.agent_id, team_id=team, session_id=offer["session_id"],
                operator_key_thumbprint=admin.identity.public.key_id, now=now,
            )  # fmt: skip

            # The agent's answer lands on B; A sees it through the shared database.
            await channel.send({"type": "session_offer_ack", "session_id": offer["session_id"]})
            await wait_for_session_state(instance_a, admin, offer["session_id"], "accepted")


async def test_offer_for_a_channel_that_closed_meanwhile_is_marked_refused(
    shared_database: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with (
        open_store(shared_database) as store_a,
        open_store(shared_database) as store_b,
        served_instance(store_a, data) as (instance_a, _),
        served_instance(store_b, data) as (instance_b, _),
    ):
        team = await instance_a.team("ops")
        admin = await instance_a.operator(team, "admin")
        agent = await enroll_agent(instance_a, admin)
        # B believes it holds a channel (as if it closed right after the lookup).
        await store_b.mark_agent_connected(
            team, agent.agent_id, instance_b.ctx.instance_id, "conn_gone", "machine-1",
            instance_b.clock.now,
        )  # fmt: skip
        response = await instance_a.call(admin, "POST", "/v1/sessions",
                                         {"target": "web-1", "mode": "shell"})
        assert response.status_code == 201, response.text
        view = await wait_for_session_state(
            instance_a, admin, response.json()["session_id"], "refused"
        )
        assert "gone" in view["reason"]
