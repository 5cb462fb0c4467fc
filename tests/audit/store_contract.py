"""The behaviour every AuditStore must have, as reusable async checks.

A backend's tests run each check against a fresh or shared store (checks use their own random
team ids, so sharing one store is fine)::

    @pytest.mark.parametrize("check", STORE_CONTRACT_CHECKS, ids=lambda c: c.__name__)
    def test_sqlite_store_keeps_the_audit_store_contract(check, sqlite_store):
        trio.run(check, sqlite_store)
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable

import pytest
import trio

from audit.errors import AppendConflict, DuplicateEvent
from audit.store import AuditStore, StoredCheckpoint, StoredRecord


def fake_record(seq: int, payload: bytes = b"", event: bytes | None = None) -> StoredRecord:
    """A StoredRecord with deterministic hashes; stores never interpret the bytes. With
    ``event``, it carries an agent event whose digest is SHA-256 of those bytes."""
    canonical = b'{"seq":%d,"payload":"%s"}' % (seq, payload.hex().encode())
    return StoredRecord(
        seq=seq,
        time=f"2026-11-26T10:00:{seq % 60:02d}.{seq % 1_000_000:06d}Z",
        record_hash=hashlib.sha256(canonical).digest(),
        leaf_hash=hashlib.sha256(b"\x00" + canonical).digest(),
        canonical=canonical,
        event_digest=None if event is None else hashlib.sha256(event).digest(),
    )


def new_team() -> str:
    """A fresh team id so checks never collide in a shared store."""
    return f"team-{uuid.uuid4().hex}"


async def check_empty_log_has_no_head(store: AuditStore) -> None:
    team = new_team()
    assert await store.head(team) is None
    assert await store.read_records(team, 0, 10) == []
    assert await store.read_leaf_hashes(team, 0, 10) == []
    assert await store.latest_checkpoint(team) is None


async def check_records_come_back_in_order_with_identical_bytes(store: AuditStore) -> None:
    team = new_team()
    records = [fake_record(seq, bytes([seq])) for seq in range(12)]
    for record in records:
        await store.append(team, record)
    assert await store.head(team) == records[-1]
    assert await store.read_records(team, 0, 12) == records
    assert await store.read_records(team, 3, 7) == records[3:7]
    assert await store.read_records(team, 10, 100) == records[10:]
    assert await store.read_records(team, 12, 20) == []
    assert await store.read_leaf_hashes(team, 2, 5) == [r.leaf_hash for r in records[2:5]]


async def check_append_at_a_taken_sequence_number_conflicts(store: AuditStore) -> None:
    team = new_team()
    await store.append(team, fake_record(0))
    await store.append(team, fake_record(1))
    for seq in (0, 1):
        try:
            await store.append(team, fake_record(seq, b"other writer"))
        except AppendConflict:
            pass
        else:
            raise AssertionError(f"second record at seq {seq} was accepted")
    assert [r.seq for r in await store.read_records(team, 0, 10)] == [0, 1]
    assert (await store.read_records(team, 1, 2))[0] == fake_record(1)


async def check_append_leaving_a_gap_conflicts(store: AuditStore) -> None:
    team = new_team()
    try:
        await store.append(team, fake_record(1))
    except AppendConflict:
        pass
    else:
        raise AssertionError("a record at seq 1 was stored in an empty log")
    assert await store.head(team) is None


async def check_teams_never_see_each_others_records(store: AuditStore) -> None:
    team_a, team_b = new_team(), new_team()
    await store.append(team_a, fake_record(0, b"a"))
    await store.append(team_b, fake_record(0, b"b"))
    await store.append(team_b, fake_record(1, b"b"))
    assert await store.read_records(team_a, 0, 10) == [fake_record(0, b"a")]
    assert (await store.head(team_b)) == fake_record(1, b"b")
    await store.save_checkpoint(team_a, StoredCheckpoint(1, b"note a\n"))
    assert await store.latest_checkpoint(team_b) is None


async def check_concurrent_appends_at_one_seq_store_exactly_one(store: AuditStore) -> None:
    team = new_team()
    outcomes: list[str] = []

    async def writer(tag: bytes) -> None:
        try:
            await store.append(team, fake_record(0, tag))
            outcomes.append("stored")
        except AppendConflict:
            outcomes.append("conflict")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for index in range(5):
                nursery.start_soon(writer, bytes([index]))
    assert sorted(outcomes) == ["conflict"] * 4 + ["stored"]
    assert len(await store.read_records(team, 0, 10)) == 1


async def check_latest_checkpoint_is_the_largest(store: AuditStore) -> None:
    team = new_team()
    await store.save_checkpoint(team, StoredCheckpoint(5, b"five\n"))
    await store.save_checkpoint(team, StoredCheckpoint(9, b"nine\n"))
    await store.save_checkpoint(team, StoredCheckpoint(7, b"seven\n"))
    assert await store.latest_checkpoint(team) == StoredCheckpoint(9, b"nine\n")


async def check_appends_through_the_writer_turn_are_kept_and_read_back(store: AuditStore) -> None:
    team = new_team()
    await store.append(team, fake_record(0))
    async with store.exclusive(team) as turn:
        head = await turn.head(team)
        assert head is not None and head.seq == 0
        await turn.append(team, fake_record(1))
        assert await turn.read_leaf_hashes(team, 0, 5) == [
            fake_record(0).leaf_hash, fake_record(1).leaf_hash
        ]
        with pytest.raises(AppendConflict):
            await turn.append(team, fake_record(1, b"twin"))
    assert [record.seq for record in await store.read_records(team, 0, 5)] == [0, 1]


async def check_an_agent_event_is_stored_once_per_team(store: AuditStore) -> None:
    team, other_team = new_team(), new_team()
    first = fake_record(0, event=b"event 1")
    await store.append(team, first)
    assert (await store.read_records(team, 0, 1)) == [first]
    for seq in (1, 0, 7):  # the next seq, a taken one, a gap: the event decides first
        with pytest.raises(DuplicateEvent) as refused:
            await store.append(team, fake_record(seq, b"resent", event=b"event 1"))
        assert refused.value.existing == first
    assert [record.seq for record in await store.read_records(team, 0, 10)] == [0]
    # Other events, records without an event digest, and other teams are unaffected.
    await store.append(team, fake_record(1, event=b"event 2"))
    await store.append(team, fake_record(2))
    await store.append(team, fake_record(3))
    await store.append(other_team, fake_record(0, event=b"event 1"))
    assert (await store.head(team)) == fake_record(3)
    assert (await store.head(other_team)) == fake_record(0, event=b"event 1")


async def check_concurrent_appends_of_one_event_store_exactly_one(store: AuditStore) -> None:
    team = new_team()
    await store.append(team, fake_record(0))
    outcomes: list[str] = []

    async def writer(seq: int, tag: bytes) -> None:
        try:
            await store.append(team, fake_record(seq, tag, event=b"the event"))
            outcomes.append("stored")
        except (AppendConflict, DuplicateEvent):
            outcomes.append("refused")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for index in range(6):
                nursery.start_soon(writer, 1 + index % 2, bytes([index]))
    assert sorted(outcomes) == ["refused"] * 5 + ["stored"]
    stored = await store.read_records(team, 0, 10)
    assert [record.event_digest for record in stored] == [
        None, hashlib.sha256(b"the event").digest()
    ]


async def check_a_duplicate_in_the_writer_turn_leaves_the_turn_usable(store: AuditStore) -> None:
    team = new_team()
    await store.append(team, fake_record(0, event=b"stored before"))
    async with store.exclusive(team) as turn:
        await turn.append(team, fake_record(1, event=b"new"))
        for event in (b"new", b"stored before"):
            with pytest.raises(DuplicateEvent) as refused:
                await turn.append(team, fake_record(2, b"twin", event=event))
            assert refused.value.existing.seq == (1 if event == b"new" else 0)
        await turn.append(team, fake_record(2))
    assert [record.seq for record in await store.read_records(team, 0, 10)] == [0, 1, 2]


STORE_CONTRACT_CHECKS: list[Callable[[AuditStore], Awaitable[None]]] = [
    check_empty_log_has_no_head,
    check_records_come_back_in_order_with_identical_bytes,
    check_append_at_a_taken_sequence_number_conflicts,
    check_append_leaving_a_gap_conflicts,
    check_teams_never_see_each_others_records,
    check_concurrent_appends_at_one_seq_store_exactly_one,
    check_latest_checkpoint_is_the_largest,
    check_appends_through_the_writer_turn_are_kept_and_read_back,
    check_an_agent_event_is_stored_once_per_team,
    check_concurrent_appends_of_one_event_store_exactly_one,
    check_a_duplicate_in_the_writer_turn_leaves_the_turn_usable,
]
