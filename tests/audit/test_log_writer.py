"""The log's writer: group commit, the writer turn after a lost race, and failures mid-batch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from audit.actions import Action
from audit.errors import AppendConflict, StoreError
from audit.log import AuditLog
from audit.store import MemoryAuditStore, StoredRecord
from tests.audit.builders import (
    AUDIT_KEY,
    DEPLOYMENT,
    OPERATOR,
    SERVICE,
    TEAM,
    StepClock,
    export_bundle,
    new_log,
    verifies,
)


class TurnStore(MemoryAuditStore):
    """A memory store whose writer turn is a transaction: appends made in it are kept only when
    the turn ends without an error (and ``fail_commit`` makes the end fail); it counts turns and
    lost races, and can hold every append until ``gate`` opens."""

    def __init__(self) -> None:
        super().__init__()
        self.turns = 0
        self.turn_sizes: list[int] = []
        self.conflicts = 0
        self.fail_commit = False
        self.gate: trio.Event | None = None

    async def append(self, team_id: str, record: StoredRecord) -> None:
        if self.gate is not None:
            await self.gate.wait()
        try:
            await super().append(team_id, record)
        except AppendConflict:
            self.conflicts += 1
            raise

    @asynccontextmanager
    async def exclusive(self, team_id: str) -> AsyncIterator[MemoryAuditStore]:
        self.turns += 1
        pending = _PendingTurn(self, team_id)
        yield pending
        if self.fail_commit:
            self.fail_commit = False
            raise StoreError("commit failed: connection lost")
        for record in pending.appended:
            await MemoryAuditStore.append(self, team_id, record)
        self.turn_sizes.append(len(pending.appended))


class _PendingTurn(MemoryAuditStore):
    """What a turn sees: the store's records plus its own, not yet committed, appends."""

    def __init__(self, base: TurnStore, team_id: str) -> None:
        super().__init__()
        self.appended: list[StoredRecord] = []
        self._base = base
        self._team_id = team_id

    async def append(self, team_id: str, record: StoredRecord) -> None:
        size = len(await self._base.read_records(team_id, 0, 10**9)) + len(self.appended)
        if record.seq != size:
            raise AppendConflict(f"size is {size}")
        self.appended.append(record)

    async def head(self, team_id: str) -> StoredRecord | None:
        if self.appended:
            return self.appended[-1]
        return await self._base.head(team_id)

    async def read_leaf_hashes(self, team_id: str, start: int, end: int) -> list[bytes]:
        stored = await self._base.read_leaf_hashes(team_id, start, end)
        mine = [record.leaf_hash for record in self.appended if start <= record.seq < end]
        return stored + mine


async def append_many(log: AuditLog, count: int) -> list[int]:
    seqs: list[int] = []

    async def one(index: int) -> None:
        record = await log.append(Action.SESSION_COMMAND, OPERATOR, context={"i": index})
        seqs.append(record.seq)

    async with trio.open_nursery() as nursery:
        for index in range(count):
            nursery.start_soon(one, index)
    return seqs


def test_appends_queued_behind_a_writer_are_placed_in_one_turn() -> None:
    store = TurnStore()
    first, second = new_log(store), new_log(store)

    async def run() -> None:
        await first.append(Action.AGENT_CONNECTED, SERVICE)
        await second.append(Action.AGENT_CONNECTED, SERVICE)  # first's head is now stale
        store.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(append_many, first, 30)
            await trio.testing.wait_all_tasks_blocked()
            store.gate.set()

    trio.run(run)
    records = trio.run(store.read_records, TEAM, 0, 100)
    assert [record.seq for record in records] == list(range(32))
    # One lost optimistic race, then the writer's append and the 29 queued behind it go in a
    # single turn (one commit).
    assert store.conflicts == 1
    assert store.turn_sizes == [30]
    assert verifies(export_bundle(first))


