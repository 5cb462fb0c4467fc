"""Several rendezvous instances appending to one team's audit log at once all get their turn.

Each instance keeps its own view of the log and appends optimistically; one that is behind must
catch up before it can append. Without a fair turn, an instance that keeps appending back to back
starves the other, whose appends then fail after their retries ("audit log unavailable").
"""

from __future__ import annotations

import pytest
import trio

from audit.actions import Action, ActorKind
from audit.log import AuditLogs
from audit.record import Actor
from audit.verify import Verdict, verify_bundle
from protocol.identity import SigningIdentity
from rendezvous.store import open_store

pytestmark = pytest.mark.anyio

INSTANCES = 2
TASKS_PER_INSTANCE = 12
APPENDS_PER_TASK = 15


async def test_appends_from_two_instances_all_land_in_one_chain(database_url, tmp_path):
    identity = SigningIdentity.generate()
    async with open_store(database_url) as first, open_store(database_url) as second:
        team = await first.create_team("acme", 0.0)
        logs = [AuditLogs(store.audit, identity, "test") for store in (first, second)]
        failures: list[BaseException] = []

        async def append_many(instance: int, task: int) -> None:
            log = logs[instance].for_team(team.id)
            for number in range(APPENDS_PER_TASK):
                actor = Actor(ActorKind.OPERATOR, f"op-{instance}-{task}", "someone")
                try:
                    await log.append(Action.SESSION_REQUESTED, actor, target=f"n{number}")
                except Exception as error:  # noqa: BLE001 - every failure is the finding
                    failures.append(error)

        async with trio.open_nursery() as nursery:
            for instance in range(INSTANCES):
                for task in range(TASKS_PER_INSTANCE):
                    nursery.start_soon(append_many, instance, task)

        assert failures == []
        log = logs[0].for_team(team.id)
        assert await log.size() == INSTANCES * TASKS_PER_INSTANCE * APPENDS_PER_TASK
        bundle = tmp_path / "bundle.jsonl"
        with bundle.open("wb") as stream:
            await log.export(stream)
        result = verify_bundle(bundle, [identity.public])
        assert result.verdict is Verdict.VALID, result.reason
        assert result.record_count == INSTANCES * TASKS_PER_INSTANCE * APPENDS_PER_TASK
