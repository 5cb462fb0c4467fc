"""Check a session recording file against the verified audit export that names it.

The agent binds each recording into its signed ``session.ended`` event: the context's
``recording`` object holds the file name, its size in bytes and the SHA-256 of its bytes. Given
the recording and an export bundle, this first reads and hashes the recording (an unreadable
file is reported before the long part), then verifies the whole bundle against the pinned keys
(audit/verify.py) in one read, collecting on the way the ``session.ended`` records that name the
file or carry its hash. Nothing is taken from the bundle unless that single read verified it:
the bundle is never opened a second time, so a file swapped in afterwards cannot vouch for a
recording. Size and hash are then compared: an edited, cut or extended file is caught.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from audit.actions import Action, ActorKind
from audit.checkpoint import Checkpoint
from audit.record import AuditRecord, JsonValue, format_time
from audit.verify import (
    EXIT_CODES,
    EarlierCheckpoint,
    KeyNames,
    ProgressCallback,
    Verdict,
    VerificationResult,
    verify_bundle,
)
from protocol.identity import PublicIdentity

HASH_CHUNK_BYTES = 1024 * 1024
MAX_SAME_CONTENT_RECORDS = 8  # records carrying the file's hash under another name, kept to name


@dataclass(frozen=True)
class BoundRecording:
    """A verified session.ended record's recording binding."""

    seq: int
    session_id: str | None
    ended: str
    file: str
    size: int
    sha256: str
    truncated: bool
    failed: bool

    def to_json(self) -> dict[str, object]:
        """The binding as a JSON-ready dict."""
        return {
            "seq": self.seq,
            "session_id": self.session_id,
            "ended": self.ended,
            "file": self.file,
            "bytes": self.size,
            "sha256": self.sha256,
            "truncated": self.truncated,
            "failed": self.failed,
        }


@dataclass(frozen=True)
class RecordingVerdict:
    """The outcome: VALID when the file matches its audit record, with a one-line reason;
    NEWER when it matches but the export also holds records of actions this verifier does not
    know (exit 5, as ``verify``: what they mean was not checked).

    ``code`` is machine-readable: ``matches``, ``cut_short``, ``extended``, ``edited``,
    ``not_named``, ``named_twice``, ``export_invalid``, ``wrong_key``, ``unreadable``.
    """

    verdict: Verdict
    message: str
    code: str = ""
    file_size: int | None = None
    file_sha256: str | None = None
    record: BoundRecording | None = None
    same_content: tuple[BoundRecording, ...] = ()
    export: VerificationResult | None = field(default=None, compare=False)

    @property
    def exit_code(self) -> int:
        """0 matches, 1 differs (or the bundle is invalid), 2 unreadable input, 3 wrong key,
        5 matches in an export holding a newer release's actions."""
        return EXIT_CODES[self.verdict]

    @property
    def newer(self) -> bool:
        """Whether the export verified as NEWER (actions this verifier does not know)."""
        return self.export is not None and self.export.verdict is Verdict.NEWER

    def to_json(self, key_names: KeyNames | None = None) -> dict[str, object]:
        """The outcome as a JSON-ready dict (``recording --json``)."""
        return {
            "verdict": self.verdict.value,
            "code": self.code or self.verdict.value,
            "ok": self.code == "matches",  # the file matches its record (NEWER: "newer" too)
            "newer": self.newer,
            "message": self.message,
            "recording": {"bytes": self.file_size, "sha256": self.file_sha256},
            "record": None if self.record is None else self.record.to_json(),
            "same_content_records": [record.to_json() for record in self.same_content],
            "export": None if self.export is None else self.export.to_json(key_names),
        }


class _Collector:
    """Keeps, from verified records, the session.ended bindings naming the file or its hash."""

    def __init__(self, file_name: str, digest: str) -> None:
        self._file_name = file_name
        self._digest = digest
        self.named: list[BoundRecording] = []
        self.same_content: list[BoundRecording] = []

    def __call__(self, record: AuditRecord) -> None:
        event = record.event
        if event.action is not Action.SESSION_ENDED or event.actor.kind is not ActorKind.AGENT:
            return
        bound = event.context.get("recording")
        if not isinstance(bound, Mapping) or not _well_formed(bound):
            return
        if bound["file"] == self._file_name:
            self.named.append(_binding(record, bound))
        elif bound["sha256"] == self._digest and len(self.same_content) < MAX_SAME_CONTENT_RECORDS:
            self.same_content.append(_binding(record, bound))


