"""Offline verification of an export bundle against pinned audit keys.

Checks, in bundle order: the header; for every record its canonical encoding, field limits and
known action, contiguous sequence numbers from 0, non-decreasing log time, the hash chain, the
team, and its signature by a pinned audit key or by an agent key introduced through an earlier
audit-key-signed ``agent.registered`` record (audit/trust.py); then the checkpoint's signature,
origin, size and Merkle root; then consistency with an earlier checkpoint from the bundle
(via its RFC 9162 proof) and/or one the auditor kept (recomputed from the records). The first
failure stops verification and is reported with its record and reason; nothing raises.

A caller showing progress passes ``progress``: it is called every ``PROGRESS_EVERY_RECORDS``
records with the records checked and the bundle bytes read so far (cheap enough to leave on).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

from audit.bundle import (
    MAX_BUNDLE_LINE_BYTES,
    BundleHeader,
    is_trailer,
    parse_header,
    parse_trailer,
)
from audit.checkpoint import ORIGIN_TEAM_SEPARATOR, Checkpoint, open_checkpoint
from audit.errors import AuditError, BundleError
from audit.merkle import EMPTY_ROOT, MerkleFrontier, verify_consistency
from audit.record import (
    GENESIS_HASH,
    MAX_EVENT_FUTURE_SKEW,
    AuditRecord,
    format_time,
    strict_json,
)
from audit.trust import SignerTrust
from protocol.errors import ProtocolError
from protocol.identity import PublicIdentity


class Verdict(StrEnum):
    """The outcome of verifying a bundle."""

    VALID = "valid"
    INVALID = "invalid"
    UNREADABLE = "unreadable"


EXIT_CODES = {Verdict.VALID: 0, Verdict.INVALID: 1, Verdict.UNREADABLE: 2}
PROGRESS_EVERY_RECORDS = 256

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(records_checked, bytes_read)`` while a bundle is verified."""


@dataclass(frozen=True)
class VerificationResult:
    """What verification found: the verdict, and for a failure the first bad record and why."""

    verdict: Verdict
    reason: str | None = None
    bad_seq: int | None = None
    bad_line: int | None = None
    origin: str | None = None
    team_id: str | None = None
    record_count: int = 0
    root_hash: bytes | None = None
    first_time: str | None = None
    last_time: str | None = None
    previous_sizes: tuple[int, ...] = ()
    signers: dict[str, int] = field(default_factory=dict)
    checkpoint_note: bytes | None = None
    """The bundle's signed checkpoint when valid: keep it for the next --previous-checkpoint."""

    @property
    def ok(self) -> bool:
        """Whether the bundle verified."""
        return self.verdict is Verdict.VALID

    @property
    def exit_code(self) -> int:
        """0 valid, 1 invalid, 2 unreadable."""
        return EXIT_CODES[self.verdict]

    def summary(self) -> str:
        """One line for a human."""
        if self.ok:
            consistent = "".join(
                f", consistent with checkpoint at {size}" for size in self.previous_sizes
            )
            span = f" from {self.first_time} to {self.last_time}" if self.first_time else ""
            return (
                f"OK: {self.record_count} records of {self.origin}{span}, "
                f"{len(self.signers)} signing keys, root {_hex(self.root_hash)}{consistent}"
            )
        if self.verdict is Verdict.UNREADABLE:
            return f"UNREADABLE: {self.reason}"
        where = f"record {self.bad_seq}" if self.bad_seq is not None else "bundle"
        line = f" (line {self.bad_line})" if self.bad_line is not None else ""
        return f"INVALID: {where}{line}: {self.reason}"

    def to_json(self) -> dict[str, object]:
        """The result as a JSON-ready dict (``--json``)."""
        return {
            "verdict": self.verdict.value,
            "ok": self.ok,
            "reason": self.reason,
            "bad_seq": self.bad_seq,
            "bad_line": self.bad_line,
            "origin": self.origin,
            "team_id": self.team_id,
            "record_count": self.record_count,
            "root_hash": None if self.root_hash is None else self.root_hash.hex(),
            "first_time": self.first_time,
            "last_time": self.last_time,
            "consistent_with_sizes": list(self.previous_sizes),
            "signers": dict(self.signers),
        }


