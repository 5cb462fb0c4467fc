"""A team's audit log: builds, signs and chains records, keeps the Merkle frontier, checkpoints,
proves inclusion and consistency, and exports bundles.

One AuditLog per team (AuditLogs hands them out). Appends inside one process queue for one
writer at a time, and the writer places every append queued behind it in the same go (group
commit). Several rendezvous instances sharing a database first race through the store's atomic
append-at-sequence; a writer that loses takes the team's writer turn (``AuditStore.exclusive``)
and, for the next few batches, goes straight to it instead of losing again. Every append returns
only after the store has durably kept its record: no audit, no action.

An agent-signed event is stored at most once per team: the store refuses a second record with
the same event digest (DuplicateEvent), and the append returns the record already holding it,
so an agent's resend after a lost ack, or a replay, never adds a record. The result says which
happened (``AgentEventAppend.already_held``), so the service can count resends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO

import trio

from audit.actions import Action, ActorKind
from audit.bundle import BundleHeader, BundleTrailer, KeyHint
from audit.checkpoint import Checkpoint, open_checkpoint, origin_for, sign_checkpoint
from audit.errors import AppendConflict, AuditError, DuplicateEvent, ProofError, RecordError
from audit.merkle import MerkleFrontier, consistency_proof, inclusion_proof, root_of
from audit.record import (
    GENESIS_HASH,
    MAX_EVENT_FUTURE_SKEW,
    Actor,
    AuditEvent,
    AuditRecord,
    JsonValue,
    PolicyResult,
    SignedEvent,
    format_time,
    parse_time,
    sign_event,
)
from audit.store import AuditStore, StoredCheckpoint, StoredRecord
from audit.trust import introduced_agent_key
from protocol.identity import PublicIdentity, SigningIdentity

MAX_APPEND_ATTEMPTS = 16
# Most appends one writer places in one go (one writer turn, one commit).
MAX_APPEND_BATCH = 256
# After losing a race to another instance, batches that skip the optimistic try.
CONTENDED_BATCHES = 16
STORE_READ_CHUNK = 1000
_AGENT_REGISTERED_MARKER = b'"action":"agent.registered"'

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    """The current UTC time (the default clock)."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint and its signed-note encoding."""

    checkpoint: Checkpoint
    note: bytes


@dataclass(frozen=True)
class AgentEventAppend:
    """What ``append_agent_event`` did: the record holding the event, and whether it was new."""

    record: AuditRecord
    already_held: bool  # the log held the event before this call (a resend or a replay)


@dataclass(eq=False)
class _QueuedAppend:
    """A signed event waiting for a writer, which fills in its record once it is durable."""

    signed: SignedEvent
    moment: datetime
    event_digest: bytes | None  # set for agent-signed events, which are stored at most once
    record: AuditRecord | None = None
    already_held: bool = False  # ``record`` was stored before, for an earlier copy of the event
    abandoned: bool = False  # its caller was cancelled or failed: never write it now


@dataclass(frozen=True)
class _Staged:
    """A record built on a known head, not yet durable; nothing changes until it is adopted."""

    record: AuditRecord
    stored: StoredRecord
    time: datetime


