"""The audit package's exception hierarchy: every failure raised by audit/ is an AuditError."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from audit.store import StoredRecord


class AuditError(Exception):
    """Base class for every error raised by audit/."""


class RecordError(AuditError):
    """A record or event is malformed, over a size limit, uses an unknown action, or is unsigned."""


class UnknownSigner(RecordError):
    """A record is signed by a key that is neither pinned nor introduced earlier in the log."""

    def __init__(self, key_id: str) -> None:
        super().__init__(
            f"signed by key {key_id}, which is neither pinned nor introduced by an earlier "
            "audit-key-signed agent.registered record"
        )
        self.key_id = key_id


class AppendConflict(AuditError):
    """Another writer took the sequence number this append expected; re-read the head and retry."""


class DuplicateEvent(AuditError):
    """The team's log already holds this agent-signed event (same event digest); nothing was
    stored. ``existing`` is the record that holds it."""

    def __init__(self, existing: StoredRecord) -> None:
        super().__init__(f"the log already holds this event as record {existing.seq}")
        self.existing = existing


class StoreError(AuditError):
    """The audit store could not durably keep or return records (backend failure)."""


class NoteError(AuditError):
    """A signed note or checkpoint is malformed or carries no valid signature by a trusted key."""


class UntrustedNote(NoteError):
    """A signed note carries no signature by any of the trusted keys (wrong key, or forged)."""


class ProofError(AuditError):
    """An inclusion or consistency proof was requested for impossible sizes or does not verify."""


class BundleError(AuditError):
    """An export bundle cannot be read at all (missing, not a bundle, or structurally unusable)."""
