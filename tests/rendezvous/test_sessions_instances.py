"""Several rendezvous instances on one PostgreSQL database broker sessions as one."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from protocol.relay_token import Side, verify_relay_token
from protocol.session_grant import verify_session_grant
from rendezvous.offer_bus import OFFER_CHANNEL
from rendezvous.store import SessionState, open_store
from tests.pg_cluster import PostgresCluster
from tests.rendezvous.service_harness import ServiceHarness
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


def rejected(service: ServiceHarness, reason: str) -> float:
    """The instance's ``tucdesk_rejected_inputs_total`` for ``reason``."""
    registry = service.ctx.metrics.registry
    return registry.get_sample_value("tucdesk_rejected_inputs_total", {"reason": reason}) or 0.0


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


async def test_malformed_offer_notices_are_counted_and_deliver_nothing(
    shared_database: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with (
        open_store(shared_database) as store_a,
        open_store(shared_database) as store_b,
        served_instance(store_a, data) as (instance_a, _),
        served_instance(store_b, data) as (instance_b, url_b),
    ):
        team = await instance_a.team("ops")
        admin = await instance_a.operator(team, "admin")
        agent = await enroll_agent(instance_a, admin)
        body = {"target": "web-1", "mode": "exec", "command": ["hostname"]}
        async with agent_channel(url_b, agent) as channel:
            response = await instance_a.call(admin, "POST", "/v1/sessions", body)
            assert response.status_code == 201, response.text
            offered = response.json()["session_id"]
            assert (await channel.receive("session_offer"))["session_id"] == offered

            b = instance_b.ctx.instance_id
            valid = {"instance": b, "team_id": team, "session_id": offered}
            malformed_offers = [
                {**valid, "team_id": 7},
                {**valid, "session_id": [offered]},
                {**valid, "instance": [b]},
                {"instance": b, "team_id": team},
            ]
            for fields in malformed_offers:
                await store_a.notify(OFFER_CHANNEL, json.dumps(fields))
            # Not an offer notice at all: not JSON, not an object, a kind no instance sends.
            for text in ("{", json.dumps([valid]), json.dumps({**valid, "kind": "offer"})):
                await store_a.notify(OFFER_CHANNEL, text)

            # Notices are handled in order: once the next offer arrives, B has read them all,
            # and none of them re-sent the first offer or refused it.
            response = await instance_a.call(admin, "POST", "/v1/sessions", body)
            assert response.status_code == 201, response.text
            following = response.json()["session_id"]
            assert (await channel.receive())["session_id"] == following
            session = await store_b.get_session(team, offered)
            assert session is not None and session.state is SessionState.OFFERED
            assert rejected(instance_b, "bus_offer_notice") == len(malformed_offers)
            assert rejected(instance_b, "bus_notice") == 3