class AuditLog:
    """One team's append-only, hash-chained, Merkle-tree audit log."""

    def __init__(
        self,
        store: AuditStore,
        identity: SigningIdentity,
        deployment: str,
        team_id: str,
        *,
        clock: Clock = utc_now,
        previous_audit_keys: Sequence[PublicIdentity] = (),
    ) -> None:
        self._store = store
        self._identity = identity
        self._key_id = identity.public.key_id
        self._team_id = team_id
        self._origin = origin_for(deployment, team_id)
        self._clock = clock
        self._previous_audit_keys = tuple(previous_audit_keys)
        self._lock = trio.Lock()
        self._loaded = False
        self._frontier = MerkleFrontier()
        self._last_hash = GENESIS_HASH
        self._last_time: datetime | None = None
        self._queue: list[_QueuedAppend] = []
        self._contended_batches = 0

    @property
    def team_id(self) -> str:
        """The team this log belongs to."""
        return self._team_id

    @property
    def origin(self) -> str:
        """The checkpoint origin line (and signed-note key name) of this log."""
        return self._origin

    @property
    def audit_key(self) -> PublicIdentity:
        """The public key auditors pin to verify this log's exports."""
        return self._identity.public

    async def size(self) -> int:
        """How many records the log holds (after catching up with other writers)."""
        async with self._lock:
            await self._catch_up(force=True)
            return self._frontier.size

    async def append(
        self,
        action: Action | str,
        actor: Actor,
        *,
        target: str | None = None,
        session_id: str | None = None,
        policy_result: PolicyResult | None = None,
        context: Mapping[str, JsonValue] | None = None,
        now: datetime | None = None,
    ) -> AuditRecord:
        """Sign an event with the audit key and durably append it; returns the stored record."""
        moment = now or self._clock()
        event = AuditEvent(
            occurred_at=moment,
            team_id=self._team_id,
            actor=actor,
            action=_known_action(action),
            signer=self._key_id,
            target=target,
            session_id=session_id,
            policy_result=policy_result,
            context=dict(context or {}),
        )
        if event.action is Action.AGENT_REGISTERED:
            introduced_agent_key(event)
        record, _ = await self._place(sign_event(self._identity, event), moment, None)
        return record

    async def append_agent_event(
        self,
        signed: SignedEvent,
        agent_id: str,
        agent_key: PublicIdentity,
        *,
        now: datetime | None = None,
    ) -> AgentEventAppend:
        """Check an event an agent signed on its host, then chain it into the log as is.

        ``agent_key`` must be the key an earlier ``agent.registered`` record introduced for
        ``agent_id``, or the export will not verify. If the log already holds this event (a
        resend), nothing is appended: the result carries the record holding it, already held.
        """
        moment = now or self._clock()
        event = signed.event
        if event.team_id != self._team_id:
            raise RecordError("agent event belongs to another team")
        if event.actor.kind is not ActorKind.AGENT or event.actor.id != agent_id:
            raise RecordError(f"an event signed by agent {agent_id} must name it as the actor")
        if not isinstance(event.action, Action):
            raise RecordError(f"the log writes only actions of this release, not {event.action!r}")
        if event.occurred_at > moment + MAX_EVENT_FUTURE_SKEW:
            raise RecordError("agent event is dated too far in the future")
        signed.verify(agent_key)
        record, already_held = await self._place(signed, moment, event.digest)
        return AgentEventAppend(record, already_held)

    async def checkpoint(self) -> SignedCheckpoint:
        """Sign a checkpoint over every record now in the log and keep it in the store."""
        async with self._lock:
            await self._catch_up(force=True)
            checkpoint = Checkpoint(self._origin, self._frontier.size, self._frontier.root())
        note = sign_checkpoint(checkpoint, self._identity)
        await self._store.save_checkpoint(self._team_id, StoredCheckpoint(checkpoint.size, note))
        return SignedCheckpoint(checkpoint, note)

    async def inclusion_proof(self, seq: int, size: int) -> list[bytes]:
        """RFC 9162 inclusion proof of record ``seq`` in the tree of the first ``size`` records."""
        return inclusion_proof(await self._leaf_hashes(size), seq)

    async def consistency_proof(self, old_size: int, size: int) -> list[bytes]:
        """RFC 9162 consistency proof from the tree of ``old_size`` records to ``size`` records."""
        return consistency_proof(await self._leaf_hashes(size), old_size)

    async def export(
        self, stream: BinaryIO, *, previous_checkpoint: bytes | None = None
    ) -> SignedCheckpoint:
        """Write a bundle of every record under a fresh checkpoint to ``stream``, chunk by chunk.

        With ``previous_checkpoint`` (an earlier note of this log), the bundle also carries it
        and the consistency proof from it. Callers append ``audit.exported`` first if they want
        the export itself on the record.
        """
        current = await self.checkpoint()
        size = current.checkpoint.size
        previous_note: bytes | None = None
        proof: list[bytes] = []
        if previous_checkpoint is not None:
            previous_note = previous_checkpoint
            proof = await self._proof_from(previous_checkpoint, size)
        hints = {
            key.key_id: KeyHint(key.key_id, key, "audit")
            for key in (self._identity.public, *self._previous_audit_keys)
        }
        header = BundleHeader(self._origin, self._team_id)
        await trio.to_thread.run_sync(stream.write, header.line())
        for start in range(0, size, STORE_READ_CHUNK):
            records = await self._store.read_records(
                self._team_id, start, min(start + STORE_READ_CHUNK, size)
            )
            if len(records) != min(STORE_READ_CHUNK, size - start):
                raise AuditError("the store returned fewer records than its checkpoint covers")
            for record in records:
                if _AGENT_REGISTERED_MARKER in record.canonical:
                    parsed = AuditRecord.from_line(record.canonical)
                    if parsed.event.signer in hints:
                        _, key = introduced_agent_key(parsed.event)
                        hints.setdefault(key.key_id, KeyHint(key.key_id, key, "agent"))
            chunk = b"".join(record.canonical + b"\n" for record in records)
            await trio.to_thread.run_sync(stream.write, chunk)
        trailer = BundleTrailer(
            checkpoint=current.note,
            keys=tuple(hints.values()),
            previous_checkpoint=previous_note,
            consistency_proof=tuple(proof),
        )
        await trio.to_thread.run_sync(stream.write, trailer.line())
        return current

    async def _proof_from(self, previous_note: bytes, size: int) -> list[bytes]:
        trusted = [self._identity.public, *self._previous_audit_keys]
        previous, _ = open_checkpoint(previous_note, trusted)
        if previous.origin != self._origin:
            raise ProofError("the earlier checkpoint is for another log")
        if previous.size > size:
            raise ProofError("the earlier checkpoint covers more records than the log holds")
        leaves = await self._leaf_hashes(size)
        if root_of(leaves[: previous.size]) != previous.root_hash:
            raise ProofError("the earlier checkpoint does not match this log's history")
        return consistency_proof(leaves, previous.size)

    async def _place(
        self, signed: SignedEvent, moment: datetime, event_digest: bytes | None
    ) -> tuple[AuditRecord, bool]:
        """Queue ``signed`` for a writer; once it is durable, return its record and whether
        the log already held the event.

        Whoever holds the lock is the writer: it places everything queued so far in one go, its
        own append among them unless an earlier writer already did. If that fails, the writer
        raises its error and the others go back to the queue, each to be tried again (or to
        fail) as its own caller's turn comes. An append whose caller gave up before a writer
        took it is never written. With ``event_digest``, an event the log already holds (stored
        earlier, elsewhere, or earlier in the same batch) gets that record instead.
        """
        queued = _QueuedAppend(signed, moment, event_digest)
        self._queue.append(queued)
        try:
            async with self._lock:
                while queued.record is None:
                    batch = [waiting for waiting in self._queue[:MAX_APPEND_BATCH]
                             if not waiting.abandoned]  # fmt: skip
                    del self._queue[:MAX_APPEND_BATCH]
                    try:
                        await self._write(batch)
                    except BaseException as error:
                        self._queue[:0] = [
                            waiting for waiting in batch
                            if waiting.record is None and not waiting.abandoned
                            and waiting is not queued
                        ]  # fmt: skip
                        if queued.record is None or not isinstance(error, Exception):
                            raise
                        # This writer's own record is durable; the failed rest go back.
        except BaseException:
            queued.abandoned = True
            if queued in self._queue:
                self._queue.remove(queued)
            raise
        return queued.record, queued.already_held

    async def _write(self, batch: list[_QueuedAppend]) -> None:
        """Place ``batch`` in order, each entry's record filled in once it is durable."""
        await self._catch_up()
        placed = await self._write_optimistically(batch)
        if placed < len(batch):
            await self._write_in_turn(batch[placed:])

    async def _write_optimistically(self, batch: list[_QueuedAppend]) -> int:
        """Append on the known head, one durable store call each, until another writer shows
        up; return how many were placed."""
        if self._contended_batches:
            self._contended_batches -= 1
            return 0
        for index, queued in enumerate(batch):
            staged = self._stage(queued, self._head())
            try:
                await self._store.append(self._team_id, staged.stored)
            except AppendConflict:
                self._contended_batches = CONTENDED_BATCHES
                return index
            except DuplicateEvent as duplicate:
                # Already durable (each append here commits on its own); the head stays put.
                queued.record = _held_record(duplicate.existing, queued)
                queued.already_held = True
                continue
            queued.record = self._adopt(staged)
        return len(batch)

    async def _write_in_turn(self, batch: list[_QueuedAppend]) -> None:
        """Append ``batch`` with the team's log to ourselves (other writers wait for their turn,
        so one that appends back to back elsewhere cannot starve this one); one commit."""
        for _ in range(MAX_APPEND_ATTEMPTS):
            try:
                async with self._store.exclusive(self._team_id) as store:
                    await self._catch_up(force=True, store=store)
                    placed: list[_Staged | AuditRecord] = []
                    head = self._head()
                    for queued in batch:
                        staged = self._stage(queued, head)
                        try:
                            await store.append(self._team_id, staged.stored)
                        except DuplicateEvent as duplicate:
                            # Held by a stored record or one placed earlier in this turn: the
                            # batch goes on without it, on the same head.
                            placed.append(_held_record(duplicate.existing, queued))
                            continue
                        placed.append(staged)
                        head = _next_head(staged)
            except AppendConflict:
                continue  # only a writer that ignores the turn gets here; the turn rolled back
            # Durable now that the turn has ended without an error.
            for queued, outcome in zip(batch, placed, strict=True):
                if isinstance(outcome, _Staged):
                    queued.record = self._adopt(outcome)
                else:
                    queued.record, queued.already_held = outcome, True
            return
        raise AppendConflict(
            f"gave up appending after {MAX_APPEND_ATTEMPTS} conflicts with other writers"
        )

    def _head(self) -> tuple[int, bytes, datetime | None]:
        """The known head: the next sequence number, the last record's hash and time."""
        return self._frontier.size, self._last_hash, self._last_time

    @staticmethod
    def _stage(queued: _QueuedAppend, head: tuple[int, bytes, datetime | None]) -> _Staged:
        """The record that follows ``head``."""
        seq, last_hash, last_time = head
        # Log time never goes backwards, even if clocks disagree between instances.
        moment = queued.moment
        time = moment if last_time is None else max(moment, last_time)
        record = AuditRecord(seq, time, last_hash, queued.signed)
        stored = StoredRecord(
            seq=record.seq,
            time=format_time(time),
            record_hash=record.record_hash,
            leaf_hash=record.leaf_hash,
            canonical=record.canonical,
            event_digest=queued.event_digest,
        )
        return _Staged(record, stored, time)

    def _adopt(self, staged: _Staged) -> AuditRecord:
        """Make a durably stored record the known head."""
        self._frontier.append(staged.stored.leaf_hash)
        self._last_hash = staged.stored.record_hash
        self._last_time = staged.time
        return staged.record

    async def _catch_up(self, *, force: bool = False, store: AuditStore | None = None) -> None:
        """Bring the frontier and head up to date with the store (other writers, first use)."""
        if self._loaded and not force:
            return
        store = store or self._store
        head = await store.head(self._team_id)
        size = 0 if head is None else head.seq + 1
        while (known := self._frontier.size) < size:
            leaves = await store.read_leaf_hashes(
                self._team_id, known, min(known + STORE_READ_CHUNK, size)
            )
            if not leaves:
                raise AuditError("the store's head is beyond the records it returns")
            for leaf in leaves:
                self._frontier.append(leaf)
        if head is not None:
            self._last_hash = head.record_hash
            self._last_time = parse_time(head.time)
        self._loaded = True

    async def _leaf_hashes(self, size: int) -> list[bytes]:
        leaves: list[bytes] = []
        while len(leaves) < size:
            chunk = await self._store.read_leaf_hashes(
                self._team_id, len(leaves), min(len(leaves) + STORE_READ_CHUNK, size)
            )
            if not chunk:
                raise ProofError(f"the log holds fewer than {size} records")
            leaves.extend(chunk)
        return leaves


