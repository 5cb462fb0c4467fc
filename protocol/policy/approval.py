"""Approvals: an approver's signature over one exact request, checked against the signed roster.

The approver's CLI signs (Purpose.APPROVAL) the RFC 8785 encoding of an ApprovalStatement: the
request id, team, target agent, action, SHA-256 of the command argv, the policy version the
decision was made under, the requester's and approver's key thumbprints, and a validity window.
The session grant carries the signed statement; the agent verifies it against the approver key
in its own signed roster and against the request in front of it, so an approval cannot be moved
to another command, session, host, requester or policy version, cannot be self-given, and
expires. JSON form::

    {"statement": {"format": "tucdesk-approval-v1", "request_id", "team_id", "agent_id",
                   "action", "command_sha256", "policy_version", "requester_thumbprint",
                   "approver_thumbprint", "issued_at", "expires_at"},
     "signature": <b64url>}
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from protocol.canonical_json import CanonicalJsonError, canonical_json
from protocol.domains import Purpose
from protocol.errors import PayloadError, ProtocolError
from protocol.identity import SIGNATURE_SIZE, SigningIdentity, b64url, b64url_decode
from protocol.policy.errors import (
    ApprovalError,
    ApprovalExpiredError,
    ApprovalMismatchError,
    ApproverNotAuthorizedError,
    SelfApprovalError,
)
from protocol.policy.request import Action
from protocol.policy.roster import Roster

APPROVAL_FORMAT = "tucdesk-approval-v1"
MAX_APPROVAL_LIFETIME_SECONDS = 60 * 60
DEFAULT_APPROVAL_LIFETIME_SECONDS = 10 * 60
DEFAULT_CLOCK_SKEW_SECONDS = 60
MAX_APPROVAL_SIZE = 4 * 1024
MAX_IDENTIFIER_LENGTH = 128
MAX_SAFE_INTEGER = 2**53 - 1
_STATEMENT_KEYS = frozenset(
    {
        "format",
        "request_id",
        "team_id",
        "agent_id",
        "action",
        "command_sha256",
        "policy_version",
        "requester_thumbprint",
        "approver_thumbprint",
        "issued_at",
        "expires_at",
    }
)
_APPROVAL_KEYS = frozenset({"statement", "signature"})


def command_sha256(command: Sequence[str] | None) -> str:
    """Hex SHA-256 of the RFC 8785 encoding of the exec argv (a JSON list), or of ``null``.

    The argv is hashed exactly, not normalised: an approval is for these bytes only.
    """
    if command is not None and (
        isinstance(command, str) or not all(isinstance(arg, str) for arg in command)
    ):
        raise ApprovalError("a command is a list of text arguments")
    try:
        encoded = canonical_json(None if command is None else list(command))
    except CanonicalJsonError:
        raise ApprovalError("a command must be valid Unicode text") from None
    return hashlib.sha256(encoded).hexdigest()


@dataclass(frozen=True)
class ApprovalContext:
    """The request an approval must be for, as the verifier knows it from its own sources."""

    request_id: str
    team_id: str
    agent_id: str
    action: Action
    command: tuple[str, ...] | None
    requester_thumbprint: str
    policy_version: int


@dataclass(frozen=True)
class ApprovalStatement:
    """What an approver signs."""

    request_id: str
    team_id: str
    agent_id: str
    action: str
    command_sha256: str
    policy_version: int
    requester_thumbprint: str
    approver_thumbprint: str
    issued_at: int
    expires_at: int

    def __post_init__(self) -> None:
        for name in (
            "request_id",
            "team_id",
            "agent_id",
            "action",
            "command_sha256",
            "requester_thumbprint",
            "approver_thumbprint",
        ):
            value = getattr(self, name)
            if (
                not isinstance(value, str)
                or not 0 < len(value) <= MAX_IDENTIFIER_LENGTH
                or not value.isprintable()
            ):
                raise ApprovalError(
                    f"approval {name} must be 1..{MAX_IDENTIFIER_LENGTH} printable characters"
                )
        for name in ("policy_version", "issued_at", "expires_at"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= MAX_SAFE_INTEGER:
                raise ApprovalError(f"approval {name} must be a whole number")
        if not 0 < self.expires_at - self.issued_at <= MAX_APPROVAL_LIFETIME_SECONDS:
            raise ApprovalError(
                f"an approval lasts between 1 and {MAX_APPROVAL_LIFETIME_SECONDS} seconds"
            )

    def to_json(self) -> dict[str, Any]:
        """The statement as a JSON object."""
        return {"format": APPROVAL_FORMAT, **asdict(self)}

    def canonical_bytes(self) -> bytes:
        """The RFC 8785 encoding the approver signs."""
        try:
            return canonical_json(self.to_json())
        except CanonicalJsonError:
            raise ApprovalError("the approval statement has no canonical encoding") from None


@dataclass(frozen=True)
class SignedApproval:
    """An approval statement and the approver's signature over it."""

    statement: ApprovalStatement
    signature: bytes

    def to_json(self) -> dict[str, Any]:
        """The approval as a JSON object (see the module docstring)."""
        return {"statement": self.statement.to_json(), "signature": b64url(self.signature)}

    @classmethod
    def from_json(cls, data: object) -> SignedApproval:
        """Parse an approval from its JSON object, text or bytes; ApprovalError if malformed."""
        if isinstance(data, str | bytes | bytearray):
            if len(data) > MAX_APPROVAL_SIZE:
                raise ApprovalError(f"an approval is at most {MAX_APPROVAL_SIZE} bytes")
            try:
                data = json.loads(data, parse_float=_refuse_float, parse_constant=_refuse_float)
            except (ValueError, RecursionError):
                raise ApprovalError("an approval must be JSON") from None
        if not isinstance(data, dict) or set(data) != _APPROVAL_KEYS:
            raise ApprovalError("an approval has exactly the keys signature, statement")
        statement, signature_text = data["statement"], data["signature"]
        if not isinstance(statement, dict) or set(statement) != _STATEMENT_KEYS:
            raise ApprovalError(f"an approval statement has the keys {sorted(_STATEMENT_KEYS)}")
        if statement["format"] != APPROVAL_FORMAT:
            raise ApprovalError(f"an approval statement's format must be {APPROVAL_FORMAT}")
        if not isinstance(signature_text, str):
            raise ApprovalError("an approval signature is base64url text")
        try:
            signature = b64url_decode(signature_text, max_size=SIGNATURE_SIZE)
        except PayloadError:
            raise ApprovalError("an approval signature is not base64url") from None
        fields = {name: value for name, value in statement.items() if name != "format"}
        return cls(ApprovalStatement(**fields), signature)


