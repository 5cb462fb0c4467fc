"""Who is calling: access tokens bound to operator keys, request proofs, and scoped API keys.

Every authenticated request ends in a ``Principal`` whose ``team_id`` comes from verified claims
(or the API key's row), never from the request body or URL. Every request made with an access
token carries a request proof signed by the key the token is bound to (``cnf.jkt``), reads
included (RFC 9449's rule): sessions, the audit log and the policy name every command run, so a
stolen token alone must read nothing. The one exception is the agent directory (``GET
/v1/agents``: names, tags, online state), the hot read that dashboards and scripts poll; it
needs a proof only to change state, as any request does. API keys are bearer credentials.
"""

from __future__ import annotations

import hmac
import math
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import NoReturn

from protocol.errors import PayloadError, TokenError
from protocol.identity import b64url
from protocol.request_proof import PROOF_HEADER, verify_proof
from protocol.tokens import ACCESS_TOKEN_TYPE, issue_token
from rendezvous.agent_list_query import InvalidAgentListQuery, MalformedCursor, agent_query
from rendezvous.context import ServiceContext
from rendezvous.credentials import API_KEY_PREFIX, has_shape, hash_secret
from rendezvous.errors import Forbidden, Unauthorized
from rendezvous.store import AgentListing, AgentQuery, Operator

# The error code of a disabled operator's 401 (and its auth-failure metric label), so a client
# tells it from an expired or revoked token without matching the message text.
OPERATOR_DISABLED = "operator_disabled"


class OperatorDisabled(Unauthorized):
    """The caller's operator is disabled: a 401 whose body's error is ``operator_disabled``."""

    code = OPERATOR_DISABLED

TOKEN_ID_BYTES = 16
PROOF_NONCE_SCOPE = "request-proof"
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ISSUED_AT_MILLISECONDS_CLAIM = "iat_ms"
ROLES = ("admin", "operator", "approver", "auditor")


class Permission(StrEnum):
    """What a request wants to do; also the API key scope names."""

    AGENTS_READ = "agents:read"
    AGENTS_WRITE = "agents:write"  # remove an agent; admins only, never an API key scope
    REGISTRATION_KEYS_READ = "registration_keys:read"
    REGISTRATION_KEYS_WRITE = "registration_keys:write"
    AUDIT_READ = "audit:read"
    SESSIONS_READ = "sessions:read"  # every session of the team, not only the caller's own
    API_KEYS_WRITE = "api_keys:write"
    TOKENS_REVOKE = "tokens:revoke"
    OPERATORS_WRITE = "operators:write"


API_KEY_SCOPES = frozenset(
    {
        Permission.AGENTS_READ,
        Permission.REGISTRATION_KEYS_READ,
        Permission.REGISTRATION_KEYS_WRITE,
        Permission.AUDIT_READ,
        Permission.SESSIONS_READ,
    }
)