def test_a_writer_that_lost_a_race_goes_straight_to_its_turn_next_time() -> None:
    store = TurnStore()
    clock = StepClock()
    first = AuditLog(store, AUDIT_KEY, DEPLOYMENT, TEAM, clock=clock)
    second = AuditLog(store, AUDIT_KEY, DEPLOYMENT, TEAM, clock=clock)

    async def run() -> None:
        await first.append(Action.AGENT_CONNECTED, SERVICE)
        for _ in range(5):
            await second.append(Action.SESSION_COMMAND, OPERATOR)
            await first.append(Action.SESSION_COMMAND, OPERATOR)

    trio.run(run)
    assert [r.seq for r in trio.run(store.read_records, TEAM, 0, 100)] == list(range(11))
    # Each log loses one race (first on its first stale append, second on its second), then
    # takes the turn directly instead of losing again on every alternating append.
    assert store.conflicts == 2
    assert verifies(export_bundle(first))
    assert verifies(export_bundle(second))


def test_a_failed_commit_leaves_nothing_behind_and_the_chain_continues() -> None:
    store = TurnStore()
    first, second = new_log(store), new_log(store)

    async def run() -> None:
        await first.append(Action.AGENT_CONNECTED, SERVICE)
        await second.append(Action.AGENT_CONNECTED, SERVICE)
        store.fail_commit = True  # first loses its race, then its turn fails to commit
        with pytest.raises(StoreError, match="commit failed"):
            await first.append(Action.SESSION_REQUESTED, OPERATOR)
        # Nothing of the failed turn is kept or believed kept: the next append follows seq 1.
        record = await first.append(Action.SESSION_REQUESTED, OPERATOR)
        assert record.seq == 2

    trio.run(run)
    assert [r.seq for r in trio.run(store.read_records, TEAM, 0, 100)] == [0, 1, 2]
    assert verifies(export_bundle(first))


def test_a_cancelled_writer_does_not_fail_the_appends_queued_behind_it() -> None:
    store = TurnStore()
    log = new_log(store)
    writer_scope = trio.CancelScope()
    outcomes: dict[str, object] = {}

    async def writer() -> None:
        with writer_scope:
            await log.append(Action.SESSION_REQUESTED, OPERATOR)
        outcomes["writer"] = "cancelled" if writer_scope.cancelled_caught else "appended"

    async def other(name: str) -> None:
        outcomes[name] = (await log.append(Action.SESSION_COMMAND, OPERATOR)).seq

    async def run() -> None:
        store.gate = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await trio.testing.wait_all_tasks_blocked()  # the writer waits in the store
            nursery.start_soon(other, "a")
            nursery.start_soon(other, "b")
            await trio.testing.wait_all_tasks_blocked()
            writer_scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            store.gate.set()

    trio.run(run)
    assert outcomes["writer"] == "cancelled"
    assert sorted([outcomes["a"], outcomes["b"]]) == [0, 1]
    assert len(trio.run(store.read_records, TEAM, 0, 100)) == 2
    assert verifies(export_bundle(log))


class FailOnceStore(MemoryAuditStore):
    """The first append fails (a database outage); the rest wait for ``gate`` and succeed."""

    def __init__(self) -> None:
        super().__init__()
        self.failed = False
        self.gate = trio.Event()

    async def append(self, team_id: str, record: StoredRecord) -> None:
        if not self.failed:
            await self.gate.wait()
            self.failed = True
            raise StoreError("database unavailable")
        await super().append(team_id, record)


def test_a_writer_error_is_its_own_and_the_queued_appends_are_tried_again() -> None:
    store = FailOnceStore()
    log = new_log(store)
    outcomes: dict[str, object] = {}

    async def attempt(name: str) -> None:
        try:
            outcomes[name] = (await log.append(Action.SESSION_COMMAND, OPERATOR)).seq
        except StoreError as error:
            outcomes[name] = str(error)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt, "writer")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(attempt, "a")
            nursery.start_soon(attempt, "b")
            await trio.testing.wait_all_tasks_blocked()
            store.gate.set()

    trio.run(run)
    assert outcomes["writer"] == "database unavailable"
    assert sorted([outcomes["a"], outcomes["b"]]) == [0, 1]
    assert verifies(export_bundle(log))
