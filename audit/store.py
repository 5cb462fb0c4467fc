"""Where a team's audit log lives: the small async storage interface and an in-memory store.

The interface is what the rendezvous implements on SQLite and PostgreSQL. It is deliberately
small and dumb: the log (audit/log.py) builds, signs and hashes records; a store only keeps the
bytes it is given, per team, in sequence order, and refuses a second record at a taken sequence
number so several writers sharing one database cannot fork the chain.

Contract every implementation must keep (tests/audit/store_contract.py checks it):

* ``append`` is atomic and durable: when it returns, the record survives a crash; when it raises
  AppendConflict nothing was stored. It stores ``record`` only if ``record.seq`` equals the
  team's current size (sequence numbers start at 0 with no gaps); otherwise AppendConflict.
* A record with an ``event_digest`` (an agent-signed event) is stored at most once per team:
  if the team already holds a record with that digest, ``append`` stores nothing and raises
  DuplicateEvent carrying that record (whatever ``record.seq`` is). The check is part of the
  same atomic step (a unique index in SQL), so concurrent writers cannot both store it.
* ``read_records`` / ``read_leaf_hashes`` return records ``start <= seq < end`` in order,
  clipped to the current size; ``start`` and ``end`` are never negative.
* Teams never see each other's records; every method filters by ``team_id``.
* ``save_checkpoint`` keeps the signed checkpoint note; ``latest_checkpoint`` returns the one with
  the largest size (a smaller or equal size never replaces a larger one).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from audit.errors import AppendConflict, DuplicateEvent, StoreError

HASH_SIZE = 32


@dataclass(frozen=True)
class StoredRecord:
    """One record as a store keeps it: its bytes plus the values a store may want as columns.

    ``canonical`` is the record's RFC 8785 encoding (the exact bytes exported and verified);
    ``time`` is its log time, RFC 3339 UTC with microseconds (fixed width, so it sorts as text);
    ``record_hash`` is SHA-256 of ``canonical`` (the next record's ``prev_hash``) and
    ``leaf_hash`` its RFC 6962 Merkle leaf hash. ``event_digest`` is set only for an
    agent-signed event (``AuditEvent.digest``): the store keeps at most one record per digest
    and team.
    """

    seq: int
    time: str
    record_hash: bytes
    leaf_hash: bytes
    canonical: bytes
    event_digest: bytes | None = None

    def __post_init__(self) -> None:
        if self.seq < 0:
            raise StoreError("a record's sequence number is never negative")
        if len(self.record_hash) != HASH_SIZE or len(self.leaf_hash) != HASH_SIZE:
            raise StoreError(f"record and leaf hashes are {HASH_SIZE} bytes")
        if self.event_digest is not None and len(self.event_digest) != HASH_SIZE:
            raise StoreError(f"an event digest is {HASH_SIZE} bytes")


@dataclass(frozen=True)
class StoredCheckpoint:
    """A signed checkpoint note (C2SP tlog-checkpoint, C2SP signed note) and the size it covers."""

    size: int
    note: bytes


@runtime_checkable
class AuditStore(Protocol):
    """Per-team, append-only storage for audit records. All methods are async (trio-compatible)."""

    async def append(self, team_id: str, record: StoredRecord) -> None:
        """Durably store ``record`` iff its seq is the team's current size, else AppendConflict;
        DuplicateEvent (nothing stored) if the team holds a record with its event digest."""
        ...

    async def head(self, team_id: str) -> StoredRecord | None:
        """The team's last record (its ``seq + 1`` is the log size), or None for an empty log."""
        ...

    async def read_records(self, team_id: str, start: int, end: int) -> list[StoredRecord]:
        """Records with ``start <= seq < end`` in sequence order (fewer if the log is shorter)."""
        ...

    async def read_leaf_hashes(self, team_id: str, start: int, end: int) -> list[bytes]:
        """Merkle leaf hashes of records ``start <= seq < end`` in order (fewer if shorter)."""
        ...

    async def save_checkpoint(self, team_id: str, checkpoint: StoredCheckpoint) -> None:
        """Keep a signed checkpoint; one covering fewer records never replaces a larger one."""
        ...

    async def latest_checkpoint(self, team_id: str) -> StoredCheckpoint | None:
        """The stored checkpoint covering the most records, or None."""
        ...

    def exclusive(self, team_id: str) -> AbstractAsyncContextManager[AuditStore]:
        """A view of this store on which the caller alone appends to the team's log until the
        block ends: other writers (other processes too) wait for their turn. Appends made
        through the view are durable once the block exits without an error."""
        ...


class MemoryAuditStore:
    """An AuditStore in process memory: for tests, benchmarks and the agent's local spool.

    "Durable" here means only "held until the process ends"; the rendezvous uses SQLite or
    PostgreSQL. Each method completes without awaiting anything, so under trio every append is
    atomic with respect to other tasks.
    """

    def __init__(self) -> None:
        self._records: dict[str, list[StoredRecord]] = {}
        self._seq_by_event_digest: dict[str, dict[bytes, int]] = {}
        self._checkpoints: dict[str, StoredCheckpoint] = {}

    async def append(self, team_id: str, record: StoredRecord) -> None:
        """Store ``record`` iff its seq is the team's current size, else raise AppendConflict;
        DuplicateEvent if the team already holds its event digest."""
        records = self._records.setdefault(team_id, [])
        if record.event_digest is not None:
            digests = self._seq_by_event_digest.setdefault(team_id, {})
            existing = digests.get(record.event_digest)
            if existing is not None:
                raise DuplicateEvent(records[existing])
        if record.seq != len(records):
            raise AppendConflict(
                f"team log has {len(records)} records; cannot store sequence number {record.seq}"
            )
        records.append(record)
        if record.event_digest is not None:
            digests[record.event_digest] = record.seq

    async def head(self, team_id: str) -> StoredRecord | None:
        """The team's last record, or None."""
        records = self._records.get(team_id)
        return records[-1] if records else None

    async def read_records(self, team_id: str, start: int, end: int) -> list[StoredRecord]:
        """Records ``start <= seq < end`` in order."""
        _check_range(start, end)
        return self._records.get(team_id, [])[start:end]

    async def read_leaf_hashes(self, team_id: str, start: int, end: int) -> list[bytes]:
        """Leaf hashes of records ``start <= seq < end`` in order."""
        _check_range(start, end)
        return [record.leaf_hash for record in self._records.get(team_id, [])[start:end]]

    async def save_checkpoint(self, team_id: str, checkpoint: StoredCheckpoint) -> None:
        """Keep ``checkpoint`` unless a larger one is already kept."""
        current = self._checkpoints.get(team_id)
        if current is None or checkpoint.size > current.size:
            self._checkpoints[team_id] = checkpoint

    async def latest_checkpoint(self, team_id: str) -> StoredCheckpoint | None:
        """The largest kept checkpoint, or None."""
        return self._checkpoints.get(team_id)

    @asynccontextmanager
    async def exclusive(self, team_id: str) -> AsyncIterator[MemoryAuditStore]:
        """This store itself: one process, and every append is atomic under trio."""
        yield self


def _check_range(start: int, end: int) -> None:
    if start < 0 or end < 0:
        raise StoreError("record ranges never start or end below zero")
