"""The audit package's exception hierarchy: every failure raised by audit/ is an AuditError."""


class AuditError(Exception):
    """Base class for every error raised by audit/."""


class RecordError(AuditError):
    """A record or event is malformed, over a size limit, uses an unknown action, or is unsigned."""


class AppendConflict(AuditError):
    """Another writer took the sequence number this append expected; re-read the head and retry."""


class StoreError(AuditError):
    """The audit store could not durably keep or return records (backend failure)."""


class NoteError(AuditError):
    """A signed note or checkpoint is malformed or carries no valid signature by a trusted key."""


class ProofError(AuditError):
    """An inclusion or consistency proof was requested for impossible sizes or does not verify."""


class BundleError(AuditError):
    """An export bundle cannot be read at all (missing, not a bundle, or structurally unusable)."""
