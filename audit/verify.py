"""Offline verification of an export bundle against pinned audit keys.

Checks, in bundle order: the header; for every record its canonical encoding, field limits and
action (one this release knows, or one of the same ``word.word`` form a newer release wrote:
held to every other check, counted, and reported as the NEWER verdict, exit 5, since what it
means is not checked), contiguous sequence numbers from 0, non-decreasing log time, the hash
chain, the team, and its signature by a pinned audit key or by an agent key introduced through
an earlier audit-key-signed ``agent.registered`` record (audit/trust.py); then the checkpoint's
signature, origin, size and Merkle root; then consistency with an earlier checkpoint from the bundle
(via its RFC 9162 proof) and/or one the auditor kept (recomputed from the records; its
signature checked after them, against the pinned keys and the audit keys the bundle's rotation
records introduced, so a checkpoint kept after a rotation is usable). The first failure stops
verification and is reported with its record and reason; nothing raises.

A caller showing progress passes ``progress``: it is called every ``PROGRESS_EVERY_RECORDS``
records with the records checked and the bundle bytes read so far (cheap enough to leave on).
A caller that needs something from the records (audit/recording_check.py) passes ``on_record``:
it sees each record once it has passed every check, in the same single read of the bundle, so
nothing is ever taken from a second, unverified read of the file.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import BinaryIO

from audit.actions import Action, ActorKind
from audit.bundle import (
    FIRST_RECORD_LINE,
    MAX_BUNDLE_LINE_BYTES,
    UTF8_BOM,
    BundleHeader,
    is_trailer,
    parse_header,
    parse_trailer,
)
from audit.checkpoint import (
    ORIGIN_TEAM_SEPARATOR,
    Checkpoint,
    open_checkpoint,
    parse_checkpoint_body,
)
from audit.errors import AuditError, BundleError, UnknownSigner, UntrustedNote
from audit.merkle import EMPTY_ROOT, MerkleFrontier, leaf_hash, verify_consistency
from audit.note import parse_note
from audit.record import (
    GENESIS_HASH,
    MAX_EVENT_FUTURE_SKEW,
    AuditRecord,
    UnknownAction,
    format_time,
    strict_json,
)
from audit.trust import (
    AUDIT_SIGNER_PURPOSE,
    ROTATION_NEW_KEY_ID_FIELD,
    ROTATION_OLD_FINGERPRINT_FIELD,
    ROTATION_PURPOSE_FIELD,
    SignerTrust,
    UnmatchedAgentPin,
)
from protocol.errors import ProtocolError
from protocol.identity import PublicIdentity


class Verdict(StrEnum):
    """The outcome of verifying a bundle."""

    VALID = "valid"
    INVALID = "invalid"
    UNREADABLE = "unreadable"
    WRONG_KEY = "wrong_key"
    """No pinned key signed the bundle's first record: most likely --key is not its audit key
    (or is a later one a rotation introduced)."""
    NEWER = "newer"
    """Every check passed, but some records name actions this verifier does not know (a newer
    TucDesk release wrote them): chain, signatures and checkpoints verified, what those records
    mean was not checked."""


EXIT_CODES = {
    Verdict.VALID: 0,
    Verdict.INVALID: 1,
    Verdict.UNREADABLE: 2,
    Verdict.WRONG_KEY: 3,
    Verdict.NEWER: 5,
}
PROGRESS_EVERY_RECORDS = 256
MAX_FINGERPRINT_LENGTH = 64  # "SHA256:" and 43 base64 characters; longer is not one
MAX_LISTED_UNMATCHED_PINS = 20  # named on the OK line; --json lists them all
MAX_LISTED_NEWER_ACTIONS = 10  # unknown actions named on the NEWER line; --json lists more
MAX_COUNTED_NEWER_ACTIONS = 1000  # distinct unknown actions counted apart; the rest together
JSON_FORMAT = "tucdesk-audit-verify-v1"
"""The ``format`` field of ``--json``: fields are only ever added under this name."""
NOT_CHECKED_ROLLBACK = (
    "not checked: rollback or truncation against an earlier export (no --previous-checkpoint "
    "was given): pass the checkpoint kept from the last export you verified with "
    "--previous-checkpoint FILE (keep one with --save-checkpoint FILE)"
)

ProgressCallback = Callable[[int, int], None]
"""Called as ``progress(records_checked, bytes_read)`` while a bundle is verified."""
RecordCallback = Callable[[AuditRecord], None]
"""Called with each record once it has passed every check (its signature included)."""
KeyNames = Mapping[str, str]
"""Where each pinned key came from (key id -> file name), to name it in messages."""


@dataclass(frozen=True)
class SigningKey:
    """A key that signed records of a bundle: a pinned audit key or an introduced agent key."""

    key_id: str
    role: str
    fingerprint: str
    records: int
    agent_id: str | None = None
    agent_name: str | None = None
    """The hostname (or name) the agent's registration gives."""

    def label(self) -> str:
        """``agent NAME (ID) FINGERPRINT`` for an agent key, for people."""
        name = f"{self.agent_name} ({self.agent_id})" if self.agent_name else f"{self.agent_id}"
        return f"agent {name} {self.fingerprint}"

    def to_json(self) -> dict[str, object]:
        """The key as a JSON-ready dict."""
        return {
            "key_id": self.key_id,
            "role": self.role,
            "agent_id": self.agent_id,
            "agent_name": self.agent_name,
            "fingerprint": self.fingerprint,
            "records": self.records,
        }


@dataclass(frozen=True)
class KeyRotation:
    """An audit key rotation the verifier followed: record ``seq``, signed by ``old_key``,
    introduced ``new_key``."""

    seq: int
    old_key: PublicIdentity
    new_key: PublicIdentity

    def describe(self) -> str:
        """One phrase naming both fingerprints."""
        return (
            f"audit key rotated at record {self.seq} from {self.old_key.fingerprint} to "
            f"{self.new_key.fingerprint} (the rotation record is signed by the old key)"
        )

    def to_json(self) -> dict[str, object]:
        """The rotation as a JSON-ready dict."""
        return {
            "seq": self.seq,
            "old_fingerprint": self.old_key.fingerprint,
            "old_key_id": self.old_key.key_id,
            "new_fingerprint": self.new_key.fingerprint,
            "new_key_id": self.new_key.key_id,
        }


