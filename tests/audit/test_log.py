"""The log: chaining, signing, refusals, several writers, restarts, checkpoints and proofs."""

from __future__ import annotations

import io
from datetime import timedelta

import msgpack
import pytest
import trio

from audit.actions import Action
from audit.checkpoint import open_checkpoint
from audit.errors import AppendConflict, ProofError, RecordError, StoreError
from audit.log import AuditLog, AuditLogs
from audit.merkle import leaf_hash, verify_consistency, verify_inclusion
from audit.record import GENESIS_HASH, MAX_CONTEXT_BYTES, AuditRecord, SignedEvent
from audit.store import MemoryAuditStore, StoredRecord
from tests.audit.builders import (
    AGENT_ID,
    AGENT_KEY,
    AUDIT_KEY,
    DEPLOYMENT,
    OPERATOR,
    OTHER_KEY,
    SERVICE,
    START,
    TEAM,
    StepClock,
    agent_event,
    export_bundle,
    new_log,
    register_agent,
    typical_history,
    verifies,
)

PINNED = [AUDIT_KEY.public]


def test_appended_records_are_chained_signed_and_stored() -> None:
    store = MemoryAuditStore()
    log = new_log(store)

    async def run() -> list[AuditRecord]:
        first = await log.append(Action.OPERATOR_LOGIN_SUCCEEDED, OPERATOR, context={"jti": "j1"})
        second = await log.append("session.requested", OPERATOR, target=AGENT_ID)
        stored = await store.read_records(TEAM, 0, 10)
        assert [row.canonical for row in stored] == [first.canonical, second.canonical]
        return [first, second]

    first, second = trio.run(run)
    assert (first.seq, second.seq) == (0, 1)
    assert first.prev_hash == GENESIS_HASH and second.prev_hash == first.record_hash
    assert first.event.signer == AUDIT_KEY.public.key_id
    first.signed.verify(AUDIT_KEY.public)


def test_unknown_action_is_refused_at_append() -> None:
    log = new_log()
    with pytest.raises(RecordError, match="unknown audit action"):
        trio.run(lambda: log.append("session.teleported", OPERATOR))


def test_oversized_context_is_refused_at_append_and_nothing_is_stored() -> None:
    store = MemoryAuditStore()
    log = new_log(store)
    with pytest.raises(RecordError):
        trio.run(
            lambda: log.append(
                Action.SESSION_COMMAND, OPERATOR, context={"c": "x" * MAX_CONTEXT_BYTES}
            )
        )
    assert trio.run(store.head, TEAM) is None


def test_agent_registered_without_the_agents_key_is_refused() -> None:
    log = new_log()
    with pytest.raises(RecordError, match="agent_public_key"):
        trio.run(lambda: log.append(Action.AGENT_REGISTERED, SERVICE, target=AGENT_ID))


def test_agent_event_for_another_team_is_refused() -> None:
    log = new_log()
    with pytest.raises(RecordError, match="another team"):
        trio.run(
            lambda: log.append_agent_event(agent_event(team="team-8"), AGENT_ID, AGENT_KEY.public)
        )


def test_agent_event_naming_another_agent_is_refused() -> None:
    log = new_log()
    with pytest.raises(RecordError, match="must name it as the actor"):
        trio.run(lambda: log.append_agent_event(agent_event(), "agent-2", AGENT_KEY.public))


def test_agent_event_with_a_bad_signature_is_refused() -> None:
    log = new_log()
    with pytest.raises(RecordError):
        trio.run(lambda: log.append_agent_event(agent_event(), AGENT_ID, OTHER_KEY.public))


def test_agent_event_dated_in_the_future_is_refused() -> None:
    log = new_log(clock=lambda: START)
    event = agent_event(when=START + timedelta(hours=1))
    with pytest.raises(RecordError, match="future"):
        trio.run(lambda: log.append_agent_event(event, AGENT_ID, AGENT_KEY.public))


def test_agent_event_delivered_late_keeps_its_own_time_and_gets_log_time() -> None:
    log = new_log(clock=lambda: START + timedelta(hours=2))

    async def run() -> AuditRecord:
        await register_agent(log)
        appended = await log.append_agent_event(agent_event(when=START), AGENT_ID, AGENT_KEY.public)
        return appended.record

    record = trio.run(run)
    assert record.event.occurred_at == START
    assert record.time == START + timedelta(hours=2)
    assert verifies(export_bundle(log))


def test_log_time_never_goes_backwards_when_the_clock_does() -> None:
    times = iter([START + timedelta(seconds=10), START, START + timedelta(seconds=5)])
    log = new_log(clock=lambda: next(times))

    async def run() -> list[AuditRecord]:
        return [await log.append(Action.AGENT_CONNECTED, SERVICE) for _ in range(3)]

    records = trio.run(run)
    assert [record.time for record in records] == [START + timedelta(seconds=10)] * 3
    assert records[1].event.occurred_at == START
    assert verifies(export_bundle(log))


class ConflictCountingStore(MemoryAuditStore):
    conflicts = 0

    async def append(self, team_id: str, record: StoredRecord) -> None:
        try:
            await super().append(team_id, record)
        except AppendConflict:
            self.conflicts += 1
            raise


