"""Operator enrollment, challenge login, access tokens and their revocation.

Disabling and listing operators: rendezvous/routes_operators.py.

Enrollment: ``POST /v1/operators/enroll`` with a signed payload (Purpose.OPERATOR_ENROLL) holding
the invite code and the new public key, signed by that key (proof of possession). Login:
``POST /v1/auth/challenge`` then ``POST /v1/auth/login`` with the challenge signed
(Purpose.OPERATOR_LOGIN) by the enrolled key; the answer is an access token bound to that key.
"""

from __future__ import annotations

import hmac
import secrets
from typing import NoReturn

from fastapi import APIRouter

from protocol.domains import Purpose
from protocol.errors import ProtocolError
from protocol.identity import PublicIdentity, b64url_decode
from protocol.signed_payload import unverified_fields
from rendezvous.audit_trail import (
    SERVICE_LOG,
    Action,
    caller_actor,
    operator_actor,
    unauthenticated_actor,
)
from rendezvous.auth import (
    OPERATOR_DISABLED,
    OperatorDisabled,
    Permission,
    Principal,
    authorize,
    issue_access_token,
)
from rendezvous.context import ServiceContext
from rendezvous.credentials import INVITE_PREFIX, has_shape, hash_secret, new_challenge
from rendezvous.dependencies import Caller, Context, RateLimited
from rendezvous.errors import BadRequest, Conflict, Unauthorized
from rendezvous.schemas import (
    ChallengeRequest,
    ChallengeResponse,
    EnrollResponse,
    RevokeTokenRequest,
    SignedEnvelope,
    TokenResponse,
    WhoAmIResponse,
)
from rendezvous.store import AlreadyExists, ChallengeUnusable, InviteUnusable, Operator

router = APIRouter(tags=["operators"])


@router.post("/operators/enroll", response_model=EnrollResponse, dependencies=[RateLimited])
async def enroll_operator(body: SignedEnvelope, ctx: Context) -> EnrollResponse:
    """Enroll a new operator key with a one-time invite; the key signs its own enrollment."""
    envelope = body.model_dump()
    key = _public_key_field(envelope, "public_key")
    try:
        verified = await ctx.signed_payloads.verify(ctx, envelope, Purpose.OPERATOR_ENROLL, key)
    except ProtocolError as error:
        _auth_failure(ctx, "invalid_enrollment", f"enrollment refused: {error}")
    code = verified.fields.get("invite")
    if not has_shape(code, INVITE_PREFIX):
        _auth_failure(ctx, "invalid_invite", "the invite code is malformed; check it")
    assert isinstance(code, str)
    now = ctx.now()
    try:
        operator, invite = await ctx.store.enroll_operator(
            hash_secret(code), now, key.raw, key.key_id
        )
    except InviteUnusable as error:
        _auth_failure(ctx, f"invite_{error.reason.value}", f"the invite is {error.reason.value}")
    except AlreadyExists:
        raise Conflict("this operator key is already enrolled; log in instead") from None
    await ctx.audit.record(
        operator.team_id,
        actor=operator_actor(operator),
        action=Action.OPERATOR_INVITE_USED,
        target=f"invite:{invite.id}",
        details={
            "email": operator.email,
            "role": operator.role,
            "key": key.fingerprint,
            "key_thumbprint": key.key_id,
        },
    )
    return EnrollResponse(
        operator_id=operator.id,
        team_id=operator.team_id,
        email=operator.email,
        role=operator.role,
        service_keys=ctx.keys.jwks(),
    )


@router.post("/auth/challenge", response_model=ChallengeResponse, dependencies=[RateLimited])
async def login_challenge(body: ChallengeRequest, ctx: Context) -> ChallengeResponse:
    """A fresh single-use challenge for the operator key to sign (does not reveal if it exists)."""
    now = ctx.now()
    expires_at = now + ctx.config.login_challenge_seconds
    challenge = await ctx.store.create_login_challenge(
        "lc_" + secrets.token_hex(16), new_challenge(), expires_at, now, body.key_thumbprint
    )
    return ChallengeResponse(
        challenge_id=challenge.id,
        challenge=challenge.challenge,
        audience=ctx.config.issuer,
        expires_at=expires_at,
    )


