"""Session grants: the rendezvous's signed permission for one operator to open one session.

A grant is an EdDSA JWT (``typ`` = SESSION_GRANT_TYPE) signed with the rendezvous JWT issuer key.
``iss`` = the rendezvous issuer and ``aud`` = the agent id. Claims (docs/sessions.md §2):

- ``sid``      the session id; it must equal the offer's and the handshake's session id.
- ``team_id``  the team of the agent and the operator.
- ``agent_id`` the target agent (also the audience).
- ``operator`` ``{"id", "email"}`` of the operator who asked.
- ``role``     the operator's role when the grant was minted.
- ``cnf``      ``{"jkt": RFC 7638 thumbprint of the operator key}``; the agent compares it with
  the key proven in the handshake, so a grant is useless to anyone without that key.
- ``mode``     ``"shell"`` or ``"exec"``; ``command`` is the argv for exec, null for a shell.
- ``policy``   ``{"result", "rule_id", "version"}``: the decision the rendezvous recorded.
- ``approval`` null, or the SignedApproval JSON object (protocol.policy.approval) when the
  policy required an approval; the agent verifies it against its own signed roster.
- ``jti``      a random grant id.

This module only signs and checks; remembering which session ids an agent has already accepted
is the agent's job (a grant is for one session only).
"""

from __future__ import annotations

import hmac
import json
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from protocol.errors import PayloadError, TokenError
from protocol.exec_limits import MAX_COMMAND_ARGUMENTS, MAX_COMMAND_SIZE, command_size
from protocol.identity import PublicIdentity, SigningIdentity, b64url, b64url_decode
from protocol.tokens import MAX_TOKEN_SIZE, SESSION_GRANT_TYPE, issue_token, verify_token

DEFAULT_SESSION_GRANT_LIFETIME_SECONDS = 60
MAX_SESSION_GRANT_LIFETIME_SECONDS = 300
SESSION_GRANT_LEEWAY_SECONDS = 5
# Exec command limits: protocol.exec_limits (the CLI checks them without loading this module).
MAX_ARGUMENT_SIZE = MAX_COMMAND_SIZE
MAX_ID_SIZE = 128
MAX_EMAIL_SIZE = 320
MAX_POLICY_TEXT_SIZE = 128
MAX_APPROVAL_SIZE = 4 * 1024
GRANT_ID_SIZE = 16
# verify_token checks time claims too; grants get their own, tighter check after it.
_TIME_CHECKED_HERE_LEEWAY = 1e15


class SessionMode(StrEnum):
    """What a session runs: an interactive shell or one command."""

    SHELL = "shell"
    EXEC = "exec"


class SessionGrantError(TokenError):
    """A session grant is refused; the message says why (safe to show to the operator)."""


class GrantWrongAgentError(SessionGrantError):
    """The grant is genuine but was minted for another agent."""


class GrantWrongTeamError(SessionGrantError):
    """The grant is genuine but names another team."""


class GrantWrongSessionError(SessionGrantError):
    """The grant is genuine but is for another session id."""


class GrantOperatorKeyMismatchError(SessionGrantError):
    """The grant is genuine but is bound to another operator key than the handshake proved."""


class GrantExpiredError(SessionGrantError):
    """The grant is genuine but has expired (or is not valid yet)."""


@dataclass(frozen=True)
class SessionGrant:
    """The verified claims of a session grant."""

    session_id: str
    team_id: str
    agent_id: str
    operator_id: str
    operator_email: str
    role: str
    operator_key_thumbprint: str
    mode: SessionMode
    command: tuple[str, ...] | None
    policy_result: str
    policy_rule_id: str | None
    policy_version: int | None
    approval: Mapping[str, Any] | None
    issuer: str
    grant_id: str
    issued_at: int
    expires_at: int


