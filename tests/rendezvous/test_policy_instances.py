"""A policy stored through one rendezvous instance reaches agents held by another (PostgreSQL)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest

from protocol.policy import SignedPolicyBundle
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