@dataclass(frozen=True)
class SignedAfterRemoval:
    """Records agent ``agent_id`` signed after its ``agent.removed`` (record ``removal_seq``):
    ``count`` of them, the first few in ``seqs``. Reported, not refused: the rendezvous refuses
    such events, but its check and a removal race (a channel on another instance)."""

    agent_id: str
    agent_name: str | None
    removal_seq: int
    count: int
    seqs: tuple[int, ...]

    def describe(self) -> str:
        """One warning phrase naming the agent and the records."""
        name = f"{self.agent_name} ({self.agent_id})" if self.agent_name else self.agent_id
        noun = "record" if self.count == 1 else "records"
        listed = ", ".join(str(seq) for seq in self.seqs)
        more = f" and {self.count - len(self.seqs)} more" if self.count > len(self.seqs) else ""
        return (
            f"WARNING: agent {name} signed {noun} {listed}{more} after its removal by record "
            f"{self.removal_seq} (its channel on another instance not closed yet, or its key "
            "leaked)"
        )

    def to_json(self) -> dict[str, object]:
        """The warning as a JSON-ready dict."""
        return {
            "agent_id": self.agent_id,
            "agent_name": self.agent_name,
            "removed_by_record": self.removal_seq,
            "count": self.count,
            "records": list(self.seqs),
        }