ROLE_PERMISSIONS: dict[str, frozenset[Permission]] = {
    "admin": frozenset(Permission),
    "operator": frozenset({Permission.AGENTS_READ}),
    "approver": frozenset({Permission.AGENTS_READ}),
    "auditor": frozenset({Permission.AGENTS_READ, Permission.AUDIT_READ, Permission.SESSIONS_READ}),
}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: an operator (by access token) or an integration (by API key)."""

    kind: str  # "operator" or "api_key"
    team_id: str
    subject: str  # operator id or API key id
    email: str | None
    role: str | None
    scopes: frozenset[str]
    token_id: str | None = None
    token_expires_at: int | None = None


@dataclass(frozen=True)
class RequestFacts:
    """The parts of an HTTP request authentication looks at."""

    method: str
    target: str  # path and query exactly as sent
    body: bytes
    authorization: str | None
    proof: str | None


@dataclass(frozen=True)
class IssuedToken:
    """A freshly signed access token, its id and its expiry (Unix seconds)."""

    token: str
    token_id: str
    expires_at: int


def issue_access_token(ctx: ServiceContext, operator: Operator, now: float) -> IssuedToken:
    """An access token for ``operator`` bound to its key (``cnf.jkt``)."""
    issued_at = int(now)
    lifetime = ctx.config.access_token_seconds
    token_id = b64url(secrets.token_bytes(TOKEN_ID_BYTES))
    token = issue_token(
        ctx.keys.jwt_issuer,
        typ=ACCESS_TOKEN_TYPE,
        issuer=ctx.config.issuer,
        audience=ctx.config.audience,
        subject=operator.id,
        issued_at=issued_at,
        lifetime_seconds=lifetime,
        claims={
            "team_id": operator.team_id,
            "email": operator.email,
            "role": operator.role,
            "jti": token_id,
            # iat is whole seconds; revocation by time needs finer grain than that.
            ISSUED_AT_MILLISECONDS_CLAIM: int(now * 1000),
            "cnf": {"jkt": operator.key_thumbprint},
        },
    )
    return IssuedToken(token, token_id, issued_at + lifetime)


async def authenticate(ctx: ServiceContext, facts: RequestFacts) -> Principal:
    """Check the caller's credentials (an access token with its request proof, or an API key);
    raise Unauthorized if bad."""
    principal, _ = await _authenticate(ctx, facts, None, proof_on_reads=True)
    return principal


async def authenticate_reading_agents(
    ctx: ServiceContext, facts: RequestFacts, query_string: bytes
) -> tuple[Principal, AgentQuery, AgentListing | None]:
    """``authenticate``, the page and filters ``query_string`` asks for, and that page of the
    caller's team's agents when it came with the credential.

    An access token's revocation and holder are read by the same store query as the page (one
    round trip for a list request); an API key's row is read on its own and the listing is then
    None. Authorization is still the caller's to check, except that a query out of bounds is
    refused only once the caller has proved it may list agents (401 and 403 come first).
    """
    try:
        query = agent_query(query_string)
    except (InvalidAgentListQuery, MalformedCursor):
        principal, _ = await _authenticate(ctx, facts, None, proof_on_reads=False)
        authorize(principal, Permission.AGENTS_READ)
        ctx.metrics.rejected_inputs.labels("invalid").inc()
        raise
    principal, listing = await _authenticate(ctx, facts, query, proof_on_reads=False)
    return principal, query, listing


async def _authenticate(
    ctx: ServiceContext,
    facts: RequestFacts,
    listing_query: AgentQuery | None,
    *,
    proof_on_reads: bool,
) -> tuple[Principal, AgentListing | None]:
    try:
        credential = _bearer(facts.authorization)
    except Unauthorized as error:
        # A credential of another scheme (``Basic …``) is a guess too; a missing one is not.
        if error.reason == "malformed_token":
            ctx.metrics.auth_failures.labels("malformed_token").inc()
        raise
    if has_shape(credential, API_KEY_PREFIX):
        return await _authenticate_api_key(ctx, credential), None
    needs_proof = proof_on_reads or facts.method.upper() in STATE_CHANGING_METHODS
    return await _authenticate_access_token(ctx, credential, facts, listing_query, needs_proof)


def authorize(principal: Principal, permission: Permission) -> None:
    """Raise Forbidden unless the caller's role or scopes grant ``permission``."""
    if is_granted(principal, permission):
        return
    if principal.kind == "operator":
        raise Forbidden(f"the {principal.role} role may not do this ({permission.value})")
    raise Forbidden(f"this API key lacks the {permission.value} scope")


def is_granted(principal: Principal, permission: Permission) -> bool:
    """Whether the caller's role (an operator) or scopes (an API key) grant ``permission``."""
    if principal.kind == "operator":
        return permission in ROLE_PERMISSIONS.get(principal.role or "", frozenset())
    return permission.value in principal.scopes


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("send Authorization: Bearer TOKEN; log in first", "missing_token")
    scheme, _, credential = authorization.partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise Unauthorized("the Authorization header must be 'Bearer TOKEN'", "malformed_token")
    return credential


async def _authenticate_api_key(ctx: ServiceContext, credential: str) -> Principal:
    api_key = await ctx.store.get_api_key_by_hash(hash_secret(credential))
    if api_key is None:
        _fail(ctx, "unknown_api_key")
    if not api_key.is_active():
        _fail(ctx, "revoked_api_key")
    return Principal(
        kind="api_key",
        team_id=api_key.team_id,
        subject=api_key.id,
        email=None,
        role=None,
        scopes=frozenset(api_key.scopes),
    )


