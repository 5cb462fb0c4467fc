"""Check a session recording file against the verified audit export that names it.

The agent binds each recording into its signed ``session.ended`` event: the context's
``recording`` object holds the file name, its size in bytes and the SHA-256 of its bytes. Given
the recording and an export bundle, this first verifies the whole bundle against the pinned
keys (audit/verify.py; nothing is trusted before that), then finds the one ``session.ended``
record naming the file, and compares size and hash: an edited, cut or extended file is caught.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from audit.actions import Action, ActorKind
from audit.bundle import MAX_BUNDLE_LINE_BYTES, is_trailer
from audit.checkpoint import Checkpoint
from audit.errors import AuditError
from audit.record import AuditRecord, JsonValue, format_time, strict_json
from audit.verify import ProgressCallback, Verdict, verify_bundle
from protocol.errors import ProtocolError
from protocol.identity import PublicIdentity

HASH_CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True)
class RecordingVerdict:
    """The outcome: VALID when the file matches its audit record, with a one-line reason."""

    verdict: Verdict
    message: str

    @property
    def exit_code(self) -> int:
        """0 matches, 1 differs (or the bundle is invalid), 2 unreadable input."""
        return {Verdict.VALID: 0, Verdict.INVALID: 1, Verdict.UNREADABLE: 2}[self.verdict]


def check_recording(
    recording: Path,
    bundle: Path,
    audit_keys: Sequence[PublicIdentity],
    *,
    previous_checkpoints: Sequence[Checkpoint] = (),
    progress: ProgressCallback | None = None,
) -> RecordingVerdict:
    """Verify ``bundle``, then compare ``recording`` with the session.ended record naming it.

    ``progress`` is passed to verify_bundle (the verification is the long part).
    """
    verified = verify_bundle(
        bundle, audit_keys, previous_checkpoints=previous_checkpoints, progress=progress
    )
    if not verified.ok:
        return RecordingVerdict(
            verified.verdict, f"the audit export does not verify: {verified.summary()}"
        )
    try:
        matches = _records_naming(bundle, recording.name)
    except OSError as error:
        return RecordingVerdict(Verdict.UNREADABLE, f"{bundle}: cannot read ({error.strerror})")
    if not matches:
        return RecordingVerdict(
            Verdict.INVALID,
            f"no agent-signed session.ended record in the export names {recording.name!r}",
        )
    if len(matches) > 1:
        return RecordingVerdict(
            Verdict.INVALID, f"{len(matches)} session.ended records name {recording.name!r}"
        )
    record, bound = matches[0]
    try:
        size, digest = _hash_file(recording)
    except OSError as error:
        return RecordingVerdict(Verdict.UNREADABLE, f"{recording}: cannot read ({error.strerror})")
    where = f"record {record.seq} (session {record.event.session_id})"
    if size != bound["bytes"]:
        return RecordingVerdict(
            Verdict.INVALID,
            f"{recording.name}: size differs from {where}: the log says {bound['bytes']} "
            f"bytes, the file has {size} (cut short or extended)",
        )
    if digest != bound["sha256"]:
        return RecordingVerdict(
            Verdict.INVALID,
            f"{recording.name}: SHA-256 differs from {where}: the file was edited",
        )
    notes = []
    if bound["truncated"]:
        notes.append("the recording stopped at the agent's size limit")
    if bound.get("failed"):
        notes.append("the agent reported a write error: the recording is incomplete")
    suffix = f" ({'; '.join(notes)})" if notes else ""
    return RecordingVerdict(
        Verdict.VALID,
        f"{recording.name} matches {where}, ended {format_time(record.time)}: "
        f"{size} bytes, sha256 {digest}{suffix}",
    )


def _records_naming(
    bundle: Path, file_name: str
) -> list[tuple[AuditRecord, Mapping[str, JsonValue]]]:
    """The agent-signed session.ended records whose recording names ``file_name``.

    Only called on a bundle that verified, so every line parses as a trusted record.
    """
    found: list[tuple[AuditRecord, Mapping[str, JsonValue]]] = []
    with bundle.open("rb") as stream:
        stream.readline(MAX_BUNDLE_LINE_BYTES + 1)  # the header
        for line in stream:
            body = line.rstrip(b"\n")
            try:
                value = strict_json(body)
                if is_trailer(value):
                    break
                record = AuditRecord.from_parsed(value, body)
            except (AuditError, ProtocolError, ValueError):
                continue
            event = record.event
            if event.action is not Action.SESSION_ENDED or event.actor.kind is not ActorKind.AGENT:
                continue
            bound = event.context.get("recording")
            if isinstance(bound, Mapping) and _well_formed(bound) and bound["file"] == file_name:
                found.append((record, bound))
    return found


def _well_formed(bound: Mapping[str, JsonValue]) -> bool:
    return (
        isinstance(bound.get("file"), str)
        and isinstance(bound.get("sha256"), str)
        and type(bound.get("bytes")) is int
        and isinstance(bound.get("truncated"), bool)
        and isinstance(bound.get("failed", False), bool)
    )


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()
