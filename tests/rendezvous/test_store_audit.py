"""The rendezvous database keeps the audit log: the audit store contract on both backends."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio

from audit.errors import AppendConflict
from audit.store import AuditStore
from rendezvous.store import Store, StoreError, open_store
from tests.audit.store_contract import STORE_CONTRACT_CHECKS, fake_record, new_team

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("check", STORE_CONTRACT_CHECKS, ids=lambda check: check.__name__)
async def test_store_keeps_the_audit_store_contract(
    check: Callable[[AuditStore], Awaitable[None]], store: Store
) -> None:
    assert isinstance(store.audit, AuditStore)
    await check(store.audit)


async def test_concurrent_appends_from_two_instances_store_exactly_one(database_url: str) -> None:
    team = new_team()
    outcomes: list[str] = []

    async def writer(instance: Store, tag: bytes) -> None:
        try:
            await instance.audit.append(team, fake_record(0, tag))
            outcomes.append("stored")
        except AppendConflict:
            outcomes.append("conflict")

    async with open_store(database_url) as first, open_store(database_url) as second:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                for index in range(6):
                    nursery.start_soon(writer, (first, second)[index % 2], bytes([index]))
        assert sorted(outcomes) == ["conflict"] * 5 + ["stored"]
        assert len(await second.audit.read_records(team, 0, 10)) == 1


async def test_audit_records_survive_a_restart(database_url: str) -> None:
    team = new_team()
    records = [fake_record(seq) for seq in range(3)]
    async with open_store(database_url) as first:
        for record in records:
            await first.audit.append(team, record)
    async with open_store(database_url) as reopened:
        assert await reopened.audit.read_records(team, 0, 10) == records
        await reopened.audit.append(team, fake_record(3))
        assert (await reopened.audit.head(team)) == fake_record(3)


@pytest.mark.parametrize(
    "statement",
    ["UPDATE audit_records SET canonical = $1", "DELETE FROM audit_records WHERE seq >= 0"],
    ids=["update", "delete"],
)
async def test_database_refuses_to_edit_or_delete_audit_records(
    store: Store, statement: str
) -> None:
    from rendezvous.store.sql_store import SqlStore

    assert isinstance(store, SqlStore)
    team = new_team()
    await store.audit.append(team, fake_record(0))
    args = (b"forged",) if "$1" in statement else ()
    with pytest.raises(StoreError, match="append-only"):
        async with store._transaction() as session:
            await session.execute(statement, *args)
    assert await store.audit.read_records(team, 0, 10) == [fake_record(0)]


async def test_negative_ranges_are_refused(store: Store) -> None:
    from audit.errors import StoreError as AuditStoreError

    with pytest.raises(AuditStoreError):
        await store.audit.read_records(new_team(), -1, 3)
    with pytest.raises(AuditStoreError):
        await store.audit.read_leaf_hashes(new_team(), 0, -3)