@dataclass(frozen=True)
class NewerActions:
    """Records whose action this verifier does not know (of today's ``word.word`` form, signed
    and chained like any other): ``count`` of them, by action (at most
    MAX_COUNTED_NEWER_ACTIONS actions; records of further ones are counted in ``uncounted``),
    the first at record ``first_seq`` on line ``first_line``; ``in_agent_name`` of them name an
    agent actor but an audit key signed them (the agent's own signature was not required)."""

    count: int
    actions: tuple[tuple[str, int], ...]
    first_seq: int
    first_line: int
    in_agent_name: int = 0
    uncounted: int = 0

    def describe(self) -> str:
        """The line saying what was not checked."""
        listed = ", ".join(
            f"{action} ({count})" for action, count in self.actions[:MAX_LISTED_NEWER_ACTIONS]
        )
        more = len(self.actions) - MAX_LISTED_NEWER_ACTIONS
        if more > 0:
            listed += f" and {more} more"
        if self.uncounted:
            listed += f" and {self.uncounted} records of further actions"
        noun = "record uses an action" if self.count == 1 else "records use actions"
        agent = ""
        if self.in_agent_name:
            verbs = "names" if self.in_agent_name == 1 else "name"
            are = "is" if self.in_agent_name == 1 else "are"
            agent = (
                f"; {self.in_agent_name} of them {verbs} an agent as the actor but {are} signed "
                "by the service's audit key, verified only as far as that signature goes (whether "
                "the agent's own key must sign such records was not checked)"
            )
        return (
            f"from a newer TucDesk release: {self.count} {noun} this tucdesk-audit does not "
            f"know: {listed}; the first is record {self.first_seq} (line {self.first_line}): "
            "chain and signatures verified, what these records mean was not checked: upgrade "
            f"tucdesk-audit{agent}"
        )

    def to_json(self) -> dict[str, object]:
        """The unknown actions as a JSON-ready dict."""
        return {
            "records": self.count,
            "actions": dict(self.actions),
            "uncounted_records": self.uncounted,
            "first_seq": self.first_seq,
            "first_line": self.first_line,
            "in_agent_name_signed_by_service": self.in_agent_name,
        }


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
    checkpoint: Checkpoint | None = None
    checkpoint_signer: PublicIdentity | None = None
    signing_keys: tuple[SigningKey, ...] = ()
    pinned_keys: tuple[PublicIdentity, ...] = ()
    bundle_signer: str | None = None
    """For WRONG_KEY: the bundle's signer, by fingerprint when its key list names it."""
    prefix_roots: dict[int, bytes] = field(default_factory=dict)
    """Merkle roots of the first N records, for each N asked for with ``keep_prefix_sizes``."""
    key_rotations: tuple[KeyRotation, ...] = ()
    """Audit keys introduced by rotation records their predecessors signed, in bundle order."""
    late_signatures: tuple[tuple[PublicIdentity, int], ...] = ()
    """Retired audit keys that still signed after their rotation, and how often: an instance
    not reloaded yet, or a leaked key (reported, not refused)."""
    signed_after_removal: tuple[SignedAfterRemoval, ...] = ()
    """Agents whose key signed records after their removal (reported, not refused)."""
    auditor_checkpoint_sizes: tuple[int, ...] = ()
    """Sizes of the earlier checkpoints the auditor kept that the bundle was checked against."""
    unmatched_agent_pins: tuple[UnmatchedAgentPin, ...] = ()
    """For VALID: agent pins no registration in the bundle matched (they checked nothing)."""
    wrong_key_hint: str | None = None
    """For WRONG_KEY: what to pin instead, when the bundle shows it (a rotation to the pinned
    key inside records a checkpoint by a pinned key covers, root and all)."""
    unconfirmed_rotation: int | None = None
    """For WRONG_KEY: a record claiming an audit key rotation to a pinned key that no checkpoint
    by a pinned key confirms: anyone can write that claim."""
    unproven_successor_record: int | None = None
    """For WRONG_KEY: a record after that claim whose event the pinned key signed. It proves
    nothing about the records before it (an event's signature does not cover its place in the
    log: it can be copied from another export), so it names no key either."""
    newer_actions: NewerActions | None = None
    """For NEWER: the records whose action this verifier does not know."""

    def trusted_audit_keys(self) -> list[PublicIdentity]:
        """The pinned audit keys and those the bundle's rotation records introduced from them."""
        keys = {key.key_id: key for key in self.pinned_keys}
        for rotation in self.key_rotations:
            keys.setdefault(rotation.new_key.key_id, rotation.new_key)
        return list(keys.values())

    def not_checked(self) -> list[str]:
        """What a VALID or NEWER result did not prove, one sentence each (the lines after the
        verdict line)."""
        if not self.verified:
            return []
        lines = []
        if self.newer_actions is not None:
            lines.append(self.newer_actions.describe())
        if not self.auditor_checkpoint_sizes:
            lines.append(NOT_CHECKED_ROLLBACK)
        return lines

    @property
    def ok(self) -> bool:
        """Whether the bundle verified with nothing left unchecked (VALID)."""
        return self.verdict is Verdict.VALID

    @property
    def verified(self) -> bool:
        """Whether every check passed: VALID, or NEWER (records of actions this verifier does
        not know, their meaning unchecked)."""
        return self.verdict in (Verdict.VALID, Verdict.NEWER)

    @property
    def exit_code(self) -> int:
        """0 valid, 1 invalid, 2 unreadable, 3 wrong key, 5 newer."""
        return EXIT_CODES[self.verdict]

    @property
    def code(self) -> str:
        """A machine-readable outcome for ``--json``: ``valid``, ``invalid``, ``unreadable``,
        ``wrong_key``, ``newer``."""
        return self.verdict.value

    def unmatched_pins_warning(self) -> str | None:
        """The WARNING naming the agent pins that matched no registration, or None."""
        pins = self.unmatched_agent_pins
        if not pins:
            return None
        listed = []
        for pin in pins[:MAX_LISTED_UNMATCHED_PINS]:
            similar = ", ".join(
                f"agent {name}" if name == agent_id else f"{name}, agent {agent_id}"
                for name, agent_id in pin.similar
            )
            listed.append(f"{pin.name} (looks like {similar})" if similar else pin.name)
        more = len(pins) - len(listed)
        and_more = f" and {more} more" if more else ""
        single = len(pins) == 1
        return (
            f"WARNING: --agent-key {'pin' if single else 'pins'} {', '.join(listed)}{and_more} "
            f"matched no agent id, name or hostname registered in this bundle, so "
            f"{'it' if single else 'they'} checked nothing (an agent of another team, or one "
            "registered under another name: whoever registers an agent chooses its name and "
            "hostname, so pin agents by id, agt_...)"
        )

    def audit_keys_used(self) -> list[PublicIdentity]:
        """The pinned keys that signed the checkpoint or a record, in the order pinned."""
        used = {key.key_id for key in self.signing_keys if key.role == "audit"}
        if self.checkpoint_signer is not None:
            used.add(self.checkpoint_signer.key_id)
        return [key for key in self.pinned_keys if key.key_id in used]

    def summary(self, key_names: KeyNames | None = None) -> str:
        """One line for a human; ``key_names`` (key id -> file) names the pinned keys."""
        names = key_names or {}
        if self.verified:
            consistent = "".join(
                f", consistent with checkpoint at {size}" for size in self.previous_sizes
            )
            span = f" from {self.first_time} to {self.last_time}" if self.first_time else ""
            used = self.audit_keys_used()
            signed = ""
            if used:
                noun = "audit key" if len(used) == 1 else "audit keys"
                signed = f"; signed by pinned {noun} " + ", ".join(
                    _key_label(key, names) for key in used
                )
            rotated = "".join(f"; {rotation.describe()}" for rotation in self.key_rotations)
            late = "".join(
                f"; WARNING: retired audit key {key.fingerprint} signed {count} more after its "
                "rotation (an instance not reloaded yet, or a leaked key)"
                for key, count in self.late_signatures
            )
            late += "".join(f"; {removed.describe()}" for removed in self.signed_after_removal)
            unmatched = self.unmatched_pins_warning()
            late += f"; {unmatched}" if unmatched else ""
            agents = [key.label() for key in self.signing_keys if key.role == "agent"]
            agent_list = f" ({', '.join(agents)})" if agents else ""
            if self.newer_actions is not None:
                newer = self.newer_actions.count
                late += (
                    f"; {newer} {'record' if newer == 1 else 'records'} of actions this "
                    "tucdesk-audit does not know (a newer release wrote them): see below"
                )
            verdict = "OK" if self.ok else "NEWER"
            return (
                f"{verdict}: {self.record_count} records of {self.origin}{span}, "
                f"{len(self.signers)} signing keys{agent_list}, root {_hex(self.root_hash)}"
                f"{consistent}{signed}{rotated}{late}"
            )
        if self.verdict is Verdict.UNREADABLE:
            return f"UNREADABLE: {self.reason}"
        if self.verdict is Verdict.WRONG_KEY:
            pinned = ", ".join(_key_label(key, names) for key in self.pinned_keys)
            are = "keys are" if len(self.pinned_keys) > 1 else "key is"
            if self.wrong_key_hint is not None:
                return (
                    f"WRONG KEY: no pinned key signed this bundle's first record: it is signed "
                    f"by {self.bundle_signer}, the pinned {are} {pinned}. {self.wrong_key_hint}"
                )
            claim = ""
            if self.unconfirmed_rotation is not None and self.unproven_successor_record is None:
                claim = (
                    f" Record {self.unconfirmed_rotation} claims an audit key rotation to the "
                    "pinned key, but the pinned key signed nothing in this bundle: a claim "
                    "anyone can write, not a reason to pin another key."
                )
            elif self.unconfirmed_rotation is not None:
                claim = (
                    f" Record {self.unconfirmed_rotation} claims an audit key rotation to the "
                    f"pinned key, and the pinned key signed the event of record "
                    f"{self.unproven_successor_record}, but no checkpoint by a pinned key covers "
                    "these records, and an event's signature does not cover its place in the log "
                    "(it may be copied from another export): nothing here shows which key the "
                    "log began under. Take that key from an export or checkpoint kept from "
                    "before the rotation, or ask the rendezvous admin."
                )
            return (
                f"WRONG KEY: no pinned key signed this bundle: it is signed by "
                f"{self.bundle_signer}, the pinned {are} {pinned}. Check --key: compare "
                "'tucdesk-audit key FILE' with 'tucdesk-rendezvous keys show' (or the bundle "
                f"was signed by someone else).{claim}"
            )
        where = f"record {self.bad_seq}" if self.bad_seq is not None else "bundle"
        line = f" (line {self.bad_line})" if self.bad_line is not None else ""
        return f"INVALID: {where}{line}: {self.reason}"

    def to_json(self, key_names: KeyNames | None = None) -> dict[str, object]:
        """The result as a JSON-ready dict (``--json``); ``key_names`` as for ``summary``."""
        names = key_names or {}
        used = {key.key_id for key in self.audit_keys_used()}
        return {
            "format": JSON_FORMAT,
            "verdict": self.verdict.value,
            "code": self.code,
            "message": self.summary(names),
            "not_checked": self.not_checked(),
            "auditor_checkpoint_sizes": list(self.auditor_checkpoint_sizes),
            "wrong_key_hint": self.wrong_key_hint,
            "unconfirmed_rotation_at": self.unconfirmed_rotation,
            "unproven_successor_record_at": self.unproven_successor_record,
            "verified": self.verified,
            "newer_actions": None if self.newer_actions is None else self.newer_actions.to_json(),
            "pinned_keys": [
                {
                    "file": names.get(key.key_id),
                    "fingerprint": key.fingerprint,
                    "key_id": key.key_id,
                    "signed": key.key_id in used,
                }
                for key in self.pinned_keys
            ],
            "signing_keys": [key.to_json() for key in self.signing_keys],
            "key_rotations": [rotation.to_json() for rotation in self.key_rotations],
            "late_signatures": [
                {"fingerprint": key.fingerprint, "key_id": key.key_id, "count": count}
                for key, count in self.late_signatures
            ],
            "signed_after_removal": [removed.to_json() for removed in self.signed_after_removal],
            "unmatched_agent_pins": [
                {
                    "pin": pin.name,
                    "fingerprint": pin.fingerprint,
                    "similar": [
                        {"name": name, "agent_id": agent_id} for name, agent_id in pin.similar
                    ],
                }
                for pin in self.unmatched_agent_pins
            ],
            "bundle_signer": self.bundle_signer,
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


class _WrongKey(_Invalid):
    """Internal: the first signed thing in the bundle (record 0, or the checkpoint of an empty
    log) is signed by no pinned key. It is reported as a wrong --key only if the bundle's own
    key list names an audit key that does verify it (``signed_by``); otherwise as INVALID."""

    def __init__(
        self,
        reason: str,
        seq: int | None,
        signed_by: Callable[[PublicIdentity], bool],
        trailer: bytes | None = None,
        signer_key_id: str | None = None,
        first_record: AuditRecord | None = None,
    ) -> None:
        super().__init__(reason, seq)
        self.signed_by = signed_by
        self.signer_key_id = signer_key_id
        """The key id record 0 names as its signer (None for an empty log's checkpoint)."""
        self.first_record = first_record
        """Record 0, when that is what no pinned key signed (the rest is scanned after it)."""
        self.trailer = trailer
        """The checkpoint line, when that is what no pinned key signed (the bundle's end)."""


def read_small_file(path: Path | str, limit: int) -> bytes:
    """At most ``limit`` bytes of the regular file ``path``; OSError for anything else. Opened
    without blocking and checked on the descriptor, so a FIFO (or a device) put where a file is
    expected is refused at once instead of waiting for a writer for ever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        chunks: list[bytes] = []
        remaining = limit
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class EarlierCheckpoint:
    """A checkpoint note an auditor kept, read but not yet trusted: its signature is checked
    once the bundle's records are read, against the pinned keys and the audit keys the
    bundle's rotation records introduce from them (a checkpoint saved after a rotation is
    signed by the new key)."""

    source: str
    note: bytes
    claimed: Checkpoint
    """What the note says, used only to know which prefix root to compute until it verifies."""

    def open(self, audit_keys: Sequence[PublicIdentity]) -> tuple[Checkpoint, PublicIdentity]:
        """The checkpoint and the key that signed it, if a key in ``audit_keys`` did;
        BundleError otherwise."""
        try:
            return open_checkpoint(self.note, audit_keys)
        except AuditError as error:
            raise BundleError(f"{self.source}: earlier checkpoint is unusable: {error}") from None


def read_checkpoint_note(note: bytes) -> Checkpoint:
    """What a checkpoint note says, without checking who signed it; AuditError if it is not a
    checkpoint note at all."""
    return parse_checkpoint_body(parse_note(note).text)


def load_previous_checkpoint(
    path: Path, audit_keys: Sequence[PublicIdentity]
) -> EarlierCheckpoint:
    """Read a checkpoint note an auditor kept; BundleError if it cannot be used. A note signed
    by none of ``audit_keys`` is checked later, against the keys the bundle introduces."""
    try:
        note = read_small_file(path, MAX_BUNDLE_LINE_BYTES + 1)
    except OSError as error:
        raise BundleError(f"{path}: cannot read earlier checkpoint ({error.strerror})") from None
    try:
        claimed = read_checkpoint_note(note)
        open_checkpoint(note, audit_keys)
    except UntrustedNote:
        pass  # perhaps by a key a rotation in the bundle introduces: checked after the records
    except AuditError as error:
        raise BundleError(f"{path}: earlier checkpoint is unusable: {error}") from None
    return EarlierCheckpoint(str(path), note, claimed)


def verify_bundle(
    source: Path | str | BinaryIO,
    audit_keys: Sequence[PublicIdentity],
    *,
    previous_checkpoints: Sequence[Checkpoint | EarlierCheckpoint] = (),
    progress: ProgressCallback | None = None,
    on_record: RecordCallback | None = None,
    keep_prefix_sizes: Iterable[int] = (),
    agent_pins: Mapping[str, str] | None = None,
) -> VerificationResult:
    """Verify a bundle (a path or a binary stream) trusting only ``audit_keys``.

    ``previous_checkpoints`` are earlier checkpoints the auditor kept (a Checkpoint already
    verified, or an EarlierCheckpoint from load_previous_checkpoint, verified here against the
    pinned keys and those the bundle's rotations introduce); the bundle must extend each of
    them. ``agent_pins`` (agent id or hostname -> fingerprint) refuse a registration of that
    agent with another key. ``progress``, if given, is
    called every PROGRESS_EVERY_RECORDS records with (records checked, bytes read);
    ``on_record`` with each record that passed its checks (trust its findings only if the
    result is VALID). The result keeps the Merkle root of the first N records for each N in
    ``keep_prefix_sizes`` the bundle reaches.
    """
    if not audit_keys:
        return VerificationResult(Verdict.UNREADABLE, "no pinned audit key was given")
    verifier = _Verifier(
        audit_keys, previous_checkpoints, progress, on_record, keep_prefix_sizes, agent_pins
    )
    if isinstance(source, (str, Path)):
        try:
            with Path(source).open("rb") as stream:
                return verifier.run(stream)
        except OSError as error:
            return VerificationResult(
                Verdict.UNREADABLE, f"{source}: cannot read bundle ({error.strerror})"
            )
    return verifier.run(source)


class _Verifier:
    def __init__(
        self,
        audit_keys: Sequence[PublicIdentity],
        previous: Sequence[Checkpoint | EarlierCheckpoint],
        progress: ProgressCallback | None = None,
        on_record: RecordCallback | None = None,
        keep_prefix_sizes: Iterable[int] = (),
        agent_pins: Mapping[str, str] | None = None,
    ) -> None:
        self._audit_keys = list(audit_keys)
        self._progress = progress
        self._on_record = on_record
        self._bytes_read = 0
        self._trust = SignerTrust(audit_keys, agent_pins)
        self._previous = list(previous)
        self._prefix_roots: dict[int, bytes] = {}
        self._kept_sizes = set(keep_prefix_sizes)
        self._wanted_sizes = {_claimed(checkpoint).size for checkpoint in previous}
        self._wanted_sizes |= self._kept_sizes
        self._auditor_sizes: list[int] = []
        self._wrong_key_hint: str | None = None
        self._unconfirmed_rotation: int | None = None
        self._unproven_successor_record: int | None = None
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
        self._checkpoint: Checkpoint | None = None
        self._checkpoint_signer: PublicIdentity | None = None
        self._bundle_signer: str | None = None
        self._rotations: list[KeyRotation] = []
        # Records of actions this verifier does not know: count by action, and the first one.
        self._newer_counts: dict[str, int] = {}
        self._newer_uncounted = 0
        self._newer_first: tuple[int, int, str] | None = None  # seq, line, action
        self._newer_in_agent_name = 0

    def run(self, stream: BinaryIO) -> VerificationResult:
        try:
            try:
                self._header = self._read_header(stream)
                self._check_previous_origins()
                self._verify(stream)
            except _WrongKey as wrong:
                # Only now (never on a bundle that verifies) read the rest: a bundle in which
                # anything verifies under a pinned key was tampered with, not checked with the
                # wrong --key, however its first record was re-signed.
                assert self._header is not None
                if wrong.first_record is not None:
                    scan = _scan_rest(
                        stream, self._audit_keys, self._header.origin, wrong.first_record
                    )
                else:  # an empty log: its checkpoint was the one signed thing, and the last
                    scan = _RestScan(False, wrong.trailer or b"")
                successor = scan.confirmed_successor()
                if scan.pinned_signed and successor is None and scan.successor_signed_at is None:
                    raise
                self._bundle_signer = self._name_first_signer(wrong, scan)
                if successor is not None:
                    self._wrong_key_hint = self._successor_hint(scan, successor)
                else:
                    # Claimed by a record the first record's key signed: anyone can write it.
                    self._unconfirmed_rotation = scan.pinned_introduced_at
                    self._unproven_successor_record = scan.successor_signed_at
                return self._result(Verdict.WRONG_KEY, "no pinned key signed this bundle")
        except BundleError as error:
            return self._result(Verdict.UNREADABLE, str(error))
        except _Invalid as failure:
            return self._result(Verdict.INVALID, failure.reason, failure.seq)
        except OSError as error:
            return self._result(Verdict.UNREADABLE, f"reading the bundle failed ({error})")
        return self._result(Verdict.VALID if self._newer_first is None else Verdict.NEWER)

    def _successor_hint(self, scan: _RestScan, successor: PublicIdentity) -> str:
        """What to do when the pinned key is one a rotation in the bundle introduced and a
        checkpoint a pinned key signed covers exactly the bundle's records, the rotation among
        them. The rotation itself is signed by the old key, so the bundle cannot vouch for that
        key: the auditor must have it from elsewhere."""
        signer = scan.checkpoint_signer
        assert signer is not None
        by = "it" if signer.key_id == successor.key_id else f"pinned key {signer.fingerprint}"
        return (
            f"The pinned key {successor.fingerprint} appears as the successor named by the "
            f"audit key rotation at record {scan.pinned_introduced_at}, and {by} signed the "
            "checkpoint over these records: if you pinned the current key, the log began under "
            f"{self._bundle_signer}. Pin that key (the verifier then follows the rotation) only "
            "if you obtained it out of band: compare it with the key of an export or checkpoint "
            "you kept from before the rotation, or ask the rendezvous admin "
            "('tucdesk-rendezvous keys show'); the rotation record is signed by that key itself, "
            "so this bundle cannot vouch for it"
        )

    def _name_first_signer(self, wrong: _WrongKey, scan: _RestScan) -> str:
        """Who signed what no pinned key did, for the WRONG KEY message: by fingerprint when
        the bundle's key list names a key that verifies it, else as the bundle's rotation
        record names it (a claim: only a pinned key makes it more), else by key id."""
        signer = _bundle_audit_key(scan.last, wrong.signed_by)
        if signer is not None:
            return f"audit key {signer.fingerprint}"
        if scan.claimed_fingerprint is not None:
            return f"audit key {scan.claimed_fingerprint}"
        if wrong.signer_key_id is None:
            return "an audit key the bundle names nowhere"
        return f"key id {wrong.signer_key_id} (named by no key in the bundle)"

    def _signing_keys(self) -> tuple[SigningKey, ...]:
        keys = []
        for key_id, records in self._signers.items():
            described = self._trust.describe(key_id)
            if described is not None:
                role, agent_id, key = described
                name = None if agent_id is None else self._trust.agent_name(agent_id)
                keys.append(SigningKey(key_id, role, key.fingerprint, records, agent_id, name))
        return tuple(keys)

    def _result(
        self, verdict: Verdict, reason: str | None = None, seq: int | None = None
    ) -> VerificationResult:
        header = self._header
        valid = verdict in (Verdict.VALID, Verdict.NEWER)
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
            checkpoint_note=self._checkpoint_note if valid else None,
            checkpoint=self._checkpoint if valid else None,
            checkpoint_signer=self._checkpoint_signer if valid else None,
            signing_keys=self._signing_keys(),
            pinned_keys=tuple(self._audit_keys),
            bundle_signer=self._bundle_signer,
            prefix_roots={
                size: root for size, root in self._prefix_roots.items() if size in self._kept_sizes
            }
            if valid
            else {},
            key_rotations=tuple(self._rotations),
            late_signatures=tuple(
                (key, self._trust.late_signatures[key.key_id])
                for key in self._trust.audit_keys
                if key.key_id in self._trust.late_signatures
            ),
            signed_after_removal=tuple(
                SignedAfterRemoval(
                    noted.agent_id, self._trust.agent_name(noted.agent_id), noted.removal_seq,
                    noted.count, tuple(noted.seqs),
                )  # fmt: skip
                for noted in self._trust.signed_after_removal.values()
            ),
            auditor_checkpoint_sizes=tuple(self._auditor_sizes),
            # Only a bundle read to its end shows that no registration matched a pin.
            unmatched_agent_pins=tuple(self._trust.unmatched_agent_pins()) if valid else (),
            wrong_key_hint=self._wrong_key_hint,
            unconfirmed_rotation=self._unconfirmed_rotation,
            unproven_successor_record=self._unproven_successor_record,
            newer_actions=self._newer_actions() if verdict is Verdict.NEWER else None,
        )

    def _newer_actions(self) -> NewerActions | None:
        if self._newer_first is None:
            return None
        seq, line, _ = self._newer_first
        counts = sorted(self._newer_counts.items(), key=lambda item: (-item[1], item[0]))
        return NewerActions(
            count=sum(self._newer_counts.values()) + self._newer_uncounted,
            actions=tuple(counts),
            first_seq=seq,
            first_line=line,
            in_agent_name=self._newer_in_agent_name,
            uncounted=self._newer_uncounted,
        )

    def _note_newer_action(self, record: AuditRecord, seq: int) -> None:
        """Count a record (already verified) whose action this verifier does not know."""
        event = record.event
        action = event.action.value
        if self._newer_first is None:
            self._newer_first = (seq, self._line, action)
        if action in self._newer_counts or len(self._newer_counts) < MAX_COUNTED_NEWER_ACTIONS:
            self._newer_counts[action] = self._newer_counts.get(action, 0) + 1
        else:
            self._newer_uncounted += 1
        if event.actor.kind is ActorKind.AGENT and self._trust.is_audit_key(event.signer):
            self._newer_in_agent_name += 1

    def _newer_hint(self) -> str:
        """For a record no trusted key signed after a record of an unknown action: that record
        may have introduced the key (a new kind of rotation or registration)."""
        if self._newer_first is None:
            return ""
        seq, line, action = self._newer_first
        return (
            f" (record {seq}, line {line}, has action {action!r}, which this tucdesk-audit does "
            "not know: from a newer TucDesk release, it may be a new kind of key rotation or "
            "registration that introduced this key; verify with an upgraded tucdesk-audit)"
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
        # A transformed file (not the bytes exported) is INVALID, as every other change is.
        if line.startswith(UTF8_BOM):
            raise _Invalid(
                "the bundle starts with a byte-order mark (an editor or tool added it): "
                "a bundle is plain UTF-8 without one; use the file as exported",
                None,
            )
        if line.endswith(b"\r\n"):
            raise _Invalid(
                "the bundle has CRLF (Windows) line endings: a bundle's lines end with LF only; "
                "use the file as exported (or convert it back, e.g. with dos2unix)",
                None,
            )
        header = parse_header(line)
        if header.origin.rpartition(ORIGIN_TEAM_SEPARATOR)[2] != header.team_id:
            raise _Invalid("the header's origin does not name its team", None)
        return header

    def _check_previous_origins(self) -> None:
        assert self._header is not None
        for previous in self._previous:
            claimed = _claimed(previous)
            if claimed.origin != self._header.origin:
                # The auditor's own input, not the bundle: a usage problem, not tampering.
                source = (
                    previous.source
                    if isinstance(previous, EarlierCheckpoint)
                    else "the earlier checkpoint"
                )
                raise BundleError(
                    f"{source}: this checkpoint is of another log: {claimed.origin} (the "
                    f"bundle is {self._header.origin}); give the checkpoint kept for this log"
                )
            if claimed.size == 0:
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
                if _is_trailer_line(line):
                    raise _Invalid(
                        "the checkpoint line does not end with a newline (the file's final "
                        "newline was removed, or it was cut short)",
                        None,
                    )
                raise _Invalid("the last line is cut short (truncated?)", seq)
            body = line[:-1]
            try:
                value = strict_json(body)
            except AuditError as error:
                raise _Invalid(_line_problem(body, error), seq) from None
            # ValueError too: a malformed line must end verification with a reason, never a
            # traceback, even where a library rejects it before our own checks do.
            if is_trailer(value):
                try:
                    self._verify_trailer(value, body, stream)
                except (AuditError, ProtocolError, ValueError) as error:
                    raise _Invalid(f"checkpoint: {error}", None) from None
                self._check_auditor_checkpoints()
                return
            record: AuditRecord | None = None
            try:
                record = AuditRecord.from_parsed(value, body, newer_actions=True)
                self._verify_record(record, seq)
            except (AuditError, ProtocolError, ValueError) as error:
                reason = _line_problem(body, error)
                if record is not None and isinstance(record.event.action, UnknownAction):
                    reason += (
                        f" (on a record of an unknown action, {record.event.action.value!r}: a "
                        "newer release's, or edited)"
                    )
                raise _Invalid(reason, seq) from None
            if self._on_record is not None:
                self._on_record(record)
            if progress is not None and (seq + 1) % PROGRESS_EVERY_RECORDS == 0:
                progress(seq + 1, self._bytes_read)

    def _verify_record(self, record: AuditRecord, seq: int) -> None:
        assert self._header is not None
        if record.seq != seq:
            raise _Invalid(self._out_of_sequence(record, seq), seq)
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
        rotations = len(self._trust.rotations)
        try:
            self._trust.accept(record.signed, record.time)
        except UnknownSigner as error:
            if not self._signers:  # nothing so far was signed by a pinned key
                raise _WrongKey(
                    str(error), seq, partial(_signs_record, record), signer_key_id=event.signer,
                    first_record=record,
                ) from None
            if self._newer_first is not None:
                raise _Invalid(f"{error}{self._newer_hint()}", seq) from None
            raise
        if len(self._trust.rotations) != rotations:
            rotation = self._trust.rotations[-1]
            self._rotations.append(KeyRotation(seq, rotation.old_key, rotation.new_key))
        if isinstance(event.action, UnknownAction):
            self._note_newer_action(record, seq)
        self._signers[event.signer] = self._signers.get(event.signer, 0) + 1
        self._prev_hash = record.record_hash
        self._last_time = record.time
        if self._first_time is None:
            self._first_time = format_time(record.time)
        self._frontier.append(record.leaf_hash)
        if self._frontier.size in self._wanted_sizes:
            self._prefix_roots[self._frontier.size] = self._frontier.root()

    def _out_of_sequence(self, record: AuditRecord, seq: int) -> str:
        # Records before this one passed the sequence check, so record k sits on line k + 2.
        if 0 <= record.seq < seq:
            first_line = record.seq + FIRST_RECORD_LINE
            if record.seq == seq - 1 and record.record_hash == self._prev_hash:
                return f"record {record.seq} appears twice (lines {first_line} and {self._line})"
            return (
                f"sequence number {record.seq} where {seq} was expected: record {record.seq} "
                f"is already on line {first_line} (a record was duplicated, inserted or moved)"
            )
        return (
            f"sequence number {record.seq} where {seq} was expected "
            "(a record was deleted, inserted or moved)"
        )

    def _verify_trailer(self, value: dict[str, object], body: bytes, stream: BinaryIO) -> None:
        assert self._header is not None
        count = self._frontier.size
        trailer = parse_trailer(value, body)
        after = stream.read(1)
        if after:
            self._line += 1  # report the extra line itself, not the checkpoint's
            what = "a blank line" if after in (b"\n", b"\r") else "another line"
            raise _Invalid(f"{what} after the checkpoint (the checkpoint must be last)", None)
        try:
            # Pinned keys, and the ones rotation records in this bundle introduced.
            checkpoint, signer = open_checkpoint(trailer.checkpoint, self._trust.audit_keys)
        except UntrustedNote:
            if count == 0:  # no record either: nothing at all is signed by a pinned key
                signed_by = partial(_signs_note, trailer.checkpoint)
                reason = "checkpoint: no signature by a pinned key"
                raise _WrongKey(reason, None, signed_by, body) from None
            raise
        if checkpoint.origin != self._header.origin:
            raise _Invalid(f"the checkpoint is for {checkpoint.origin}", None)
        self._trust.note_retired_signature(signer.key_id, count)
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
        self._checkpoint = checkpoint
        self._checkpoint_signer = signer
        if trailer.previous_checkpoint is not None:
            previous, previous_signer = open_checkpoint(
                trailer.previous_checkpoint, self._trust.audit_keys
            )
            self._trust.note_retired_signature(previous_signer.key_id, previous.size)
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

    def _check_auditor_checkpoints(self) -> None:
        """The bundle extends each checkpoint the auditor kept (BundleError for one that is
        not a usable checkpoint of this log: the auditor's input, not the bundle's fault)."""
        checkpoint = self._checkpoint
        assert checkpoint is not None
        for kept in self._previous:
            # Against the trust the records established: pinned keys and the audit keys their
            # rotation records introduced (a retired key's checkpoint stays valid for its size).
            if isinstance(kept, EarlierCheckpoint):
                previous, signer = kept.open(self._trust.audit_keys)
                self._check_signer_existed(kept.source, previous, signer)
            else:
                previous = kept
            self._check_extends(previous, checkpoint)
            if self._prefix_roots.get(previous.size) != previous.root_hash:
                raise _Invalid(
                    f"the first {previous.size} records differ from the earlier checkpoint "
                    "(history was rewritten)",
                    None,
                )
            self._checked_sizes.append(previous.size)
            self._auditor_sizes.append(previous.size)

    def _check_signer_existed(
        self, source: str, previous: Checkpoint, signer: PublicIdentity
    ) -> None:
        """BundleError if ``signer`` is an audit key a rotation record introduced (not one the
        auditor pinned) and ``previous`` covers none of the records from that rotation on: a key
        cannot have signed a checkpoint over records from before it existed."""
        if any(key.key_id == signer.key_id for key in self._audit_keys):
            return
        for rotation in self._rotations:
            if rotation.new_key.key_id == signer.key_id and previous.size <= rotation.seq:
                raise BundleError(
                    f"{source}: earlier checkpoint is unusable: it covers {previous.size} "
                    f"records, all from before record {rotation.seq}, the audit key rotation "
                    f"that introduced its signer {signer.fingerprint}; that key did not exist "
                    "yet (a checkpoint forged with the new key?)"
                )

    def _check_extends(self, previous: Checkpoint, checkpoint: Checkpoint) -> None:
        if previous.origin != checkpoint.origin:
            raise _Invalid(f"the earlier checkpoint is for {previous.origin}", None)
        if previous.size > checkpoint.size:
            raise _Invalid(
                f"rollback: the earlier checkpoint covers {previous.size} records, "
                f"this bundle only {checkpoint.size}",
                None,
            )


def _claimed(previous: Checkpoint | EarlierCheckpoint) -> Checkpoint:
    return previous.claimed if isinstance(previous, EarlierCheckpoint) else previous


def _hex(value: bytes | None) -> str:
    return "-" if value is None else value.hex()


def _line_problem(body: bytes, error: Exception) -> str:
    """Why a record line was refused, naming the common accidents rather than their symptom."""
    if body.endswith(b"\r"):
        return "the line ends with CRLF (a Windows line ending)"
    if not body:
        return "a blank line where a record was expected"
    return str(error)


def _key_label(key: PublicIdentity, names: KeyNames) -> str:
    name = names.get(key.key_id)
    return f"{key.fingerprint} ({name})" if name else key.fingerprint


def _is_trailer_line(line: bytes) -> bool:
    try:
        return is_trailer(strict_json(line))
    except (AuditError, ValueError):
        return False


def _signs_record(record: AuditRecord, key: PublicIdentity) -> bool:
    try:
        record.signed.verify(key)
    except (AuditError, ProtocolError):
        return False
    return True


def _signs_note(note: bytes, key: PublicIdentity) -> bool:
    try:
        open_checkpoint(note, [key])
    except AuditError:
        return False
    return True


@dataclass
class _RestScan:
    """What the rest of a bundle whose first record no pinned key signed shows."""

    pinned_signed: bool
    """Some record (or the checkpoint) verifies under a pinned key."""
    last: bytes
    """The last line, without its newline."""
    pinned_introduced_at: int | None = None
    """The record of an audit key rotation naming a pinned key as the new key: a claim made by
    whoever signed that record, never by a pinned key."""
    introduced_key: PublicIdentity | None = None
    """The pinned key that rotation names."""
    successor_signed_at: int | None = None
    """The first record after that rotation, in its place in the chain as read, whose event
    verifies under the key it names. Only tells a wrong --key from tampering: the signature
    covers the event, not its seq or prev_hash, so a copied event can be re-chained anywhere."""
    checkpoint_signer: PublicIdentity | None = None
    """The pinned key that signed a checkpoint of this log over exactly the bundle's records
    (its size and Merkle root recomputed from the lines read), the rotation among them."""
    claimed_fingerprint: str | None = None
    """The fingerprint a rotation record signed by record 0's signer names as the key it
    retires: record 0's signer's, if that record is genuine."""
    frontier: MerkleFrontier = field(default_factory=MerkleFrontier)
    """The Merkle tree of the record lines read so far (record 0 first)."""
    irregular: bool = False
    """A blank line came between the records: no checkpoint covers those lines as read."""

    def awaits_successor(self, key_id: str, position: int) -> bool:
        """Whether a signature by ``key_id`` on the record at ``position`` would be the first
        by the key a rotation named after that rotation."""
        return (
            self.introduced_key is not None
            and self.pinned_introduced_at is not None
            and self.successor_signed_at is None
            and key_id == self.introduced_key.key_id
            and position > self.pinned_introduced_at
        )

    def confirmed_successor(self) -> PublicIdentity | None:
        """The pinned key a rotation in the bundle named, if a pinned key signed the checkpoint
        over these very records; None when only the claim (or a copyable event) shows it."""
        return self.introduced_key if self.checkpoint_signer is not None else None


def _scan_rest(
    stream: BinaryIO, audit_keys: Sequence[PublicIdentity], origin: str, first: AuditRecord
) -> _RestScan:
    """Read the rest of the bundle after record 0 (``first``): whether any record in it or its
    checkpoint verifies under a pinned key, whether an audit key rotation names a pinned key as
    the new key and a checkpoint of ``origin`` by a pinned key covers exactly the records read
    (the rotation and record 0 among them), and what a rotation by record 0's signer says its
    fingerprint is. Bounded per line; every line is hashed once into the Merkle tree, but only
    lines naming a pinned key id or record 0's signer are parsed, so a bundle signed by another
    key is read at about the speed of the disk. Nothing found here is trusted: it only tells a
    wrong --key from tampering, and names the first key only where a pinned key's checkpoint
    vouches for the records that say it."""
    pinned = {key.key_id: key for key in audit_keys}
    pinned_ids = [key_id.encode() for key_id in pinned]
    first_signer = first.event.signer
    first_id = first_signer.encode()
    rotation = f'"{Action.SERVICE_KEY_ROTATED.value}"'.encode()
    scan = _RestScan(False, b"")
    scan.frontier.append(first.leaf_hash)
    previous = first.canonical  # the line before the one being read
    pending: bytes | None = None  # the line read last: a record unless it is the checkpoint
    while line := stream.readline(MAX_BUNDLE_LINE_BYTES + 1):
        if not line.strip():
            scan.irregular = True
            continue
        if pending is not None:
            scan.frontier.append(leaf_hash(pending))
            previous = pending
        scan.last = pending = body = line.rstrip(b"\n")
        # Parse only what can still change the answer: a record by a pinned key until one
        # verifies (and, after a rotation naming a pinned key, until that key signs one), and
        # rotation records naming a pinned key or record 0's signer.
        names_pinned = any(key_id in body for key_id in pinned_ids)
        awaiting = scan.introduced_key is not None and scan.successor_signed_at is None
        if (names_pinned and (not scan.pinned_signed or awaiting)) or (
            rotation in body
            and (
                (scan.pinned_introduced_at is None and names_pinned)
                or (scan.claimed_fingerprint is None and first_id in body)
            )
        ):
            _scan_record(scan, body, previous, pinned, first_signer)
    if scan.last and (not scan.pinned_signed or scan.confirmed_successor() is None):
        signed = _checkpoint_signed_by_pinned_key(scan.last, audit_keys)
        if signed is not None:
            scan.pinned_signed = True
            checkpoint, signer = signed
            # Only a checkpoint over these very records vouches for the rotation among them
            # (and record 0): one of another log, or of other records, is a splice.
            if (
                scan.pinned_introduced_at is not None
                and not scan.irregular
                and checkpoint.origin == origin
                and checkpoint.size == scan.frontier.size
                and checkpoint.size > scan.pinned_introduced_at
                and checkpoint.root_hash == scan.frontier.root()
            ):
                scan.checkpoint_signer = signer
    return scan


def _scan_record(
    scan: _RestScan,
    body: bytes,
    previous: bytes,
    pinned: Mapping[str, PublicIdentity],
    first_signer: str,
) -> None:
    """Note what the line ``body`` (read after the line ``previous``) shows, if it is a record
    in its place: its seq its position, its prev_hash the hash of the line before it."""
    try:
        value = strict_json(body)
        if is_trailer(value):
            return
        record = AuditRecord.from_parsed(value, body, newer_actions=True)
    except (AuditError, ProtocolError, ValueError):
        return
    position = scan.frontier.size
    in_place = record.seq == position and record.prev_hash == hashlib.sha256(previous).digest()
    event = record.event
    key = pinned.get(event.signer)
    successor = in_place and scan.awaits_successor(event.signer, position)
    if key is not None and (not scan.pinned_signed or successor) and _signs_record(record, key):
        scan.pinned_signed = True
        if successor:
            scan.successor_signed_at = position
    if (
        event.action is not Action.SERVICE_KEY_ROTATED
        or event.context.get(ROTATION_PURPOSE_FIELD) != AUDIT_SIGNER_PURPOSE
    ):
        return
    new_key = pinned.get(str(event.context.get(ROTATION_NEW_KEY_ID_FIELD)))
    if scan.pinned_introduced_at is None and new_key is not None and in_place:
        scan.pinned_introduced_at = position
        scan.introduced_key = new_key
    old_fingerprint = event.context.get(ROTATION_OLD_FINGERPRINT_FIELD)
    if (
        scan.claimed_fingerprint is None
        and event.signer == first_signer
        and isinstance(old_fingerprint, str)
        and old_fingerprint.startswith("SHA256:")
        and len(old_fingerprint) <= MAX_FINGERPRINT_LENGTH
    ):
        scan.claimed_fingerprint = old_fingerprint


def _checkpoint_signed_by_pinned_key(
    last: bytes, audit_keys: Sequence[PublicIdentity]
) -> tuple[Checkpoint, PublicIdentity] | None:
    """The checkpoint on the bundle's last line and its signer, if a pinned key signed it."""
    try:
        value = strict_json(last)
        if not isinstance(value, dict) or not is_trailer(value):
            return None
        return open_checkpoint(parse_trailer(value, last).checkpoint, audit_keys)
    except (AuditError, ProtocolError, ValueError):
        return None


def _bundle_audit_key(
    last: bytes, signed_by: Callable[[PublicIdentity], bool]
) -> PublicIdentity | None:
    """The audit key the bundle's own key list names that signed what no pinned key did, read
    from the bundle's last line only to name it (never trusted); None if there is none."""
    try:
        value = strict_json(last)
        if not isinstance(value, dict) or not is_trailer(value):
            return None
        hints = parse_trailer(value, last).keys
    except (AuditError, ProtocolError, ValueError):
        return None
    for hint in hints:
        if hint.role == "audit" and signed_by(hint.public_key):
            return hint.public_key
    return None