def check_recording(
    recording: Path,
    bundle: Path | BinaryIO,
    audit_keys: Sequence[PublicIdentity],
    *,
    previous_checkpoints: Sequence[Checkpoint | EarlierCheckpoint] = (),
    progress: ProgressCallback | None = None,
    key_names: KeyNames | None = None,
    agent_pins: Mapping[str, str] | None = None,
) -> RecordingVerdict:
    """Hash ``recording``, verify ``bundle``, then compare with the session.ended record naming
    the file. ``progress`` is passed to verify_bundle (the verification is the long part)."""
    try:
        size, digest = _hash_file(recording)
    except OSError as error:
        return RecordingVerdict(
            Verdict.UNREADABLE, f"{recording}: cannot read ({error.strerror})", "unreadable"
        )
    collector = _Collector(recording.name, digest)
    verified = verify_bundle(
        bundle,
        audit_keys,
        previous_checkpoints=previous_checkpoints,
        progress=progress,
        on_record=collector,
        agent_pins=agent_pins,
    )
    # NEWER (records of a newer release's actions) still proves every session.ended it holds.
    same = tuple(collector.same_content) if verified.verified else ()
    bound = collector.named[0] if verified.verified and len(collector.named) == 1 else None

    def outcome(verdict: Verdict, message: str, code: str) -> RecordingVerdict:
        return RecordingVerdict(verdict, message, code, size, digest, bound, same, verified)

    if not verified.verified:
        code = {Verdict.WRONG_KEY: "wrong_key", Verdict.UNREADABLE: "unreadable"}.get(
            verified.verdict, "export_invalid"
        )
        message = f"the audit export does not verify: {verified.summary(key_names)}"
        return outcome(verified.verdict, message, code)
    other = _same_content_note(same)
    if not collector.named:
        message = f"no agent-signed session.ended record in the export names {recording.name!r}"
        return outcome(Verdict.INVALID, message + other, "not_named")
    if bound is None:
        message = f"{len(collector.named)} session.ended records name {recording.name!r}"
        return outcome(Verdict.INVALID, message, "named_twice")
    where = f"record {bound.seq} (session {bound.session_id})"
    if size != bound.size:
        change = "cut short" if size < bound.size else "extended"
        return outcome(
            Verdict.INVALID,
            f"{recording.name}: size differs from {where}: the log says {bound.size} bytes, "
            f"the file has {size} ({change}){other}",
            change.replace(" ", "_"),
        )
    if digest != bound.sha256:
        message = f"{recording.name}: SHA-256 differs from {where}: the file was edited{other}"
        return outcome(Verdict.INVALID, message, "edited")
    notes = []
    if bound.truncated:
        notes.append("the recording stopped at the agent's size limit")
    if bound.failed:
        notes.append("the agent reported a write error: the recording is incomplete")
    suffix = f" ({'; '.join(notes)})" if notes else ""
    unmatched = verified.unmatched_pins_warning()
    suffix += f"; {unmatched}" if unmatched else ""
    newer = verified.verdict is Verdict.NEWER
    if newer:
        suffix += (
            "; the export also holds records of actions this tucdesk-audit does not know (a "
            "newer release's), verified but not interpreted: upgrade tucdesk-audit"
        )
    return outcome(
        Verdict.NEWER if newer else Verdict.VALID,
        f"{recording.name} matches {where}, ended {bound.ended}: "
        f"{size} bytes, sha256 {digest}{suffix}",
        "matches",
    )


def _same_content_note(same: Sequence[BoundRecording]) -> str:
    if not same:
        return ""
    first = same[0]
    more = f" and {len(same) - 1} more" if len(same) > 1 else ""
    return (
        f"; its content matches record {first.seq} (session {first.session_id}, "
        f"file {first.file!r}){more}: it is that session's recording"
    )


def _binding(record: AuditRecord, bound: Mapping[str, JsonValue]) -> BoundRecording:
    return BoundRecording(
        seq=record.seq,
        session_id=record.event.session_id,
        ended=format_time(record.time),
        file=str(bound["file"]),
        size=int(bound["bytes"]),  # type: ignore[arg-type]
        sha256=str(bound["sha256"]),
        truncated=bool(bound["truncated"]),
        failed=bool(bound.get("failed", False)),
    )


def _well_formed(bound: Mapping[str, JsonValue]) -> bool:
    return (
        isinstance(bound.get("file"), str)
        and isinstance(bound.get("sha256"), str)
        and type(bound.get("bytes")) is int
        and isinstance(bound.get("truncated"), bool)
        and isinstance(bound.get("failed", False), bool)
    )


def _hash_file(path: Path) -> tuple[int, str]:
    """Size and SHA-256 of a regular file; OSError (with a strerror) for anything else."""
    # O_NONBLOCK: a FIFO planted at the path must not hang the check before it is refused.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "a directory, not a recording file")
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file")
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        digest = hashlib.sha256()
        size = 0
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