@router.post("/auth/login", response_model=TokenResponse, dependencies=[RateLimited])
async def login(body: SignedEnvelope, ctx: Context) -> TokenResponse:
    """Exchange a signed challenge for an access token bound to the operator key."""
    envelope = body.model_dump()
    try:
        claimed = unverified_fields(envelope)
    except ProtocolError as error:
        _auth_failure(ctx, "malformed_login", f"login refused: {error}")
    thumbprint, challenge_id = claimed.get("key_thumbprint"), claimed.get("challenge_id")
    if not isinstance(thumbprint, str) or not isinstance(challenge_id, str):
        _auth_failure(ctx, "malformed_login", "login must name key_thumbprint and challenge_id")
    operator = await ctx.store.get_operator_by_thumbprint(thumbprint)
    if operator is None:
        # No team to charge this to: it goes to the service log.
        await ctx.audit.record(
            SERVICE_LOG,
            actor=unauthenticated_actor(thumbprint[:64]),
            action=Action.OPERATOR_LOGIN_FAILED,
            target=f"operator_key:{thumbprint[:64]}",
            details={"reason": "unknown_operator"},
        )
        _auth_failure(ctx, "unknown_operator", "this key is not enrolled; enroll with an invite")
    try:
        verified = await ctx.signed_payloads.verify(
            ctx, envelope, Purpose.OPERATOR_LOGIN, PublicIdentity(operator.public_key)
        )
    except ProtocolError as error:
        await _login_failed(ctx, operator, "bad_signature", f"login refused: {error}")
    now = ctx.now()
    try:
        challenge = await ctx.store.consume_login_challenge(challenge_id, now)
    except ChallengeUnusable as error:
        await _login_failed(
            ctx, operator, "bad_challenge", f"login challenge is {error.reason.value}; retry"
        )
    answer = verified.fields.get("challenge")
    if (
        not isinstance(answer, str)
        or not hmac.compare_digest(answer.encode(), challenge.challenge.encode())
        or challenge.subject != thumbprint
        or verified.fields.get("audience") != ctx.config.issuer
    ):
        await _login_failed(ctx, operator, "bad_challenge", "login answers another challenge")
    if not operator.is_active():
        await _login_failed(ctx, operator, "operator_disabled", "this operator is disabled")
    issued = issue_access_token(ctx, operator, now)
    await ctx.audit.record(
        operator.team_id,
        actor=operator_actor(operator),
        action=Action.OPERATOR_LOGIN_SUCCEEDED,
        target=f"operator:{operator.id}",
        details={
            "jti": issued.token_id,
            "key": PublicIdentity(operator.public_key).fingerprint,
        },
    )
    return TokenResponse(
        access_token=issued.token,
        expires_at=issued.expires_at,
        operator_id=operator.id,
        team_id=operator.team_id,
        email=operator.email,
        role=operator.role,
    )


@router.get("/auth/whoami", response_model=WhoAmIResponse)
async def whoami(caller: Caller, ctx: Context) -> WhoAmIResponse:
    """Who the service thinks the caller is."""
    team = await ctx.store.get_team(caller.team_id)
    return WhoAmIResponse(
        kind=caller.kind,
        subject=caller.subject,
        team_id=caller.team_id,
        team_name=team.name if team else None,
        email=caller.email,
        role=caller.role,
        scopes=sorted(caller.scopes),
        token_expires_at=caller.token_expires_at,
    )


@router.post("/auth/logout", status_code=204)
async def logout(caller: Caller, ctx: Context) -> None:
    """Revoke the access token this request carries."""
    if caller.token_id is None or caller.token_expires_at is None:
        raise BadRequest("only an operator access token can log out")
    await _revoke(ctx, caller, caller.token_id, caller.token_expires_at)


@router.post("/tokens/revoke", status_code=204)
async def revoke_token(body: RevokeTokenRequest, caller: Caller, ctx: Context) -> None:
    """Revoke one access token of the caller's team by jti (admin)."""
    authorize(caller, Permission.TOKENS_REVOKE)
    expires_at = body.expires_at or int(ctx.now()) + ctx.config.access_token_seconds
    await _revoke(ctx, caller, body.jti, expires_at)


async def _revoke(ctx: ServiceContext, caller: Principal, jti: str, expires_at: int) -> None:
    await ctx.audit.record(
        caller.team_id,
        actor=caller_actor(caller),
        action=Action.OPERATOR_TOKEN_REVOKED,
        target=f"token:{jti}",
        details={},
    )
    await ctx.store.revoke_token(caller.team_id, jti, float(expires_at), ctx.now())


async def _login_failed(
    ctx: ServiceContext, operator: Operator, reason: str, message: str
) -> NoReturn:
    await ctx.audit.record(
        operator.team_id,
        actor=operator_actor(operator),
        action=Action.OPERATOR_LOGIN_FAILED,
        target=f"operator:{operator.id}",
        details={"reason": reason},
    )
    _auth_failure(ctx, reason, message)


def _auth_failure(ctx: ServiceContext, reason: str, message: str) -> NoReturn:
    ctx.metrics.auth_failures.labels(reason).inc()
    if reason == OPERATOR_DISABLED:
        raise OperatorDisabled(message, reason)
    raise Unauthorized(message, reason)


def _public_key_field(envelope: dict[str, object], name: str) -> PublicIdentity:
    """The public key a self-signed envelope claims, for verifying it (untrusted until then)."""
    try:
        value = unverified_fields(envelope).get(name)
        if not isinstance(value, str):
            raise BadRequest(f"the signed payload must carry {name}")
        key = PublicIdentity(b64url_decode(value, max_size=64))
    except ProtocolError as error:
        raise BadRequest(f"the signed payload is malformed: {error}") from None
    return key
