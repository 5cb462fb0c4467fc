"""Registration keys (``rk_live_…``, for enrolling agents) and API keys (``sk_live_…``).

Both are shown once at creation and stored only as SHA-256 hashes; revocation is immediate.
"""

from __future__ import annotations

from fastapi import APIRouter

from rendezvous.agent_tags import normalised_tags
from rendezvous.audit_trail import Action, caller_actor
from rendezvous.auth import API_KEY_SCOPES, Permission, authorize
from rendezvous.credentials import hash_secret, new_api_key, new_registration_key
from rendezvous.dependencies import Caller, Context
from rendezvous.errors import BadRequest, Forbidden, NotFound
from rendezvous.schemas import (
    ApiKeyRequest,
    ApiKeyView,
    CreatedApiKey,
    CreatedRegistrationKey,
    RegistrationKeyRequest,
    RegistrationKeyView,
)
from rendezvous.store import ApiKey, RegistrationKey
from rendezvous.store import NotFound as StoreNotFound

router = APIRouter(tags=["keys"])
API_KEY_SCOPE_NAMES = sorted(str(scope) for scope in API_KEY_SCOPES)


@router.post("/registration-keys", response_model=CreatedRegistrationKey, status_code=201)
async def create_registration_key(
    body: RegistrationKeyRequest, caller: Caller, ctx: Context
) -> CreatedRegistrationKey:
    """Create a single-use agent registration key; the key is in the response, once."""
    authorize(caller, Permission.REGISTRATION_KEYS_WRITE)
    tags = normalised_tags(body.tags)
    ttl = body.ttl_seconds or ctx.config.registration_key_seconds
    if ttl > ctx.config.max_registration_key_seconds:
        raise BadRequest(
            f"ttl_seconds must be at most {ctx.config.max_registration_key_seconds}"
        )
    secret = new_registration_key()
    now = ctx.now()
    key = await ctx.store.create_registration_key(
        caller.team_id, hash_secret(secret), tags, now + ttl, caller.subject, now
    )
    await ctx.audit.record(
        caller.team_id,
        actor=caller_actor(caller),
        action=Action.REGISTRATION_KEY_CREATED,
        target=f"registration_key:{key.id}",
        details={"tags": list(key.tags), "ttl_seconds": ttl},
    )
    return CreatedRegistrationKey(key=secret, **_registration_key_view(key, now).model_dump())


@router.get("/registration-keys", response_model=list[RegistrationKeyView])
async def list_registration_keys(caller: Caller, ctx: Context) -> list[RegistrationKeyView]:
    """The caller's team's registration keys (never the keys themselves)."""
    authorize(caller, Permission.REGISTRATION_KEYS_READ)
    now = ctx.now()
    keys = await ctx.store.list_registration_keys(caller.team_id)
    return [_registration_key_view(key, now) for key in keys]


@router.delete("/registration-keys/{key_id}", response_model=RegistrationKeyView)
async def revoke_registration_key(
    key_id: str, caller: Caller, ctx: Context
) -> RegistrationKeyView:
    """Revoke a registration key of the caller's team; it can no longer enroll an agent."""
    authorize(caller, Permission.REGISTRATION_KEYS_WRITE)
    now = ctx.now()
    if await ctx.store.get_registration_key(caller.team_id, key_id) is None:
        raise NotFound("no such registration key in your team")
    await ctx.audit.record(
        caller.team_id,
        actor=caller_actor(caller),
        action=Action.REGISTRATION_KEY_REVOKED,
        target=f"registration_key:{key_id}",
        details={},
    )
    try:
        key = await ctx.store.revoke_registration_key(caller.team_id, key_id, now)
    except StoreNotFound:
        raise NotFound("no such registration key in your team") from None
    return _registration_key_view(key, now)


@router.post(
    "/api-keys",
    response_model=CreatedApiKey,
    status_code=201,
    # Built from API_KEY_SCOPES, so the OpenAPI document always names the scopes there are.
    description="Create a scoped API key for an integration (operators only); the key is "
    f"shown once. Scopes: {', '.join(API_KEY_SCOPE_NAMES)}.",
)
async def create_api_key(body: ApiKeyRequest, caller: Caller, ctx: Context) -> CreatedApiKey:
    """Create a scoped API key for an integration (operators only); the key is shown once."""
    authorize(caller, Permission.API_KEYS_WRITE)
    if caller.kind != "operator":
        raise Forbidden("API keys cannot create API keys")
    unknown = sorted(set(body.scopes) - API_KEY_SCOPES)
    if unknown:
        raise BadRequest(f"unknown scopes {unknown}; choose from {API_KEY_SCOPE_NAMES}")
    secret = new_api_key()
    now = ctx.now()
    api_key = await ctx.store.create_api_key(
        caller.team_id,
        body.name,
        sorted(set(body.scopes)),
        hash_secret(secret),
        caller.subject,
        now,
    )
    await ctx.audit.record(
        caller.team_id,
        actor=caller_actor(caller),
        action=Action.API_KEY_CREATED,
        target=f"api_key:{api_key.id}",
        details={"name": api_key.name, "scopes": list(api_key.scopes)},
    )
    return CreatedApiKey(key=secret, **_api_key_view(api_key).model_dump())


@router.get("/api-keys", response_model=list[ApiKeyView])
async def list_api_keys(caller: Caller, ctx: Context) -> list[ApiKeyView]:
    """The caller's team's API keys (never the keys themselves)."""
    authorize(caller, Permission.API_KEYS_WRITE)
    return [_api_key_view(key) for key in await ctx.store.list_api_keys(caller.team_id)]


@router.delete("/api-keys/{api_key_id}", response_model=ApiKeyView)
async def revoke_api_key(api_key_id: str, caller: Caller, ctx: Context) -> ApiKeyView:
    """Revoke an API key of the caller's team, effective on its next request."""
    authorize(caller, Permission.API_KEYS_WRITE)
    known = {api_key.id for api_key in await ctx.store.list_api_keys(caller.team_id)}
    if api_key_id not in known:
        raise NotFound("no such API key in your team")
    await ctx.audit.record(
        caller.team_id,
        actor=caller_actor(caller),
        action=Action.API_KEY_REVOKED,
        target=f"api_key:{api_key_id}",
        details={},
    )
    try:
        api_key = await ctx.store.revoke_api_key(caller.team_id, api_key_id, ctx.now())
    except StoreNotFound:
        raise NotFound("no such API key in your team") from None
    return _api_key_view(api_key)


def _registration_key_view(key: RegistrationKey, now: float) -> RegistrationKeyView:
    reason = key.unusable_reason(now)
    return RegistrationKeyView(
        id=key.id,
        tags=list(key.tags),
        expires_at=key.expires_at,
        created_at=key.created_at,
        created_by=key.created_by,
        used_at=key.used_at,
        used_by_agent=key.used_by_agent,
        revoked_at=key.revoked_at,
        status=reason.value if reason else "usable",
    )


def _api_key_view(api_key: ApiKey) -> ApiKeyView:
    return ApiKeyView(
        id=api_key.id,
        name=api_key.name,
        scopes=list(api_key.scopes),
        created_at=api_key.created_at,
        created_by=api_key.created_by,
        revoked_at=api_key.revoked_at,
    )