def issue_session_grant(
    signer: SigningIdentity,
    *,
    issuer: str,
    session_id: str,
    team_id: str,
    agent_id: str,
    operator_id: str,
    operator_email: str,
    role: str,
    operator_key_thumbprint: str,
    mode: SessionMode | str,
    command: Sequence[str] | None,
    policy_result: str,
    policy_rule_id: str | None,
    policy_version: int | None,
    approval: Mapping[str, Any] | None,
    now: float,
    lifetime: int = DEFAULT_SESSION_GRANT_LIFETIME_SECONDS,
) -> str:
    """Sign a session grant for ``agent_id``; raise SessionGrantError if a field is out of range."""
    if not math.isfinite(now):
        raise ValueError("now must be finite")
    if not 0 < lifetime <= MAX_SESSION_GRANT_LIFETIME_SECONDS:
        raise SessionGrantError(
            f"session grant lifetime must be 1..{MAX_SESSION_GRANT_LIFETIME_SECONDS} s"
        )
    claims: dict[str, Any] = {
        "sid": session_id,
        "team_id": team_id,
        "agent_id": agent_id,
        "operator": {"id": operator_id, "email": operator_email},
        "role": role,
        "cnf": {"jkt": operator_key_thumbprint},
        "mode": _mode(mode).value,
        "command": None if command is None else list(command),
        "policy": {"result": policy_result, "rule_id": policy_rule_id, "version": policy_version},
        "approval": None if approval is None else dict(approval),
        "jti": b64url(secrets.token_bytes(GRANT_ID_SIZE)),
    }
    # Parse what we are about to sign, so a grant we mint always passes our own checks.
    _parse_claims(
        {**claims, "iss": issuer, "aud": agent_id, "iat": int(now), "exp": int(now) + lifetime}
    )
    return issue_token(
        signer,
        typ=SESSION_GRANT_TYPE,
        issuer=issuer,
        audience=agent_id,
        subject=operator_id,
        issued_at=int(now),
        lifetime_seconds=lifetime,
        claims=claims,
    )


def verify_session_grant(
    token: str,
    keys: Mapping[str, PublicIdentity],
    *,
    issuer: str,
    agent_id: str,
    team_id: str,
    session_id: str,
    operator_key_thumbprint: str,
    now: float,
    leeway: float = SESSION_GRANT_LEEWAY_SECONDS,
) -> SessionGrant:
    """Check a grant the way an agent must; raise a SessionGrantError subclass naming the reason.

    The specific subclasses (wrong agent, team, session, operator key, expired) are raised only
    for grants whose signature verified, so a forged grant is always reported as plainly invalid.
    """
    if not math.isfinite(now) or not math.isfinite(leeway) or leeway < 0:
        raise ValueError("now and leeway must be finite, leeway not negative")
    # Verify the signature under the token's own audience, then compare that audience with ours,
    # so that "minted for another agent" is told apart from "forged".
    claimed_audience = _unverified_audience(token)
    try:
        verified = verify_token(
            token,
            keys,
            typ=SESSION_GRANT_TYPE,
            issuer=issuer,
            audience=claimed_audience if claimed_audience is not None else agent_id,
            now=now,
            leeway=_TIME_CHECKED_HERE_LEEWAY,
        )
    except SessionGrantError:
        raise
    except TokenError as error:
        raise SessionGrantError(f"session grant refused: {error}") from None
    grant = _parse_claims(verified.claims)
    if grant.agent_id != agent_id or verified.claims.get("aud") != agent_id:
        raise GrantWrongAgentError("session grant refused: it was minted for another agent")
    if grant.team_id != team_id:
        raise GrantWrongTeamError("session grant refused: it names another team")
    if grant.session_id != session_id:
        raise GrantWrongSessionError("session grant refused: it is for another session")
    if not _equal_text(grant.operator_key_thumbprint, operator_key_thumbprint):
        raise GrantOperatorKeyMismatchError(
            "session grant refused: it is bound to another operator key than the handshake proved"
        )
    if grant.expires_at - grant.issued_at > MAX_SESSION_GRANT_LIFETIME_SECONDS:
        raise SessionGrantError("session grant refused: its lifetime is longer than allowed")
    if now > grant.expires_at + leeway:
        raise GrantExpiredError("session grant refused: it has expired")
    if grant.issued_at > now + leeway:
        raise GrantExpiredError("session grant refused: it is not valid yet")
    return grant


def _unverified_audience(token: str) -> str | None:
    if not isinstance(token, str) or len(token) > MAX_TOKEN_SIZE:
        return None
    try:
        payload = json.loads(b64url_decode(token.split(".")[1], max_size=MAX_TOKEN_SIZE))
    except (IndexError, ValueError, PayloadError, RecursionError):
        return None
    audience = payload.get("aud") if isinstance(payload, dict) else None
    return audience if isinstance(audience, str) and audience else None


