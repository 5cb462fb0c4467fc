"""An agent-signed event is stored once per team: a resend (or a replay) gets the record that
already holds it, marked already held, inside a group-commit batch too, without failing the
batch's other appends."""

from __future__ import annotations

from datetime import timedelta

import pytest
import trio
import trio.testing

from audit.actions import Action
from audit.log import AgentEventAppend, AuditLog
from audit.record import AuditRecord, SignedEvent
from audit.store import MemoryAuditStore, StoredRecord
from tests.audit.builders import (
    AGENT_ID,
    AGENT_KEY,
    OPERATOR,
    SERVICE,
    START,
    agent_event,
    export_bundle,
    new_log,
    register_agent,
    verifies,
)


class GatedStore(MemoryAuditStore):
    """A memory store that holds every append until ``gate`` opens and notes which task wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.gate: trio.Event | None = None
        self.writers: list[trio.lowlevel.Task] = []

    async def append(self, team_id: str, record: StoredRecord) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.writers.append(trio.lowlevel.current_task())
        await super().append(team_id, record)


async def _append_agent(log: AuditLog, signed: SignedEvent) -> AuditRecord:
    return (await _append_agent_result(log, signed)).record


async def _append_agent_result(log: AuditLog, signed: SignedEvent) -> AgentEventAppend:
    return await log.append_agent_event(signed, AGENT_ID, AGENT_KEY.public)


def test_a_resent_agent_event_is_stored_once_and_answered_with_its_record_already_held() -> None:
    log = new_log()
    signed = agent_event()

    async def run() -> tuple[AgentEventAppend, AgentEventAppend, int]:
        await register_agent(log)
        first = await _append_agent_result(log, signed)
        await log.append(Action.SESSION_ENDED, OPERATOR, session_id="s-1")
        again = await _append_agent_result(log, signed)
        return first, again, await log.size()

    first, again, size = trio.run(run)
    assert not first.already_held
    assert again.already_held
    assert again.record == first.record
    assert again.record.canonical == first.record.canonical
    assert size == 3
    assert verifies(export_bundle(log))


def test_the_same_content_at_another_time_is_a_new_event() -> None:
    log = new_log()

    async def run() -> list[AgentEventAppend]:
        await register_agent(log)
        return [
            await _append_agent_result(log, agent_event(when=START)),
            await _append_agent_result(log, agent_event(when=START + timedelta(microseconds=1))),
        ]

    results = trio.run(run)
    assert [result.record.seq for result in results] == [1, 2]
    assert [result.already_held for result in results] == [False, False]
    assert verifies(export_bundle(log))


def test_a_resend_is_recognised_by_another_log_on_the_same_store() -> None:
    store = MemoryAuditStore()
    first, second = new_log(store), new_log(store)
    signed = agent_event()

    async def run() -> tuple[AuditRecord, AgentEventAppend]:
        await register_agent(first)
        stored = await _append_agent(first, signed)
        await first.append(Action.SESSION_ENDED, OPERATOR, session_id="s-1")
        return stored, await _append_agent_result(second, signed)

    stored, resent = trio.run(run)
    assert resent.record == stored
    assert resent.already_held
    assert trio.run(second.size) == 3
    assert verifies(export_bundle(second))


@pytest.mark.parametrize("in_turn", [False, True], ids=["optimistic", "writer-turn"])
def test_duplicates_in_one_group_commit_batch_leave_the_rest_of_the_batch_stored(
    in_turn: bool,
) -> None:
    store = GatedStore()
    log, other = new_log(store), new_log(store)
    already_stored = agent_event(when=START)
    twin = agent_event(when=START + timedelta(microseconds=1))
    fresh = [agent_event(when=START + timedelta(microseconds=2 + n)) for n in range(3)]
    results: dict[str, AuditRecord] = {}
    held: dict[str, bool] = {}

    async def one(name: str, signed: SignedEvent) -> None:
        result = await _append_agent_result(log, signed)
        results[name], held[name] = result.record, result.already_held

    async def run() -> None:
        await register_agent(log)
        results["stored"] = await _append_agent(log, already_stored)
        if in_turn:
            # Another log appends, so ``log`` loses its optimistic race and uses its turn.
            await other.append(Action.AGENT_CONNECTED, SERVICE)
        store.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            # The first append holds the writer; everything after queues into one batch.
            nursery.start_soon(log.append, Action.SESSION_STARTED, OPERATOR)
            await trio.testing.wait_all_tasks_blocked()
            queued = [("fresh0", fresh[0]), ("twin-a", twin), ("resent", already_stored),
                      ("twin-b", twin), ("fresh1", fresh[1]), ("fresh2", fresh[2])]  # fmt: skip
            for name, signed in queued:
                nursery.start_soon(one, name, signed)
            await trio.testing.wait_all_tasks_blocked()
            store.gate.set()

    trio.run(run)
    assert results["resent"] == results["stored"]
    assert results["twin-a"] == results["twin-b"]
    # Whichever twin was placed first stored it; the other found it held.
    assert sorted([held["twin-a"], held["twin-b"]]) == [False, True]
    assert held["resent"]
    assert not any(held[name] for name in ("fresh0", "fresh1", "fresh2"))
    records = trio.run(store.read_records, "team-7", 0, 100)
    agent_events = [record.canonical for record in records if b'"kind":"agent"' in record.canonical]
    assert len(agent_events) == 5  # stored, twin, three fresh
    assert len(set(agent_events)) == 5
    for name in ("fresh0", "twin-a", "fresh1", "fresh2"):
        assert records[results[name].seq].canonical == results[name].canonical
    # The six queued appends were placed by one writer (one batch), duplicates included.
    assert len(store.writers) >= 6 and len(set(store.writers[-6:])) == 1
    assert verifies(export_bundle(log))