def _held_record(existing: StoredRecord, queued: _QueuedAppend) -> AuditRecord:
    """The stored record that already holds ``queued``'s event (the store matched its digest)."""
    record = AuditRecord.from_line(existing.canonical)
    if record.event.canonical != queued.signed.event.canonical:
        raise AuditError("the store matched an event digest to a record of another event")
    return record


def _next_head(staged: _Staged) -> tuple[int, bytes, datetime | None]:
    """The head once ``staged`` is stored."""
    return staged.record.seq + 1, staged.stored.record_hash, staged.time


class AuditLogs:
    """Hands out one AuditLog per team, all sharing a store, audit key and deployment name."""

    def __init__(
        self,
        store: AuditStore,
        identity: SigningIdentity,
        deployment: str,
        *,
        clock: Clock = utc_now,
        previous_audit_keys: Sequence[PublicIdentity] = (),
    ) -> None:
        self._store = store
        self._identity = identity
        self._deployment = deployment
        self._clock = clock
        self._previous_audit_keys = tuple(previous_audit_keys)
        self._logs: dict[str, AuditLog] = {}

    def for_team(self, team_id: str) -> AuditLog:
        """The log of ``team_id`` (team ids must come from signed claims, never request bodies)."""
        log = self._logs.get(team_id)
        if log is None:
            log = AuditLog(
                self._store,
                self._identity,
                self._deployment,
                team_id,
                clock=self._clock,
                previous_audit_keys=self._previous_audit_keys,
            )
            self._logs[team_id] = log
        return log


def _known_action(action: Action | str) -> Action:
    try:
        return Action(action)
    except ValueError:
        raise RecordError(f"unknown audit action {str(action)[:64]!r}") from None
