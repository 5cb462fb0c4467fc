"""A policy stored through one rendezvous instance reaches agents held by another (PostgreSQL)."""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest

from protocol.policy import SignedPolicyBundle
from rendezvous.offer_bus import OFFER_CHANNEL
from rendezvous.policy_distribution import POLICY_NOTICE_KIND
from rendezvous.store import open_store
from tests.pg_cluster import PostgresCluster
from tests.rendezvous.policy_support import set_policy
from tests.rendezvous.sessions_support import agent_channel, enroll_agent, served_instance

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

_numbers = itertools.count(1)


@pytest.fixture
def shared_database(postgres_cluster: PostgresCluster) -> str:
    """A fresh PostgreSQL database for two instances to share."""
    return postgres_cluster.create_database(f"policy_instances_{os.getpid()}_{next(_numbers)}")


async def test_a_bundle_set_at_one_instance_is_pushed_to_an_agent_held_by_another(
    shared_database: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"  # one service: the instances share their keys
    async with (
        open_store(shared_database) as store_a,
        open_store(shared_database) as store_b,
        served_instance(store_a, data) as (instance_a, _),
        served_instance(store_b, data) as (_instance_b, url_b),
    ):
        team = await instance_a.team("ops")
        admin = await instance_a.operator(team, "admin")
        agent = await enroll_agent(instance_a, admin)
        async with agent_channel(url_b, agent) as channel:
            await set_policy(instance_a, admin)
            message = await channel.receive("policy_bundle")
            assert SignedPolicyBundle.from_json(message["bundle"]).content.version == 1


async def test_malformed_policy_notices_are_counted_and_push_nothing(
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
            await set_policy(instance_a, admin)
            # The bundle may come twice (right after welcome and on A's notice), both before an
            # offer published after it.
            response = await instance_a.call(admin, "POST", "/v1/sessions", body)
            assert response.status_code == 201, response.text
            await channel.receive("session_offer")

            valid = {"kind": POLICY_NOTICE_KIND, "instance": instance_a.ctx.instance_id}
            malformed = [
                {**valid, "team_id": 7},
                {**valid, "team_id": [team]},
                valid,  # no team
                {"kind": POLICY_NOTICE_KIND, "team_id": team},  # no sender
                {**valid, "instance": 5, "team_id": team},
            ]
            for fields in malformed:
                await store_a.notify(OFFER_CHANNEL, json.dumps(fields))

            # Notices are handled in order: once the offer arrives, B has read them all, and
            # none of them pushed the bundle again.
            response = await instance_a.call(admin, "POST", "/v1/sessions", body)
            assert response.status_code == 201, response.text
            assert (await channel.receive())["session_id"] == response.json()["session_id"]
            registry = instance_b.ctx.metrics.registry
            counted = registry.get_sample_value(
                "tucdesk_rejected_inputs_total", {"reason": "bus_policy_notice"}
            )
            assert counted == len(malformed)