def test_two_instances_sharing_a_store_interleave_into_one_valid_chain() -> None:
    store = ConflictCountingStore()
    clock = StepClock()
    first = AuditLog(store, AUDIT_KEY, DEPLOYMENT, TEAM, clock=clock)
    second = AuditLog(store, AUDIT_KEY, DEPLOYMENT, TEAM, clock=clock)

    async def append_from(writer: AuditLog, index: int) -> None:
        await writer.append(Action.SESSION_COMMAND, OPERATOR, context={"i": index})

    async def run() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for index in range(20):
                    nursery.start_soon(append_from, first if index % 2 else second, index)
        for index in range(5):
            await (first if index % 2 else second).append(Action.AGENT_CONNECTED, SERVICE)

    trio.run(run)
    records = trio.run(store.read_records, TEAM, 0, 100)
    assert [record.seq for record in records] == list(range(25))
    assert store.conflicts > 0
    assert trio.run(first.checkpoint).checkpoint.size == 25
    assert trio.run(first.size) == trio.run(second.size) == 25
    assert verifies(export_bundle(first))
    assert verifies(export_bundle(second))


class FlakyStore(MemoryAuditStore):
    """A store whose next append fails (a database outage)."""

    fail_next = False

    async def append(self, team_id: str, record: StoredRecord) -> None:
        if self.fail_next:
            self.fail_next = False
            raise StoreError("database unavailable")
        await super().append(team_id, record)


def test_failed_store_append_raises_and_the_next_append_continues_the_chain() -> None:
    store = FlakyStore()
    log = new_log(store)

    async def run() -> None:
        await log.append(Action.AGENT_CONNECTED, SERVICE)
        store.fail_next = True
        with pytest.raises(StoreError):
            await log.append(Action.SESSION_REQUESTED, OPERATOR)
        await log.append(Action.SESSION_REQUESTED, OPERATOR)

    trio.run(run)
    assert [r.seq for r in trio.run(store.read_records, TEAM, 0, 10)] == [0, 1]
    assert verifies(export_bundle(log))


class AlwaysConflictingStore(MemoryAuditStore):
    async def append(self, team_id: str, record: StoredRecord) -> None:
        raise AppendConflict("someone else always wins")


def test_append_gives_up_after_repeated_conflicts() -> None:
    log = new_log(AlwaysConflictingStore())
    with pytest.raises(AppendConflict, match="gave up"):
        trio.run(lambda: log.append(Action.AGENT_CONNECTED, SERVICE))


def test_restarted_log_continues_the_chain_from_the_store() -> None:
    store = MemoryAuditStore()
    trio.run(typical_history, new_log(store), 2)
    restarted = new_log(store, clock=StepClock(START + timedelta(minutes=1)))
    record = trio.run(lambda: restarted.append(Action.AGENT_DISCONNECTED, SERVICE))
    assert record.seq == 5
    assert verifies(export_bundle(restarted))


def test_checkpoint_is_signed_stored_and_proofs_verify_against_it() -> None:
    store = MemoryAuditStore()
    log = new_log(store)

    async def run() -> None:
        await typical_history(log, 3)
        early = await log.checkpoint()
        for _ in range(10):
            await log.append(Action.AGENT_CONNECTED, SERVICE)
        late = await log.checkpoint()
        assert await store.latest_checkpoint(TEAM) is not None
        assert (await store.latest_checkpoint(TEAM)).note == late.note  # type: ignore[union-attr]
        checkpoint, _ = open_checkpoint(late.note, PINNED)
        assert checkpoint == late.checkpoint and checkpoint.size == 16
        assert checkpoint.origin == "desk.example.com/audit/team-7"
        rows = await store.read_records(TEAM, 0, 16)
        for seq in (0, 5, 15):
            proof = await log.inclusion_proof(seq, 16)
            verify_inclusion(leaf_hash(rows[seq].canonical), seq, 16, proof, checkpoint.root_hash)
        proof = await log.consistency_proof(early.checkpoint.size, 16)
        verify_consistency(
            early.checkpoint.size, 16, early.checkpoint.root_hash, checkpoint.root_hash, proof
        )
        with pytest.raises(ProofError):
            await log.inclusion_proof(0, 17)

    trio.run(run)


def test_export_refuses_an_earlier_checkpoint_from_another_history() -> None:
    other = new_log()
    trio.run(typical_history, other, 1)
    foreign = trio.run(other.checkpoint).note
    log = new_log()
    trio.run(typical_history, log, 2)
    with pytest.raises(ProofError, match="does not match"):
        export_bundle(log, foreign)


def test_export_streams_in_chunks_and_verifies() -> None:
    log = new_log()

    async def run() -> None:
        for index in range(2500):
            await log.append(Action.SESSION_COMMAND, OPERATOR, context={"i": index})

    trio.run(run)
    writes: list[int] = []

    class CountingBuffer(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            writes.append(len(data))
            return super().write(data)

    buffer = CountingBuffer()
    trio.run(lambda: log.export(buffer))
    assert len(writes) == 5  # header, three record chunks, trailer
    assert verifies(buffer.getvalue())


def test_logs_are_per_team_and_origins_name_the_team() -> None:
    logs = AuditLogs(MemoryAuditStore(), AUDIT_KEY, DEPLOYMENT, clock=StepClock())
    assert logs.for_team("team-a") is logs.for_team("team-a")
    trio.run(lambda: logs.for_team("team-a").append(Action.AGENT_CONNECTED, SERVICE))
    assert trio.run(logs.for_team("team-b").size) == 0
    assert logs.for_team("team-b").origin == "desk.example.com/audit/team-b"


def test_agent_event_survives_msgpack_transport_and_is_chained() -> None:
    wire = msgpack.packb(agent_event().to_json())
    received = SignedEvent.from_json(msgpack.unpackb(wire))
    log = new_log()

    async def run() -> AuditRecord:
        await register_agent(log)
        return (await log.append_agent_event(received, AGENT_ID, AGENT_KEY.public)).record

    record = trio.run(run)
    assert record.signed == agent_event()
    assert verifies(export_bundle(log))