def approve_request(
    approver: SigningIdentity,
    context: ApprovalContext,
    *,
    now: float,
    lifetime_seconds: int = DEFAULT_APPROVAL_LIFETIME_SECONDS,
) -> SignedApproval:
    """Sign an approval of exactly ``context`` with the approver's key, valid from ``now``.

    Raises SelfApprovalError if the approver is the requester.
    """
    if not math.isfinite(now):
        raise ValueError("now must be a finite number of seconds")
    approver_thumbprint = approver.public.key_id
    if _same_text(approver_thumbprint, context.requester_thumbprint):
        raise SelfApprovalError("nobody may approve their own request")
    issued_at = math.floor(now)
    statement = ApprovalStatement(
        request_id=context.request_id,
        team_id=context.team_id,
        agent_id=context.agent_id,
        action=Action(context.action).value,
        command_sha256=command_sha256(context.command),
        policy_version=context.policy_version,
        requester_thumbprint=context.requester_thumbprint,
        approver_thumbprint=approver_thumbprint,
        issued_at=issued_at,
        expires_at=issued_at + lifetime_seconds,
    )
    return SignedApproval(statement, approver.sign(Purpose.APPROVAL, statement.canonical_bytes()))


def verify_approval(
    approval: object,
    context: ApprovalContext,
    roster: Roster,
    now: float,
    *,
    skew_seconds: float = DEFAULT_CLOCK_SKEW_SECONDS,
) -> ApprovalStatement:
    """Accept ``approval`` only for exactly ``context``, by an approver in ``roster``, in time.

    ``approval`` is a SignedApproval or its JSON object, text or bytes. Raises
    ApproverNotAuthorizedError, ApprovalMismatchError, SelfApprovalError, ApprovalExpiredError,
    or ApprovalError for a malformed or forged approval.
    """
    if not math.isfinite(now) or not math.isfinite(skew_seconds) or skew_seconds < 0:
        raise ValueError("now and skew_seconds must be finite, skew_seconds not negative")
    signed = (
        approval if isinstance(approval, SignedApproval) else SignedApproval.from_json(approval)
    )
    statement = signed.statement
    entry = roster.entry_for(statement.approver_thumbprint)
    if entry is None:
        raise ApproverNotAuthorizedError("the approving key is not in the team roster")
    if not roster.may_approve(statement.approver_thumbprint):
        raise ApproverNotAuthorizedError(f"the {entry.role} role may not approve requests")
    try:
        entry.public_key.verify(Purpose.APPROVAL, statement.canonical_bytes(), signed.signature)
    except ProtocolError:
        raise ApprovalError("the approval signature does not verify") from None
    _check_matches(statement, context)
    requester = roster.entry_for(context.requester_thumbprint)
    if _same_text(statement.approver_thumbprint, context.requester_thumbprint) or (
        requester is not None and requester.email == entry.email
    ):
        raise SelfApprovalError("nobody may approve their own request")
    if statement.issued_at > now + skew_seconds:
        raise ApprovalExpiredError("the approval is not valid yet; check the approver's clock")
    if now >= statement.expires_at + skew_seconds:
        raise ApprovalExpiredError("the approval has expired; ask for a new one")
    return statement


def _check_matches(statement: ApprovalStatement, context: ApprovalContext) -> None:
    expected = {
        "request": (statement.request_id, context.request_id),
        "team": (statement.team_id, context.team_id),
        "agent": (statement.agent_id, context.agent_id),
        "action": (statement.action, Action(context.action).value),
        "command": (statement.command_sha256, command_sha256(context.command)),
        "requester": (statement.requester_thumbprint, context.requester_thumbprint),
        "policy version": (str(statement.policy_version), str(context.policy_version)),
    }
    for what, (approved, actual) in expected.items():
        if not _same_text(approved, actual):
            raise ApprovalMismatchError(f"the approval is for another {what}")


def _same_text(first: str, second: str) -> bool:
    # compare_digest takes only ASCII str; bytes work for any text, surrogates included.
    return hmac.compare_digest(
        first.encode("utf-8", "surrogatepass"), second.encode("utf-8", "surrogatepass")
    )


def _refuse_float(text: str) -> object:
    raise ApprovalError("an approval holds no floating-point numbers")