class _Invalid(Exception):
    """Internal: stop at the first failure with the record it concerns."""

    def __init__(self, reason: str, seq: int | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.seq = seq


def load_previous_checkpoint(
    path: Path, audit_keys: Sequence[PublicIdentity]
) -> Checkpoint:
    """Read and verify a checkpoint note an auditor kept; BundleError if it cannot be used."""
    try:
        with Path(path).open("rb") as handle:
            note = handle.read(MAX_BUNDLE_LINE_BYTES + 1)
    except OSError as error:
        raise BundleError(f"{path}: cannot read earlier checkpoint ({error.strerror})") from None
    try:
        checkpoint, _ = open_checkpoint(note, audit_keys)
    except AuditError as error:
        raise BundleError(f"{path}: earlier checkpoint is unusable: {error}") from None
    return checkpoint


def verify_bundle(
    source: Path | str | BinaryIO,
    audit_keys: Sequence[PublicIdentity],
    *,
    previous_checkpoints: Sequence[Checkpoint] = (),
    progress: ProgressCallback | None = None,
) -> VerificationResult:
    """Verify a bundle (a path or a binary stream) trusting only ``audit_keys``.

    ``previous_checkpoints`` are earlier checkpoints the auditor kept (already verified, see
    load_previous_checkpoint); the bundle must extend each of them. ``progress``, if given, is
    called every PROGRESS_EVERY_RECORDS records with (records checked, bytes read).
    """
    if not audit_keys:
        return VerificationResult(Verdict.UNREADABLE, "no pinned audit key was given")
    if isinstance(source, (str, Path)):
        try:
            with Path(source).open("rb") as stream:
                return _Verifier(audit_keys, previous_checkpoints, progress).run(stream)
        except OSError as error:
            return VerificationResult(
                Verdict.UNREADABLE, f"{source}: cannot read bundle ({error.strerror})"
            )
    return _Verifier(audit_keys, previous_checkpoints, progress).run(source)


class _Verifier:
    def __init__(
        self,
        audit_keys: Sequence[PublicIdentity],
        previous: Sequence[Checkpoint],
        progress: ProgressCallback | None = None,
    ) -> None:
        self._audit_keys = list(audit_keys)
        self._progress = progress
        self._bytes_read = 0
        self._trust = SignerTrust(audit_keys)
        self._previous = list(previous)
        self._prefix_roots: dict[int, bytes] = {}
        self._wanted_sizes = {checkpoint.size for checkpoint in previous}
        self._frontier = MerkleFrontier()
        self._header: BundleHeader | None = None
        self._line = 0
        self._prev_hash = GENESIS_HASH
        self._last_time: datetime | None = None
        self._first_time: str | None = None
        self._signers: dict[str, int] = {}
        self._checked_sizes: list[int] = []
        self._root: bytes | None = None
        self._checkpoint_note: bytes | None = None

    def run(self, stream: BinaryIO) -> VerificationResult:
        try:
            self._header = self._read_header(stream)
            self._check_previous_origins()
            self._verify(stream)
        except BundleError as error:
            return self._result(Verdict.UNREADABLE, str(error))
        except _Invalid as failure:
            return self._result(Verdict.INVALID, failure.reason, failure.seq)
        except OSError as error:
            return self._result(Verdict.UNREADABLE, f"reading the bundle failed ({error})")
        return self._result(Verdict.VALID)

    def _result(
        self, verdict: Verdict, reason: str | None = None, seq: int | None = None
    ) -> VerificationResult:
        header = self._header
        return VerificationResult(
            verdict=verdict,
            reason=reason,
            bad_seq=seq,
            bad_line=self._line if verdict is Verdict.INVALID else None,
            origin=None if header is None else header.origin,
            team_id=None if header is None else header.team_id,
            record_count=self._frontier.size,
            root_hash=self._root,
            first_time=self._first_time,
            last_time=None if self._last_time is None else format_time(self._last_time),
            previous_sizes=tuple(self._checked_sizes),
            signers=dict(self._signers),
            checkpoint_note=self._checkpoint_note if verdict is Verdict.VALID else None,
        )

    def _read_line(self, stream: BinaryIO) -> bytes:
        self._line += 1
        line = stream.readline(MAX_BUNDLE_LINE_BYTES + 1)
        self._bytes_read += len(line)
        return line

    def _read_header(self, stream: BinaryIO) -> BundleHeader:
        line = self._read_line(stream)
        if not line:
            raise BundleError("the bundle is empty")
        if len(line) > MAX_BUNDLE_LINE_BYTES:
            raise BundleError("the first line is too long: not a TucDesk audit bundle")
        header = parse_header(line)
        if header.origin.rpartition(ORIGIN_TEAM_SEPARATOR)[2] != header.team_id:
            raise _Invalid("the header's origin does not name its team", None)
        return header

    def _check_previous_origins(self) -> None:
        assert self._header is not None
        for previous in self._previous:
            if previous.origin != self._header.origin:
                raise _Invalid(
                    f"the earlier checkpoint is for {previous.origin}, "
                    f"not {self._header.origin}",
                    None,
                )
            if previous.size == 0:
                self._prefix_roots[0] = EMPTY_ROOT

    def _verify(self, stream: BinaryIO) -> None:
        progress = self._progress
        while True:
            seq = self._frontier.size
            line = self._read_line(stream)
            if not line:
                raise _Invalid("the bundle ends without a checkpoint (truncated?)", seq)
            if len(line) > MAX_BUNDLE_LINE_BYTES:
                raise _Invalid(f"line longer than {MAX_BUNDLE_LINE_BYTES} bytes", seq)
            if not line.endswith(b"\n"):
                raise _Invalid("the last line is cut short (truncated?)", seq)
            body = line[:-1]
            try:
                value = strict_json(body)
            except AuditError as error:
                raise _Invalid(str(error), seq) from None
            # ValueError too: a malformed line must end verification with a reason, never a
            # traceback, even where a library rejects it before our own checks do.
            if is_trailer(value):
                try:
                    self._verify_trailer(value, body, stream)
                except (AuditError, ProtocolError, ValueError) as error:
                    raise _Invalid(f"checkpoint: {error}", None) from None
                return
            try:
                self._verify_record(AuditRecord.from_parsed(value, body), seq)
            except (AuditError, ProtocolError, ValueError) as error:
                raise _Invalid(str(error), seq) from None
            if progress is not None and (seq + 1) % PROGRESS_EVERY_RECORDS == 0:
                progress(seq + 1, self._bytes_read)

    def _verify_record(self, record: AuditRecord, seq: int) -> None:
        assert self._header is not None
        if record.seq != seq:
            raise _Invalid(
                f"sequence number {record.seq} where {seq} was expected "
                "(a record was deleted, inserted or moved)",
                seq,
            )
        event = record.event
        if event.team_id != self._header.team_id:
            raise _Invalid(f"record belongs to team {event.team_id!r}", seq)
        if self._last_time is not None and record.time < self._last_time:
            raise _Invalid("log time goes backwards", seq)
        if record.prev_hash != self._prev_hash:
            raise _Invalid(
                "previous-record hash does not match (a record before it was changed, "
                "deleted or reordered)",
                seq,
            )
        if event.occurred_at > record.time + MAX_EVENT_FUTURE_SKEW:
            raise _Invalid("event is dated after the log received it", seq)
        self._trust.accept(record.signed)
        self._signers[event.signer] = self._signers.get(event.signer, 0) + 1
        self._prev_hash = record.record_hash
        self._last_time = record.time
        if self._first_time is None:
            self._first_time = format_time(record.time)
        self._frontier.append(record.leaf_hash)
        if self._frontier.size in self._wanted_sizes:
            self._prefix_roots[self._frontier.size] = self._frontier.root()

    def _verify_trailer(self, value: dict[str, object], body: bytes, stream: BinaryIO) -> None:
        assert self._header is not None
        count = self._frontier.size
        trailer = parse_trailer(value, body)
        if stream.read(1):
            raise _Invalid("there is data after the checkpoint", None)
        checkpoint, _ = open_checkpoint(trailer.checkpoint, self._audit_keys)
        if checkpoint.origin != self._header.origin:
            raise _Invalid(f"the checkpoint is for {checkpoint.origin}", None)
        if checkpoint.size != count:
            raise _Invalid(
                f"the signed checkpoint covers {checkpoint.size} records but the bundle has "
                f"{count} (records removed or added)",
                min(count, checkpoint.size),
            )
        root = self._frontier.root()
        if checkpoint.root_hash != root:
            raise _Invalid("the records' Merkle root differs from the signed checkpoint", None)
        self._root = root
        self._checkpoint_note = trailer.checkpoint
        if trailer.previous_checkpoint is not None:
            previous, _ = open_checkpoint(trailer.previous_checkpoint, self._audit_keys)
            self._check_extends(previous, checkpoint)
            try:
                verify_consistency(
                    previous.size,
                    checkpoint.size,
                    previous.root_hash,
                    checkpoint.root_hash,
                    trailer.consistency_proof,
                )
            except AuditError as error:
                raise _Invalid(f"the earlier checkpoint in the bundle: {error}", None) from None
            self._checked_sizes.append(previous.size)
        for previous in self._previous:
            self._check_extends(previous, checkpoint)
            if self._prefix_roots.get(previous.size) != previous.root_hash:
                raise _Invalid(
                    f"the first {previous.size} records differ from the earlier checkpoint "
                    "(history was rewritten)",
                    None,
                )
            self._checked_sizes.append(previous.size)

    def _check_extends(self, previous: Checkpoint, checkpoint: Checkpoint) -> None:
        if previous.origin != checkpoint.origin:
            raise _Invalid(f"the earlier checkpoint is for {previous.origin}", None)
        if previous.size > checkpoint.size:
            raise _Invalid(
                f"rollback: the earlier checkpoint covers {previous.size} records, "
                f"this bundle only {checkpoint.size}",
                None,
            )


def _hex(value: bytes | None) -> str:
    return "-" if value is None else value.hex()