async def _authenticate_access_token(
    ctx: ServiceContext,
    token: str,
    facts: RequestFacts,
    listing_query: AgentQuery | None,
    needs_proof: bool,
) -> tuple[Principal, AgentListing | None]:
    now = ctx.now()
    try:
        # The signature check is cached per token text; revocation and the operator's standing
        # below are read from the store on every request.
        verified = ctx.verified_tokens.verify(
            token,
            ctx.keys.token_verification_keys(),
            typ=ACCESS_TOKEN_TYPE,
            issuer=ctx.config.issuer,
            audience=ctx.config.audience,
            now=now,
        )
    except TokenError as error:
        _fail(ctx, "invalid_token", f"access token refused: {error}; log in again")
    claims = verified.claims
    team_id, subject, jti = claims.get("team_id"), claims.get("sub"), claims.get("jti")
    cnf = claims.get("cnf")
    jkt = cnf.get("jkt") if isinstance(cnf, dict) else None
    role = claims.get("role")
    if not all(isinstance(value, str) and value for value in (team_id, subject, jti, jkt, role)):
        _fail(ctx, "invalid_token", "access token lacks team, subject, id, role or key binding")
    assert isinstance(team_id, str) and isinstance(subject, str) and isinstance(jti, str)
    assert isinstance(jkt, str) and isinstance(role, str)
    listing: AgentListing | None = None
    if listing_query is not None:
        # Read along with the checks below and handed out only once they all pass.
        holder, listing = await ctx.store.token_holder_and_agent_listing(
            team_id, subject, jti, listing_query
        )
    else:
        holder = await ctx.store.token_holder(team_id, subject, jti)
    if holder.token_revoked:
        _fail(ctx, "revoked_token", "access token was revoked; log in again")
    operator = holder.operator
    if operator is None or not operator.is_active():
        _fail(ctx, "operator_disabled", "this operator is disabled; ask an admin")
    issued_ms = claims.get(ISSUED_AT_MILLISECONDS_CLAIM)
    if type(issued_ms) is not int or issued_ms < math.floor(operator.tokens_valid_after * 1000):
        _fail(ctx, "revoked_token", "access token was revoked; log in again")
    if not hmac.compare_digest(operator.key_thumbprint.encode(), jkt.encode()):
        _fail(ctx, "invalid_token", "access token is bound to another key; log in again")
    if needs_proof:
        await _check_proof(ctx, token, jkt, facts, now)
    principal = Principal(
        kind="operator",
        team_id=team_id,
        subject=subject,
        email=operator.email,
        role=operator.role,
        scopes=frozenset(),
        token_id=jti,
        token_expires_at=claims["exp"],
    )
    return principal, listing


async def _check_proof(
    ctx: ServiceContext, token: str, jkt: str, facts: RequestFacts, now: float
) -> None:
    if not facts.proof:
        _fail(ctx, "missing_proof", f"this request needs a {PROOF_HEADER} header")
    skew = ctx.config.clock_skew_seconds
    try:
        proof = verify_proof(
            facts.proof,
            method=facts.method,
            target=facts.target,
            body=facts.body,
            access_token=token,
            expected_key_id=jkt,
            now=now,
            skew_seconds=skew,
        )
    except PayloadError as error:
        _fail(ctx, "invalid_proof", f"request proof refused: {error}")
    fresh = await ctx.store.remember_nonce(
        PROOF_NONCE_SCOPE, f"{jkt}:{proof.proof_id}", now + 2 * skew, now
    )
    if not fresh:
        _fail(ctx, "replayed_proof", "request proof was already used")


def _fail(ctx: ServiceContext, reason: str, message: str | None = None) -> NoReturn:
    ctx.metrics.auth_failures.labels(reason).inc()
    if reason == OPERATOR_DISABLED:
        raise OperatorDisabled(message or "this operator is disabled", reason)
    raise Unauthorized(message or "credentials refused", reason)
