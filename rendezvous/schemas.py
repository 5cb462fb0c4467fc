"""Request and response bodies of the HTTP API (pydantic models; unknown fields are refused)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from protocol.identifiers import MAX_TAG_LENGTH as MAX_TAG_LENGTH  # one definition

MAX_TAGS = 32
MAX_NAME_LENGTH = 128
MAX_ID_LENGTH = 128
MAX_SIGNATURE_TEXT = 128


class StrictModel(BaseModel):
    """A body model that refuses fields it does not know."""

    model_config = ConfigDict(extra="forbid")


class SignedEnvelope(StrictModel):
    """A protocol.signed_payload envelope: payload fields plus ts and nonce, and a signature."""

    payload: dict[str, Any]
    signature: str = Field(max_length=MAX_SIGNATURE_TEXT)


class ChallengeRequest(StrictModel):
    """Ask for a login challenge for the operator key with this RFC 7638 thumbprint."""

    key_thumbprint: str = Field(min_length=43, max_length=43, pattern=r"^[A-Za-z0-9_-]+$")


class ChallengeResponse(BaseModel):
    """A challenge to sign (with Purpose.OPERATOR_LOGIN) and send back to /v1/auth/login."""

    challenge_id: str
    challenge: str
    audience: str
    expires_at: float


class TokenResponse(BaseModel):
    """An access token bound to the operator key."""

    access_token: str
    token_type: str = "Bearer"  # noqa: S105 - the OAuth token type name
    expires_at: int
    operator_id: str
    team_id: str
    email: str
    role: str


class EnrollResponse(BaseModel):
    """The enrolled operator and the service keys to pin."""

    operator_id: str
    team_id: str
    email: str
    role: str
    service_keys: dict[str, Any]


class WhoAmIResponse(BaseModel):
    """The caller as the service sees it."""

    kind: str
    subject: str
    team_id: str
    team_name: str | None
    email: str | None
    role: str | None
    scopes: list[str]
    token_expires_at: int | None


class RevokeTokenRequest(StrictModel):
    """Revoke one access token by its id (jti), until it would have expired."""

    jti: str = Field(min_length=1, max_length=MAX_ID_LENGTH)
    expires_at: int | None = Field(default=None, ge=0)


class RegistrationKeyRequest(StrictModel):
    """Create a registration key: tags for the agents it enrolls, and its lifetime."""

    tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS)
    ttl_seconds: int | None = Field(default=None, gt=0)


class AgentTagsRequest(StrictModel):
    """Replace an agent's tags (admins); agents enforce them once an admin signs the roster."""

    tags: list[str] = Field(max_length=MAX_TAGS)
    # The tags the caller saw (optional): refused with 409 if the agent's differ by then, so a
    # read-modify-write (`tucdesk agents tag --add`) never drops a concurrent change.
    previous_tags: list[str] | None = Field(default=None, max_length=MAX_TAGS)


class RegistrationKeyView(BaseModel):
    """A registration key as listed (never the key itself)."""

    id: str
    tags: list[str]
    expires_at: float
    created_at: float
    created_by: str
    used_at: float | None
    used_by_agent: str | None
    revoked_at: float | None
    status: str


class CreatedRegistrationKey(RegistrationKeyView):
    """A new registration key: ``key`` is shown this once."""

    key: str


class ApiKeyRequest(StrictModel):
    """Create an API key with a name and scopes."""

    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH)
    scopes: list[str] = Field(min_length=1, max_length=16)


class ApiKeyView(BaseModel):
    """An API key as listed (never the key itself)."""

    id: str
    name: str
    scopes: list[str]
    created_at: float
    created_by: str
    revoked_at: float | None


class CreatedApiKey(ApiKeyView):
    """A new API key: ``key`` is shown this once."""

    key: str


class AgentView(BaseModel):
    """An agent as listed to its team."""

    id: str
    name: str
    hostname: str
    tags: list[str]
    online: bool
    last_seen_at: float | None
    registered_at: float
    key_fingerprint: str
    public_key: str  # base64url raw Ed25519, for the CLI to pin
    policy_version: int | None = None  # the policy version the agent reported applying
    policy_refusal: str | None = None  # why it refused the newest bundle, if it did


class AgentList(BaseModel):
    """A page of the caller's team's agents, the team's current policy version (0: none
    signed), and the cursor of the next page (None: this is the last one)."""

    agents: list[AgentView]
    policy_version: int = 0
    next_after: str | None = None  # pass as ?after= for the page after this one


class RegisterResponse(BaseModel):
    """A registered agent's id and name, its team, and the service keys to pin."""

    agent_id: str
    name: str
    team_id: str
    tags: list[str]
    service_keys: dict[str, Any]
    # {"admin_keys": [b64url…], "policy_key": b64url} to pin; None if the team has no admin.
    policy_trust: dict[str, Any] | None = None
    # Things the enrolling host's admin should know (e.g. the name is already taken in the
    # team); agents that predate the field ignore it.
    warnings: list[str] = []


class SessionView(BaseModel):
    """A session as ``GET /v1/sessions`` and ``GET /v1/sessions/{id}`` show it: its state, and
    who and what it was (agent name and operator email while the team still has them, exec
    argv, policy result, last change)."""

    session_id: str
    agent_id: str
    agent_name: str | None
    operator_id: str
    operator_email: str | None
    mode: str
    command: list[str] | None  # exec argv; None for a shell
    state: str
    reason: str | None
    policy_result: str
    policy_rule_id: str | None
    relay_id: str | None  # None when refused before a relay was chosen
    created_at: float
    updated_at: float
    expires_at: float
    # How its shell or command ended, when its agent said so (signed session.ended): the exit
    # code, or the signal that killed it ("TERM"); ``reason`` then says why it ended ("normal").
    exit_code: int | None = None
    exit_signal: str | None = None


class SessionList(BaseModel):
    """A page of the caller's team's sessions, newest first."""

    sessions: list[SessionView]
    next_after: str | None = None  # pass as ?after= for the page after this one
