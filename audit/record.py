"""The audit record: its fields, limits, RFC 8785 canonical encoding, signing and strict parsing.

A record is two layers. The *event* is what a signer attests to: format version, when it
happened, team, actor, action, target, session, policy result, context and the signer's key id.
The signature (Ed25519, purpose ``Purpose.AUDIT_RECORD``) covers the RFC 8785 encoding of the
event alone, so an agent can sign an event on its host without knowing where it will land in
the log. The *record* wraps a signed event with what only the log knows: sequence number, log
time and the previous record's hash. Those are protected by the hash chain, the Merkle tree and
the audit-key-signed checkpoint instead of the event signature.

Wire form (one line of an export, always exactly its RFC 8785 encoding)::

    {"event": {"action": ..., "actor": {"display", "id", "kind"}, "context": {...},
               "occurred_at": ..., "policy_result": null | {"outcome", "reason", "rule_id"},
               "session_id": ..., "signer": <key id>, "target": ..., "team_id": ...,
               "version": 1},
     "prev_hash": <hex SHA-256 of the previous record's line, 64 zeros for seq 0>,
     "seq": <0-based>, "signature": <base64url Ed25519>, "time": <log time>}

An action is one of audit/actions.py; only a verifier parsing with ``newer_actions=True`` also
takes one of the same ``word.word`` form it does not know (``UnknownAction``: a newer release's).

Times are UTC RFC 3339 with exactly six fractional digits and a ``Z`` (fixed width: text order
is time order). Context values are strings, integers within ±(2**53 - 1), booleans, null, lists
and objects, nested at most MAX_CONTEXT_DEPTH deep and MAX_CONTEXT_BYTES long when encoded.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property, lru_cache
from typing import Any, TypeAlias

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from audit.actions import Action, ActorKind, PolicyOutcome
from audit.errors import RecordError
from audit.merkle import leaf_hash
from protocol.canonical_json import CanonicalJsonError, canonical_json
from protocol.domains import Purpose, framed_message
from protocol.errors import ProtocolError
from protocol.identity import SIGNATURE_SIZE, PublicIdentity, SigningIdentity, b64url, b64url_decode

RECORD_FORMAT_VERSION = 1
MAX_ID_LENGTH = 256
MAX_DISPLAY_LENGTH = 320
MAX_TARGET_LENGTH = 512
MAX_REASON_LENGTH = 1024
MAX_CONTEXT_BYTES = 16 * 1024
MAX_CONTEXT_DEPTH = 4
MAX_CONTEXT_KEY_LENGTH = 64
MAX_RECORD_BYTES = 64 * 1024
MAX_SAFE_INTEGER = 2**53 - 1
MAX_SEQUENCE_NUMBER = 2**53 - 1
MAX_EVENT_FUTURE_SKEW = timedelta(minutes=5)
HASH_SIZE = 32
GENESIS_HASH = bytes(HASH_SIZE)
MAX_CACHED_VERIFY_KEYS = 4096
MAX_ACTION_LENGTH = 64

JsonValue: TypeAlias = None | bool | int | str | list["JsonValue"] | dict[str, "JsonValue"]

_TIME_PATTERN = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
_HEX_HASH_PATTERN = re.compile(r"[0-9a-f]{64}")
# The form of every action in audit/actions.py: two lowercase ASCII words joined by a dot.
_ACTION_PATTERN = re.compile(r"[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*")
_EVENT_FIELDS = frozenset(
    {"version", "occurred_at", "team_id", "actor", "action", "target", "session_id",
     "policy_result", "context", "signer"}
)
_RECORD_FIELDS = frozenset({"seq", "time", "prev_hash", "event", "signature"})


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with microseconds and ``Z``, the only time form records use."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise RecordError("audit times must be timezone-aware")
    return moment.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_time(text: object) -> datetime:
    """Parse a record time, refusing every form but ``YYYY-MM-DDTHH:MM:SS.ffffffZ``."""
    if not isinstance(text, str) or not _TIME_PATTERN.fullmatch(text):
        raise RecordError("time is not RFC 3339 UTC with microseconds")
    try:
        return datetime.fromisoformat(text[:-1] + "+00:00")
    except ValueError:
        raise RecordError("time is not a real date and time") from None


class UnknownAction(str):
    """An action of the form of today's (``word.word``, lowercase ASCII) that this release does
    not know: written by a newer TucDesk release. Only made when a verifier parses a bundle with
    ``newer_actions=True``; the log never writes one (``AuditLog.append`` takes an Action, and
    events agents send are parsed strictly)."""

    __slots__ = ()

    def __new__(cls, text: object) -> UnknownAction:
        if not isinstance(text, str):
            raise RecordError("action must be a string")
        if len(text) > MAX_ACTION_LENGTH:
            raise RecordError(f"action is longer than {MAX_ACTION_LENGTH} characters")
        if not _ACTION_PATTERN.fullmatch(text):
            raise RecordError(
                f"action {text[:64]!r} is not of the form word.word (lowercase letters, digits "
                "and underscores)"
            )
        if text in _KNOWN_ACTIONS:
            raise RecordError(f"action {text!r} is known: use Action")
        return super().__new__(cls, text)

    @property
    def value(self) -> str:
        """The action as stored in the record (as ``Action.value`` is)."""
        return str.__str__(self)


_KNOWN_ACTIONS = frozenset(action.value for action in Action)


def parse_action(text: object, *, newer_actions: bool = False) -> Action | UnknownAction:
    """The action a record names: an Action, or (only with ``newer_actions``) an UnknownAction
    of a newer release; RecordError for anything else."""
    if isinstance(text, str) and text in _KNOWN_ACTIONS:
        return Action(text)
    if newer_actions:
        return UnknownAction(text)
    raise RecordError(f"unknown action {str(text)[:64]!r}")


@dataclass(frozen=True)
class Actor:
    """Who acted: a kind, a stable id, and something a human recognises (email, hostname)."""

    kind: ActorKind
    id: str
    display: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _enum(ActorKind, self.kind, "actor kind"))
        _check_text("actor id", self.id, MAX_ID_LENGTH, required=True)
        _check_text("actor display", self.display, MAX_DISPLAY_LENGTH)

    def to_json(self) -> dict[str, JsonValue]:
        """The actor as a JSON object."""
        return {"kind": self.kind.value, "id": self.id, "display": self.display}


@dataclass(frozen=True)
class PolicyResult:
    """A policy decision or approval outcome, with the rule that decided it and why."""

    outcome: PolicyOutcome
    rule_id: str | None = None
    reason: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "outcome", _enum(PolicyOutcome, self.outcome, "policy outcome"))
        if self.rule_id is not None:
            _check_text("policy rule id", self.rule_id, MAX_ID_LENGTH)
        _check_text("policy reason", self.reason, MAX_REASON_LENGTH)

    def to_json(self) -> dict[str, JsonValue]:
        """The result as a JSON object."""
        return {"outcome": self.outcome.value, "rule_id": self.rule_id, "reason": self.reason}


@dataclass(frozen=True)
class AuditEvent:
    """What a signer attests happened. Every instance is valid: limits are checked on creation."""

    occurred_at: datetime
    team_id: str
    actor: Actor
    action: Action | UnknownAction
    """An UnknownAction only when given as one (a verifier reading a newer release's bundle)."""
    signer: str
    target: str | None = None
    session_id: str | None = None
    policy_result: PolicyResult | None = None
    context: Mapping[str, JsonValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.action, UnknownAction):
            object.__setattr__(self, "action", _enum(Action, self.action, "action"))
        format_time(self.occurred_at)
        _check_text("team id", self.team_id, MAX_ID_LENGTH, required=True)
        _check_text("signer key id", self.signer, MAX_ID_LENGTH, required=True)
        if not isinstance(self.actor, Actor):
            raise RecordError("actor must be an Actor")
        if self.target is not None:
            _check_text("target", self.target, MAX_TARGET_LENGTH)
        if self.session_id is not None:
            _check_text("session id", self.session_id, MAX_ID_LENGTH)
        if self.policy_result is not None and not isinstance(self.policy_result, PolicyResult):
            raise RecordError("policy result must be a PolicyResult")
        if not isinstance(self.context, Mapping):
            raise RecordError("context must be a JSON object")
        # A private top-level copy, so the caller's dict changing later cannot desynchronise the
        # signed encoding from the fields (nested values must be treated as immutable too).
        object.__setattr__(self, "context", dict(self.context))
        _check_json(self.context, depth=0)
        if len(_canonical(dict(self.context))) > MAX_CONTEXT_BYTES:
            raise RecordError(f"context is larger than {MAX_CONTEXT_BYTES} bytes when encoded")

    def to_json(self) -> dict[str, JsonValue]:
        """The event as a JSON object (the signed part of a record)."""
        return {
            "version": RECORD_FORMAT_VERSION,
            "occurred_at": format_time(self.occurred_at),
            "team_id": self.team_id,
            "actor": self.actor.to_json(),
            "action": self.action.value,
            "target": self.target,
            "session_id": self.session_id,
            "policy_result": None if self.policy_result is None else self.policy_result.to_json(),
            "context": dict(self.context),
            "signer": self.signer,
        }

    @cached_property
    def canonical(self) -> bytes:
        """The RFC 8785 encoding of the event: the bytes the signature covers (after the prefix)."""
        return _canonical(self.to_json())

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 of ``canonical``: what identifies an agent's event when it is sent again."""
        # The signed content, not the signature: whoever holds the key could sign the same event
        # twice with different nonces, and it would still be one event.
        return hashlib.sha256(self.canonical).digest()

    @classmethod
    def from_json(cls, value: object, *, newer_actions: bool = False) -> AuditEvent:
        """Parse an event object strictly: exact field set, known action, limits. With
        ``newer_actions`` an action of today's form that this release does not know is kept as
        an UnknownAction (a verifier reading a newer release's records); never for the log."""
        data = _object(value, "event", _EVENT_FIELDS)
        if type(data["version"]) is not int or data["version"] != RECORD_FORMAT_VERSION:
            raise RecordError(f"event format version is not {RECORD_FORMAT_VERSION}")
        actor = _object(data["actor"], "actor", frozenset({"kind", "id", "display"}))
        policy = data["policy_result"]
        policy_result = None
        if policy is not None:
            fields = _object(policy, "policy result", frozenset({"outcome", "rule_id", "reason"}))
            policy_result = PolicyResult(fields["outcome"], fields["rule_id"], fields["reason"])
        if not isinstance(data["context"], dict):
            raise RecordError("context must be a JSON object")
        return cls(
            occurred_at=parse_time(data["occurred_at"]),
            team_id=data["team_id"],
            actor=Actor(actor["kind"], actor["id"], actor["display"]),
            action=parse_action(data["action"], newer_actions=newer_actions),
            signer=data["signer"],
            target=data["target"],
            session_id=data["session_id"],
            policy_result=policy_result,
            context=data["context"],
        )


@dataclass(frozen=True)
class SignedEvent:
    """An event and its signer's signature: what an agent hands the log, and what a record holds."""

    event: AuditEvent
    signature: bytes

    def verify(self, key: PublicIdentity) -> None:
        """Raise RecordError unless ``key`` is the event's signer and the signature verifies."""
        if _key_id(key.raw) != self.event.signer:
            raise RecordError(f"event names signer {self.event.signer}, not {key.key_id}")
        message = framed_message(Purpose.AUDIT_RECORD, self.event.canonical)
        try:
            _verify_key(key.raw).verify(message, self.signature)
        except (BadSignatureError, ValueError):
            raise RecordError("event signature does not verify") from None

    def to_json(self) -> dict[str, JsonValue]:
        """Transport form (agent to rendezvous): ``{"event": {...}, "signature": b64url}``."""
        return {"event": self.event.to_json(), "signature": b64url(self.signature)}

    @classmethod
    def from_json(cls, value: object) -> SignedEvent:
        """Parse the transport form strictly (the signature is not verified here)."""
        data = _object(value, "signed event", frozenset({"event", "signature"}))
        return cls(AuditEvent.from_json(data["event"]), _signature(data["signature"]))


def sign_event(identity: SigningIdentity, event: AuditEvent) -> SignedEvent:
    """Sign ``event`` (whose ``signer`` must be ``identity``'s key id) for the audit log."""
    if event.signer != identity.public.key_id:
        raise RecordError("an event's signer field must be the signing key's id")
    return SignedEvent(event, identity.sign(Purpose.AUDIT_RECORD, event.canonical))


@dataclass(frozen=True)
class AuditRecord:
    """A signed event placed in a team's log: sequence number, log time, previous hash."""

    seq: int
    time: datetime
    prev_hash: bytes
    signed: SignedEvent

    def __post_init__(self) -> None:
        if type(self.seq) is not int or not 0 <= self.seq <= MAX_SEQUENCE_NUMBER:
            raise RecordError("sequence number is out of range")
        format_time(self.time)
        if len(self.prev_hash) != HASH_SIZE:
            raise RecordError(f"previous hash is {HASH_SIZE} bytes")

    @property
    def event(self) -> AuditEvent:
        """The signed event this record carries."""
        return self.signed.event

    def to_json(self) -> dict[str, JsonValue]:
        """The record as a JSON object."""
        return {
            "seq": self.seq,
            "time": format_time(self.time),
            "prev_hash": self.prev_hash.hex(),
            "event": self.event.to_json(),
            "signature": b64url(self.signed.signature),
        }

    @cached_property
    def canonical(self) -> bytes:
        """The record's RFC 8785 encoding: exactly one line of an export, without the newline."""
        # RFC 8785 sorts members by name and "event" sorts first, so the record's encoding is the
        # event's (already computed for the signature) spliced before the other members'.
        rest = {
            "seq": self.seq,
            "time": format_time(self.time),
            "prev_hash": self.prev_hash.hex(),
            "signature": b64url(self.signed.signature),
        }
        return b'{"event":' + self.event.canonical + b"," + _canonical(rest)[1:]

    @cached_property
    def record_hash(self) -> bytes:
        """SHA-256 of the canonical encoding: the next record's ``prev_hash``."""
        return hashlib.sha256(self.canonical).digest()

    @cached_property
    def leaf_hash(self) -> bytes:
        """The record's RFC 6962 Merkle leaf hash."""
        return leaf_hash(self.canonical)

    @classmethod
    def from_line(cls, line: bytes) -> AuditRecord:
        """Parse one export line, refusing anything that is not exactly a canonical record."""
        if len(line) > MAX_RECORD_BYTES:
            raise RecordError(f"record is longer than {MAX_RECORD_BYTES} bytes")
        return cls.from_parsed(strict_json(line), line)

    @classmethod
    def from_parsed(
        cls, value: object, line: bytes, *, newer_actions: bool = False
    ) -> AuditRecord:
        """A record from ``line`` already parsed as ``value``; the bytes must be canonical.
        ``newer_actions`` as for ``AuditEvent.from_json`` (verifiers only)."""
        if len(line) > MAX_RECORD_BYTES:
            raise RecordError(f"record is longer than {MAX_RECORD_BYTES} bytes")
        data = _object(value, "record", _RECORD_FIELDS)
        seq = data["seq"]
        if type(seq) is not int:
            raise RecordError("sequence number is not an integer")
        prev_hash = data["prev_hash"]
        if not isinstance(prev_hash, str) or not _HEX_HASH_PATTERN.fullmatch(prev_hash):
            raise RecordError("previous hash is not 64 lowercase hex digits")
        record = cls(
            seq=seq,
            time=parse_time(data["time"]),
            prev_hash=bytes.fromhex(prev_hash),
            signed=SignedEvent(
                AuditEvent.from_json(data["event"], newer_actions=newer_actions),
                _signature(data["signature"]),
            ),
        )
        if record.canonical != line:
            raise RecordError("record is not in RFC 8785 canonical form")
        return record


@lru_cache(maxsize=MAX_CACHED_VERIFY_KEYS)
def _key_id(raw: bytes) -> str:
    return PublicIdentity(raw).key_id


@lru_cache(maxsize=MAX_CACHED_VERIFY_KEYS)
def _verify_key(raw: bytes) -> VerifyKey:
    # libsodium (PyNaCl) verifies Ed25519 about 2.5x faster than OpenSSL here, which is what
    # lets the offline verifier check 100,000-record bundles at the target rate. It is also the
    # stricter of the two (refuses small-order keys and non-canonical signatures).
    return VerifyKey(raw)


def strict_json(data: bytes) -> Any:
    """Parse JSON refusing floats, NaN and Infinity (records use integers only) as RecordError."""
    try:
        return json.loads(data, parse_float=_refuse_float, parse_constant=_refuse_float)
    except RecordError:
        raise
    except (ValueError, RecursionError):
        raise RecordError("not valid JSON") from None


def _refuse_float(text: str) -> Any:
    raise RecordError(f"non-integer number {text[:20]!r} is not allowed")


def _canonical(value: Any) -> bytes:
    try:
        return canonical_json(value)
    except CanonicalJsonError:
        raise RecordError("value has no RFC 8785 encoding") from None


def _enum(kind: type[Any], value: object, what: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        raise RecordError(f"unknown {what} {str(value)[:64]!r}") from None


def _check_text(what: str, value: object, limit: int, *, required: bool = False) -> None:
    if not isinstance(value, str):
        raise RecordError(f"{what} must be a string")
    if len(value) > limit:
        raise RecordError(f"{what} is longer than {limit} characters")
    if required and not value:
        raise RecordError(f"{what} must not be empty")


def _check_json(value: object, depth: int) -> None:
    if depth > MAX_CONTEXT_DEPTH:
        raise RecordError(f"context nests deeper than {MAX_CONTEXT_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            raise RecordError("context integers must lie within ±(2**53 - 1)")
        return
    if isinstance(value, list):
        for item in value:
            _check_json(item, depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str) or len(key) > MAX_CONTEXT_KEY_LENGTH:
                raise RecordError(f"context keys are strings of at most {MAX_CONTEXT_KEY_LENGTH}")
            _check_json(item, depth + 1)
        return
    raise RecordError(f"context values cannot be {type(value).__name__}")


def _object(value: object, what: str, fields: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RecordError(f"{what} is not a JSON object")
    if value.keys() != fields:
        missing = sorted(fields - value.keys())
        unknown = sorted(str(key)[:32] for key in value.keys() - fields)
        raise RecordError(f"{what} fields are wrong (missing {missing}, unknown {unknown})")
    return value


def _signature(value: object) -> bytes:
    if not isinstance(value, str):
        raise RecordError("signature is not a string")
    try:
        raw = b64url_decode(value, max_size=SIGNATURE_SIZE)
    except ProtocolError:
        raise RecordError("signature is not base64url") from None
    if len(raw) != SIGNATURE_SIZE or b64url(raw) != value:
        raise RecordError(f"signature is not {SIGNATURE_SIZE} bytes of canonical base64url")
    return raw