def _equal_text(left: str, right: str) -> bool:
    return hmac.compare_digest(left.encode("utf-8"), right.encode("utf-8"))


def _mode(value: object) -> SessionMode:
    try:
        return SessionMode(str(value))
    except ValueError:
        raise SessionGrantError("session grant mode must be shell or exec") from None


def _parse_claims(claims: Mapping[str, Any]) -> SessionGrant:
    operator = _mapping(claims, "operator")
    confirmation = _mapping(claims, "cnf")
    policy = _mapping(claims, "policy")
    mode = _mode(claims.get("mode"))
    command = _command(claims.get("command"), mode)
    version = policy.get("version")
    if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
        raise SessionGrantError("session grant policy version must be an integer or null")
    return SessionGrant(
        session_id=_text(claims, "sid", MAX_ID_SIZE),
        team_id=_text(claims, "team_id", MAX_ID_SIZE),
        agent_id=_text(claims, "agent_id", MAX_ID_SIZE),
        operator_id=_text(operator, "id", MAX_ID_SIZE, "operator.id"),
        operator_email=_text(operator, "email", MAX_EMAIL_SIZE, "operator.email"),
        role=_text(claims, "role", MAX_ID_SIZE),
        operator_key_thumbprint=_text(confirmation, "jkt", MAX_ID_SIZE, "cnf.jkt"),
        mode=mode,
        command=command,
        policy_result=_text(policy, "result", MAX_POLICY_TEXT_SIZE, "policy.result"),
        policy_rule_id=_optional_text(policy, "rule_id", MAX_POLICY_TEXT_SIZE, "policy.rule_id"),
        policy_version=version,
        approval=_approval(claims.get("approval")),
        issuer=_text(claims, "iss", MAX_ID_SIZE),
        grant_id=_text(claims, "jti", MAX_ID_SIZE),
        issued_at=_integer(claims, "iat"),
        expires_at=_integer(claims, "exp"),
    )


def _command(value: object, mode: SessionMode) -> tuple[str, ...] | None:
    if mode is SessionMode.SHELL:
        if value is not None:
            raise SessionGrantError("session grant for a shell must not carry a command")
        return None
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_COMMAND_ARGUMENTS:
        raise SessionGrantError(
            f"session grant for exec needs a command of 1..{MAX_COMMAND_ARGUMENTS} arguments"
        )
    for argument in value:
        if not isinstance(argument, str) or len(argument.encode("utf-8")) > MAX_ARGUMENT_SIZE:
            raise SessionGrantError(
                f"session grant command arguments must be text of at most {MAX_ARGUMENT_SIZE} bytes"
            )
    if command_size(value) > MAX_COMMAND_SIZE:
        raise SessionGrantError(
            f"session grant command must be at most {MAX_COMMAND_SIZE} bytes as JSON"
        )
    return tuple(value)


def _approval(value: object) -> Mapping[str, Any] | None:
    # Only shape and size here: the agent checks the approval itself with verify_approval.
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SessionGrantError("session grant approval claim must be an object or null")
    try:
        size = len(json.dumps(value, separators=(",", ":")).encode("utf-8"))
    except (TypeError, ValueError, RecursionError):
        raise SessionGrantError("session grant approval claim is not JSON") from None
    if size > MAX_APPROVAL_SIZE:
        raise SessionGrantError(f"session grant approval claim is over {MAX_APPROVAL_SIZE} bytes")
    return value


def _mapping(claims: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = claims.get(name)
    if not isinstance(value, dict):
        raise SessionGrantError(f"session grant {name} claim must be an object")
    return value


def _text(claims: Mapping[str, Any], name: str, max_size: int, label: str | None = None) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value or len(value.encode("utf-8")) > max_size:
        raise SessionGrantError(
            f"session grant {label or name} claim must be 1..{max_size} bytes of text"
        )
    return value


def _optional_text(
    claims: Mapping[str, Any], name: str, max_size: int, label: str
) -> str | None:
    if claims.get(name) is None:
        return None
    return _text(claims, name, max_size, label)


def _integer(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise SessionGrantError(f"session grant {name} claim must be an integer")
    return value
