"""The rendezvous store interface: domain records, store errors and the abstract ``Store``.

Conventions every backend keeps:

* Times are float Unix seconds (UTC), always passed in by the caller (``now``), never read from
  the clock inside the store, so tests and several instances agree on what "expired" means.
* Secrets (invite codes, registration keys, API keys) arrive already hashed: ``*_hash`` arguments
  are the SHA-256 digest (32 bytes) of the secret. The store never sees a secret.
* Ids are random strings with a prefix naming the kind: ``tm_``, ``op_``, ``inv_``, ``ak_``,
  ``rk_``, ``agt_``. The store generates them.
* Every method that touches a tenant's rows takes ``team_id`` and filters by it in SQL; a row of
  another team is reported exactly like a row that does not exist (``NotFound`` / ``None``).
* Public keys are raw Ed25519 bytes (32); thumbprints are RFC 7638 JWK thumbprints.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from protocol.identifiers import new_id as new_id  # the one definition, re-exported

if TYPE_CHECKING:
    from audit.store import AuditStore

MAX_TEAM_NAME_LENGTH = 64
MAX_NAME_LENGTH = 255
MAX_TAGS = 64
MAX_SCOPES = 64
# Rows a lookup by name or email returns at most (operators_matching, agents_matching).
MAX_MATCHES = 20
# A session's exit_signal: a signal's name without SIG ("TERM", "RTMIN") or its number.
MAX_SIGNAL_NAME_LENGTH = 16
# A control connection whose heartbeat is older than this is presumed dead (its rendezvous
# instance crashed without clearing it): ignored for clone detection and removed by
# prune_expired. The service must call touch_agent more often than this on a live channel.
CONNECTION_STALE_AFTER_SECONDS = 120.0


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class StoreError(Exception):
    """Base class for every error raised by a store backend."""


class NotFound(StoreError):
    """The row does not exist, or belongs to another team (the two are indistinguishable)."""


class AlreadyExists(StoreError):
    """A uniqueness rule was broken: team name, agent public key, operator key, api key hash…"""


class InvalidArgument(StoreError, ValueError):
    """A value cannot be stored: empty, too long, or of the wrong shape (the message says which)."""


class AmbiguousName(StoreError):
    """A name matches several rows of the team; the caller must use the id."""


class LastActiveAdmin(StoreError):
    """Disabling this operator would leave its team without an active admin."""


class LastRosterSigner(StoreError):
    """Disabling this operator would leave no active admin whose key the team's signed roster
    names as admin: nobody could sign a policy or roster its agents accept."""


class UnusableReason(StrEnum):
    """Why a single-use credential (invite, registration key, login challenge) was refused."""

    UNKNOWN = "unknown"
    USED = "used"
    EXPIRED = "expired"
    REVOKED = "revoked"


class CredentialUnusable(StoreError):
    """A single-use credential cannot be used; ``reason`` says why."""

    kind = "credential"

    def __init__(self, reason: UnusableReason) -> None:
        super().__init__(f"{self.kind} is {reason.value}")
        self.reason = reason


class InviteUnusable(CredentialUnusable):
    """The invite code is unknown, already used, or expired."""

    kind = "invite"


class RegistrationKeyUnusable(CredentialUnusable):
    """The registration key is unknown (or another team's), used, expired, or revoked."""

    kind = "registration key"


class ChallengeUnusable(CredentialUnusable):
    """The login challenge is unknown, already answered, or expired."""

    kind = "login challenge"


class TagsChanged(StoreError):
    """An agent's tags are no longer the ones a compare-and-set expected."""

    def __init__(self, current: Sequence[str]) -> None:
        super().__init__("the agent's tags changed meanwhile")
        self.current = tuple(current)


class TooManyPendingRequests(StoreError):
    """The requester already has the most approval requests waiting that it may have."""

    def __init__(self, pending: int) -> None:
        super().__init__(f"{pending} approval requests are pending")
        self.pending = pending


class StoreUnavailable(StoreError):
    """The database cannot be reached or opened (bad URL, server down, permissions)."""


class MigrationRefused(StoreError):
    """Pending migrations were not applied: other clients (maybe older instances) are connected."""


class SchemaTooNew(StoreError):
    """The database schema is newer than this program understands: it must not serve on it."""


class SchemaOutOfDate(StoreError):
    """The database lacks migrations this program needs; only ``init`` applies them."""


# --------------------------------------------------------------------------------------------
# Records (immutable snapshots of a row)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetiredServiceKey:
    """A service key replaced by ``keys rotate``: only its public half is kept."""

    role: str
    fingerprint: str
    public_key: str
    """The raw Ed25519 public key, base64url."""
    replaced_by: str
    """The fingerprint of the key that took its role."""
    retired_at: float
    accept_until: float
    """Until when tokens and grants it signed are still accepted (audit records: always)."""
    statement: str
    """The rotation statement (JSON) the retired key signed, naming its successor."""


@dataclass(frozen=True)
class Team:
    """A tenant: every other row belongs to exactly one team."""

    id: str
    name: str
    created_at: float


# The expires_at of a revoked invite (``invite revoke``, an operator disable): a time no clock
# passes, so a login whose clock was read before the revoke committed, or a revoke from a host
# whose clock is ahead, never leaves the code usable (no schema change: no separate mark).
INVITE_REVOKED_EXPIRES_AT = 0.0


@dataclass(frozen=True)
class Invite:
    """A one-time operator invite; the code itself is never stored, only its hash."""

    id: str
    team_id: str
    email: str
    role: str
    expires_at: float
    created_by: str
    created_at: float
    used_at: float | None
    used_by: str | None  # operator id

    def unusable_reason(self, now: float) -> UnusableReason | None:
        """Why this invite cannot be used at ``now``, or None if it can."""
        if self.used_at is not None:
            return UnusableReason.USED
        if self.expires_at <= INVITE_REVOKED_EXPIRES_AT:
            return UnusableReason.REVOKED
        if now >= self.expires_at:
            return UnusableReason.EXPIRED
        return None


@dataclass(frozen=True)
class Operator:
    """A human operator: an Ed25519 public key bound to a team, an email and a role."""

    id: str
    team_id: str
    email: str
    role: str
    public_key: bytes
    key_thumbprint: str
    created_at: float
    disabled_at: float | None
    tokens_valid_after: float  # tokens with iat before this are dead (logout-all, disable)

    def is_active(self) -> bool:
        """True unless the operator was disabled."""
        return self.disabled_at is None


@dataclass(frozen=True)
class DisabledOperator:
    """An operator just disabled and what it held that the same transaction revoked: its API
    keys, and the unused, unexpired registration keys it or those API keys created."""

    operator: Operator
    revoked_api_keys: tuple[str, ...]  # ids
    revoked_registration_keys: tuple[str, ...]  # ids
    # The team's unused invites for the operator's email (casefold-equal), expired at the
    # disable: a second-key invite must not bring the person back.
    revoked_invites: tuple[str, ...] = ()
    # It was disabled before this transaction (a repeat, or a concurrent disable committed
    # first): the transaction then revoked nothing (all three tuples are empty).
    already_disabled: bool = False


@dataclass(frozen=True)
class OperatorHoldings:
    """What a disable of an operator would revoke, read before it (ids): named in the
    ``operator.revoked`` record, which is durable before the disable."""

    api_keys: tuple[str, ...]
    registration_keys: tuple[str, ...]
    invites: tuple[str, ...]


@dataclass(frozen=True)
class TokenHolder:
    """What authenticating an access token needs from the store, read in one query."""

    operator: Operator | None  # the operator the token names, None if it is not in the team
    token_revoked: bool  # the token's id is on the revocation list


@dataclass(frozen=True)
class LoginChallenge:
    """A server nonce an operator signs to log in; answered at most once."""

    id: str
    challenge: str
    subject: str | None  # e.g. the operator key thumbprint the challenge was issued to
    expires_at: float
    created_at: float


@dataclass(frozen=True)
class ApiKey:
    """A scoped integration credential (``sk_live_…``), stored hashed, revocable instantly."""

    id: str
    team_id: str
    name: str
    scopes: tuple[str, ...]
    created_by: str
    created_at: float
    revoked_at: float | None

    def is_active(self) -> bool:
        """True unless the key was revoked."""
        return self.revoked_at is None


@dataclass(frozen=True)
class RegistrationKey:
    """A single-use agent enrollment key (``rk_live_…``); ``id`` is its short public name."""

    id: str
    team_id: str
    tags: tuple[str, ...]
    expires_at: float
    created_by: str
    created_at: float
    used_at: float | None
    used_by_agent: str | None
    revoked_at: float | None

    def unusable_reason(self, now: float) -> UnusableReason | None:
        """Why this key cannot register an agent at ``now``, or None if it can."""
        if self.revoked_at is not None:
            return UnusableReason.REVOKED
        if self.used_at is not None:
            return UnusableReason.USED
        if now >= self.expires_at:
            return UnusableReason.EXPIRED
        return None

    def is_usable(self, now: float) -> bool:
        """True if the key can still register an agent at ``now``."""
        return self.unusable_reason(now) is None


@dataclass(frozen=True)
class Agent:
    """A registered host. ``tags`` come from the registration key, never from the agent."""

    id: str
    team_id: str
    name: str
    hostname: str
    tags: tuple[str, ...]
    public_key: bytes
    key_fingerprint: str
    machine_fingerprint: str
    registration_key_id: str
    registered_at: float
    last_seen_at: float | None
    online: bool  # at least one live control connection is recorded
    policy_version: int | None = None  # the policy version the agent last reported applying
    policy_refusal: str | None = None  # why it refused the newest bundle it was sent, if it did
    # When an admin removed it (a tombstone: the row keeps its key so the key never registers
    # again); only ``get_agent(include_removed=True)`` and ``get_agent_by_public_key`` return
    # removed agents, every other read treats them as gone.
    removed_at: float | None = None

    def is_removed(self) -> bool:
        """True once an admin removed the agent: it may never authenticate again."""
        return self.removed_at is not None


@dataclass(frozen=True)
class AgentQuery:
    """Which of a team's agents to list: those after ``after`` in (name, id) order, at most
    ``limit`` of them (None: no limit), carrying every one of ``tags``, online or offline as
    ``online`` says (None: both), named with the prefix ``name_prefix`` (None: any name)."""

    limit: int | None = None
    after: tuple[str, str] | None = None  # the (name, id) of the last agent already listed
    tags: tuple[str, ...] = ()
    online: bool | None = None
    name_prefix: str | None = None


EVERY_AGENT = AgentQuery()


@dataclass(frozen=True)
class AgentListing:
    """A team's agents and the version of its newest policy bundle (0 without one).

    ``more`` is True when agents past the last one listed match the query too (the page was cut
    at its limit).
    """

    policy_version: int
    agents: list[Agent]
    more: bool = False


@dataclass(frozen=True)
class AgentConnection:
    """One live control channel of an agent, held by one rendezvous instance."""

    connection_id: str
    agent_id: str
    team_id: str
    instance_id: str
    machine_fingerprint: str
    connected_at: float
    heartbeat_at: float


@dataclass(frozen=True)
class ConnectionReport:
    """What ``mark_agent_connected`` found: signs of a cloned identity, if any."""

    other_connections: tuple[AgentConnection, ...]
    fingerprint_mismatch: bool
    registered_fingerprint: str
    presented_fingerprint: str
    # The agent's own earlier connection it named as replaced, if it was still recorded: removed
    # in the same transaction, so it is not among ``other_connections``.
    superseded: AgentConnection | None = None

    @property
    def clone_suspected(self) -> bool:
        """True when the identity is live twice or shows up with another machine fingerprint."""
        return bool(self.other_connections) or self.fingerprint_mismatch


@dataclass(frozen=True)
class PrunedHistory:
    """History rows a prune deleted (or would delete): sessions and approval requests."""

    sessions: int = 0
    approval_requests: int = 0

    def __add__(self, other: PrunedHistory) -> PrunedHistory:
        return PrunedHistory(
            self.sessions + other.sessions, self.approval_requests + other.approval_requests
        )

    def __bool__(self) -> bool:
        return bool(self.sessions or self.approval_requests)


class SessionState(StrEnum):
    """Where a brokered session is: offered to the agent, taken, refused by it, or over."""

    OFFERED = "offered"
    ACCEPTED = "accepted"
    REFUSED = "refused"
    ENDED = "ended"


@dataclass(frozen=True)
class Session:
    """A brokered session: who asked for what on which agent, through which relay."""

    id: str
    team_id: str
    agent_id: str
    operator_id: str
    operator_key_thumbprint: str
    mode: str  # "shell" or "exec"
    command: tuple[str, ...] | None
    relay_id: str
    relay_host: str
    relay_port: int
    relay_udp_port: int | None
    policy_result: str
    policy_rule_id: str | None
    state: SessionState
    state_reason: str | None
    created_at: float
    expires_at: float
    updated_at: float
    # How its shell or command ended, as the agent's signed session.ended says (None: not said):
    # the exit code, or the name of the signal that killed it (without SIG: "TERM").
    exit_code: int | None = None
    exit_signal: str | None = None


@dataclass(frozen=True)
class SessionQuery:
    """Which of a team's sessions to list, newest first: those before ``after`` in (created_at,
    id) order, at most ``limit`` of them (None: no limit), in one of ``states`` (empty: any),
    of one agent and one operator (None: any), created at or after ``since`` (None: ever).
    ``operator_email`` selects every operator of the team with that email (case-insensitive):
    one person invited again after being disabled has had several ids."""

    limit: int | None = None
    after: tuple[float, str] | None = None  # the (created_at, id) of the last session listed
    states: tuple[SessionState, ...] = ()
    agent_id: str | None = None
    operator_id: str | None = None
    since: float | None = None
    operator_email: str | None = None


EVERY_SESSION = SessionQuery()


@dataclass(frozen=True)
class ListedSession:
    """A session in a list, with its agent's name and its operator's email where the team
    still has them (None once the agent or operator is gone)."""

    session: Session
    agent_name: str | None
    operator_email: str | None


@dataclass(frozen=True)
class SessionListing:
    """A page of a team's sessions; ``more`` is True when sessions past the last one listed
    match the query too (the page was cut at its limit)."""

    sessions: list[ListedSession]
    more: bool = False


@dataclass(frozen=True)
class StoredPolicyBundle:
    """One version of a team's countersigned policy bundle (``bundle`` is its canonical JSON)."""

    team_id: str
    version: int
    content_sha256: str
    policy_sha256: str
    bundle: str
    admin_key_id: str
    created_by: str
    created_at: float


class ApprovalState(StrEnum):
    """Where a parked session request is."""

    # Stored, its approval.requested not written yet: counted under the requester's cap, but
    # never listed, shown, decided, expired or redeemed (publish_approval_request makes it
    # pending once the record is written; withdraw_unrecorded_approval_request if it is not).
    RECORDING = "recording"
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    EXECUTED = "executed"
    WITHDRAWN = "withdrawn"  # by its requester, before any decision


@dataclass(frozen=True)
class ApprovalRequest:
    """A session request parked until an approver signs exactly it (``approval``: its JSON)."""

    id: str
    team_id: str
    agent_id: str
    requester_id: str
    requester_email: str
    requester_thumbprint: str
    mode: str
    command: tuple[str, ...] | None
    command_sha256: str
    policy_version: int
    rule_id: str | None
    reason: str
    state: ApprovalState
    created_at: float
    expires_at: float
    decided_by: str | None = None
    decided_by_email: str | None = None
    decision_reason: str | None = None
    decided_at: float | None = None
    approval: str | None = None
    session_id: str | None = None
    executed_at: float | None = None


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------


class Store(abc.ABC):
    """The rendezvous's durable state. Open one with ``rendezvous.store.open_store``.

    All methods are trio-async. Read-modify-write methods are single transactions; the ones
    documented as atomic stay correct when several rendezvous instances share one database.
    """

    backend: str  # "sqlite" or "postgres"
    # Whether notify/listen reach other instances (PostgreSQL LISTEN/NOTIFY); SQLite has one.
    notifications_supported: bool = False

    @property
    @abc.abstractmethod
    def audit(self) -> AuditStore:
        """The audit log's storage (audit/store.py interface) on this same database."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release connections and threads. Idempotent."""

    # ---- schema ----------------------------------------------------------------------------

    # The newest migration this program knows, and the ones it applied when it opened the store.
    understood_schema_version: int = 0
    applied_migrations: tuple[tuple[int, str], ...] = ()

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The newest migration recorded in the database (0 for a database never migrated)."""

    @abc.abstractmethod
    async def pending_migrations(self) -> list[tuple[int, str]]:
        """(version, name) of the migrations this program knows that the database lacks."""

    # ---- teams ---------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_team(self, name: str, now: float) -> Team:
        """Create a team; AlreadyExists if the name is taken."""

    @abc.abstractmethod
    async def get_team(self, team_id: str) -> Team | None:
        """The team with this id, or None."""

    @abc.abstractmethod
    async def get_team_by_name(self, name: str) -> Team | None:
        """The team with this name, or None."""

    @abc.abstractmethod
    async def list_teams(self) -> list[Team]:
        """All teams, ordered by name."""

    # ---- operator invites and enrollment -------------------------------------------------

    @abc.abstractmethod
    async def create_invite(
        self,
        team_id: str,
        email: str,
        role: str,
        code_hash: bytes,
        expires_at: float,
        created_by: str,
        now: float,
    ) -> Invite:
        """Store a one-time invite (its code hashed). NotFound if the team does not exist."""

    @abc.abstractmethod
    async def list_invites(self, team_id: str) -> list[Invite]:
        """The team's invites, newest first."""

    @abc.abstractmethod
    async def revoke_invite(self, team_id: str, invite_id: str, now: float) -> Invite:
        """Make the team's unused, unexpired (at ``now``) invite ``invite_id`` unusable for good
        (expires_at = INVITE_REVOKED_EXPIRES_AT, whatever any clock says) and return it so.
        NotFound if the team holds no such invite; InviteUnusable if it is used, revoked or
        expired."""

    @abc.abstractmethod
    async def consume_invite(self, code_hash: bytes, now: float) -> Invite:
        """Atomically mark an unused, unexpired invite used and return it; else InviteUnusable."""

    @abc.abstractmethod
    async def enroll_operator(
        self, code_hash: bytes, now: float, public_key: bytes, key_thumbprint: str
    ) -> tuple[Operator, Invite]:
        """In one transaction: consume the invite and create the operator it names.

        InviteUnusable if the invite cannot be used; AlreadyExists if the key is already
        enrolled (the invite then stays unused). A disable of the email's operator expires its
        unused invites in the disable's transaction; nothing here compares clocks with it.
        """

    # ---- operators -----------------------------------------------------------------------

    @abc.abstractmethod
    async def get_operator(self, team_id: str, operator_id: str) -> Operator | None:
        """The team's operator with this id, or None."""

    @abc.abstractmethod
    async def get_operator_by_thumbprint(self, key_thumbprint: str) -> Operator | None:
        """The operator whose key has this RFC 7638 thumbprint (any team), or None."""

    @abc.abstractmethod
    async def list_operators(self, team_id: str) -> list[Operator]:
        """The team's operators, ordered by email."""

    @abc.abstractmethod
    async def operators_matching(self, team_id: str, id_or_email: str) -> list[Operator]:
        """The team's operators (disabled ones too) with this id or this email (ignoring ASCII
        case), oldest first; at most MAX_MATCHES."""

    @abc.abstractmethod
    async def disable_operator(
        self, team_id: str, operator_id: str, now: float, *, keep_an_active_admin: bool = False
    ) -> Operator:
        """Disable the operator and kill all its tokens (tokens_valid_after = now), revoking
        what it holds as ``disable_operator_and_holdings`` does. NotFound; with
        ``keep_an_active_admin``, LastActiveAdmin if it is the team's last active admin."""

    @abc.abstractmethod
    async def disable_operator_and_holdings(
        self,
        team_id: str,
        operator_id: str,
        now: float,
        *,
        keep_an_active_admin: bool = False,
        keep_a_signer: frozenset[str] | None = None,
    ) -> DisabledOperator:
        """In one transaction: disable the operator, kill its tokens, revoke its API keys and
        the unused, unexpired registration keys it or those API keys created, and expire the
        team's unused invites for its email (casefold-equal) (ids returned). NotFound; with
        ``keep_an_active_admin``, LastActiveAdmin as ``disable_operator``. An operator already
        disabled keeps its first disable's time and has nothing revoked again (an invite for its
        email made since is a deliberate re-invite); ``already_disabled`` says so. With
        ``keep_a_signer`` (the key thumbprints the signed roster names as admin),
        LastRosterSigner if the operator is an active admin named there and no other active
        admin is: checked under the same team lock, so two roster admins disabling each other
        cannot both succeed.

        A key created concurrently (its creator authenticated before this commits) is refused
        at use anyway: an API key or registration key whose creating operator (directly, or
        through the API key that created it) is disabled counts as revoked."""

    @abc.abstractmethod
    async def operator_holdings(
        self, team_id: str, operator_id: str, now: float
    ) -> OperatorHoldings:
        """What ``disable_operator_and_holdings`` would revoke at ``now`` (a read; the operator
        need not exist)."""

    @abc.abstractmethod
    async def email_holders(
        self, team_id: str, email: str, now: float
    ) -> tuple[list[Operator], list[Invite]]:
        """The team's enabled operators and usable invites whose email equals ``email`` under
        ``str.casefold`` (every one of them: no limit), oldest first."""

    @abc.abstractmethod
    async def revoke_operator_tokens(self, team_id: str, operator_id: str, now: float) -> Operator:
        """Kill every token issued to the operator before ``now`` (logout everywhere). NotFound."""

    # ---- login challenges ----------------------------------------------------------------

    @abc.abstractmethod
    async def create_login_challenge(
        self,
        challenge_id: str,
        challenge: str,
        expires_at: float,
        now: float,
        subject: str | None = None,
    ) -> LoginChallenge:
        """Remember a login challenge until ``expires_at``. AlreadyExists on a repeated id."""

    @abc.abstractmethod
    async def consume_login_challenge(self, challenge_id: str, now: float) -> LoginChallenge:
        """Atomically delete and return the challenge; ChallengeUnusable if unknown/used/expired."""

    # ---- token revocation and replay ------------------------------------------------------

    @abc.abstractmethod
    async def revoke_token(self, team_id: str, jti: str, expires_at: float, now: float) -> None:
        """Add a token id to the revocation list until the token would expire anyway."""

    @abc.abstractmethod
    async def is_token_revoked(self, jti: str, team_id: str | None = None) -> bool:
        """True if this token id was revoked (one indexed lookup; called on every request).

        Pass the token's ``team_id`` so only a revocation made by that team counts.
        """

    @abc.abstractmethod
    async def token_holder(self, team_id: str, operator_id: str, jti: str) -> TokenHolder:
        """The token's operator (None if not in ``team_id``) and whether ``jti`` was revoked.

        One query: this is called on every request made with an access token.
        """

    @abc.abstractmethod
    async def token_holder_and_agent_listing(
        self, team_id: str, operator_id: str, jti: str, query: AgentQuery = EVERY_AGENT
    ) -> tuple[TokenHolder, AgentListing]:
        """``token_holder`` and ``agent_listing(team_id, query)`` in one query (an operator's list).

        The caller must not use the listing unless the holder passes authentication.
        """

    @abc.abstractmethod
    async def remember_nonce(self, scope: str, nonce: str, expires_at: float, now: float) -> bool:
        """Atomically record ``(scope, nonce)``; False if it is already remembered and unexpired."""

    @abc.abstractmethod
    async def prune_expired(self, now: float) -> int:
        """Delete expired nonces, challenges, revocations and stale connections; count them."""

    @abc.abstractmethod
    async def prunable_history(self, team_id: str, before: float) -> PrunedHistory:
        """How many of the team's history rows ``prune_history(team_id, before, …)`` would
        delete in all (ended or refused sessions, settled approval requests)."""

    @abc.abstractmethod
    async def prune_history(self, team_id: str, before: float, limit: int) -> PrunedHistory:
        """Delete at most ``limit`` settled approval requests and ``limit`` ended or refused
        sessions of the team that last changed before ``before``, in one short transaction;
        count them. Never an open session, a pending (or approved, unused) request, or a
        session a kept request names. Call again until it deletes nothing."""

    @abc.abstractmethod
    async def probe_writes(self, scope: str, key: str) -> None:
        """Insert and delete, in one transaction, a row big enough to need new space (the
        database keeps none of it); StoreError when the database refuses writes (``/healthz``)."""

    # ---- API keys ------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_api_key(
        self,
        team_id: str,
        name: str,
        scopes: Sequence[str],
        key_hash: bytes,
        created_by: str,
        now: float,
    ) -> ApiKey:
        """Store a new API key (hashed). NotFound if the team does not exist."""

    @abc.abstractmethod
    async def get_api_key_by_hash(self, key_hash: bytes) -> ApiKey | None:
        """The API key with this hash (revoked ones too: check ``is_active``), or None. A key
        whose creator is disabled reads as revoked at the disable."""

    @abc.abstractmethod
    async def list_api_keys(self, team_id: str) -> list[ApiKey]:
        """The team's API keys, newest first; one whose creator is disabled reads as revoked
        (as at use)."""

    @abc.abstractmethod
    async def revoke_api_key(self, team_id: str, api_key_id: str, now: float) -> ApiKey:
        """Revoke the key (idempotent: keeps the first revocation time). NotFound."""

    # ---- registration keys and agent registration ----------------------------------------

    @abc.abstractmethod
    async def create_registration_key(
        self,
        team_id: str,
        key_hash: bytes,
        tags: Sequence[str],
        expires_at: float,
        created_by: str,
        now: float,
    ) -> RegistrationKey:
        """Store a new single-use registration key (hashed). NotFound if no such team."""

    @abc.abstractmethod
    async def get_registration_key(self, team_id: str, key_id: str) -> RegistrationKey | None:
        """The team's registration key with this public id, or None."""

    @abc.abstractmethod
    async def list_registration_keys(self, team_id: str) -> list[RegistrationKey]:
        """The team's registration keys, newest first; an unused one whose creator (directly or
        through its API key) is disabled reads as revoked (as at use)."""

    @abc.abstractmethod
    async def revoke_registration_key(
        self, team_id: str, key_id: str, now: float
    ) -> RegistrationKey:
        """Revoke the key (idempotent: keeps the first revocation time). NotFound."""

    @abc.abstractmethod
    async def register_agent(
        self,
        key_hash: bytes,
        now: float,
        public_key: bytes,
        key_fingerprint: str,
        machine_fingerprint: str,
        hostname: str,
        name: str,
        expected_team_id: str | None = None,
    ) -> tuple[Agent, RegistrationKey]:
        """In one transaction: check the key is usable, mark it used, create the agent.

        RegistrationKeyUnusable(reason) if unknown, used, expired or revoked — and UNKNOWN when
        ``expected_team_id`` is given and the key belongs to another team. AlreadyExists if the
        public key is already registered (the key then stays unused). Of two concurrent calls
        with one key exactly one succeeds. Agent tags are copied from the key.
        """

    # ---- agents --------------------------------------------------------------------------

    @abc.abstractmethod
    async def get_agent(
        self, team_id: str, agent_id: str, *, include_removed: bool = False
    ) -> Agent | None:
        """The team's agent with this id, or None (also for a removed one, unless
        ``include_removed``)."""

    @abc.abstractmethod
    async def get_agent_by_public_key(self, public_key: bytes) -> Agent | None:
        """The agent holding this public key (any team; for control-channel auth), or None.

        A removed agent is returned too (``removed_at`` set), so its refusal can say why.
        """

    @abc.abstractmethod
    async def find_agent(self, team_id: str, name_or_id: str) -> Agent | None:
        """The team's agent by id, else by unique name; None; AmbiguousName if several match.

        Removed agents are not found (by id or name): their names are free for new agents.
        """

    @abc.abstractmethod
    async def list_agents(self, team_id: str) -> list[Agent]:
        """The team's agents (not removed ones), ordered by name then id."""

    @abc.abstractmethod
    async def agents_matching(self, team_id: str, name_or_id: str) -> list[Agent]:
        """The team's agents, removed ones too, with this id or this name: current ones first,
        then by id; at most MAX_MATCHES. For reading history (a removed agent's sessions)."""

    @abc.abstractmethod
    async def set_agent_tags(
        self,
        team_id: str,
        agent_id: str,
        tags: Sequence[str],
        *,
        expected: Sequence[str] | None = None,
    ) -> Agent:
        """Replace the tags of a (not removed) agent of the team; the agent as updated.

        NotFound if the team has no such agent, or it was removed. With ``expected`` it is a
        compare-and-set: TagsChanged (carrying the current tags) unless the agent's tags are
        exactly ``expected`` when the write happens.
        """

    @abc.abstractmethod
    async def remove_agent(
        self, team_id: str, agent_id: str, now: float
    ) -> tuple[Agent, list[AgentConnection]]:
        """Atomically mark the agent removed and forget its live control connections.

        Returns the removed agent and the connections forgotten (their holders must close
        them). Idempotent: a second call keeps the first ``removed_at`` and forgets nothing
        more. NotFound if the team has no such agent. The row stays (a tombstone): the key can
        never register or connect again, sessions keep their history, and every other agent
        read treats the agent as gone.
        """

    @abc.abstractmethod
    async def agent_listing(self, team_id: str, query: AgentQuery = EVERY_AGENT) -> AgentListing:
        """The team's agents (not removed ones) ``query`` selects, ordered by name then id, and
        its newest policy version, in one query. InvalidArgument if the query is out of bounds."""

    @abc.abstractmethod
    async def mark_agent_connected(
        self,
        team_id: str,
        agent_id: str,
        instance_id: str,
        connection_id: str,
        machine_fingerprint: str,
        now: float,
        replaces: str | None = None,
    ) -> ConnectionReport:
        """Record a live control connection and report clone signs. NotFound if no such agent
        (or it was removed).

        The connection is recorded even when a clone is suspected; the caller decides. Other
        connections with no heartbeat for CONNECTION_STALE_AFTER_SECONDS are dropped, not
        reported. ``replaces`` names the agent's own earlier connection (a reconnect after a
        silent drop): it is removed, not reported, if it is this team's and agent's and was made
        from the same machine fingerprint; an id matching nothing of the kind removes nothing.
        """

    @abc.abstractmethod
    async def mark_agent_disconnected(
        self, team_id: str, agent_id: str, connection_id: str, now: float
    ) -> None:
        """Forget the connection and update last-seen. Idempotent."""

    @abc.abstractmethod
    async def touch_agent(
        self, team_id: str, agent_id: str, now: float, connection_id: str | None = None
    ) -> bool:
        """Update last-seen and the heartbeat of one connection (or, without an id, all of them).

        True if that connection (without an id: any of the agent's) is still recorded; False
        once it was superseded, cleared or pruned. Idempotent; no error if unknown.
        """

    @abc.abstractmethod
    async def list_agent_connections(self, team_id: str, agent_id: str) -> list[AgentConnection]:
        """The agent's live control connections, oldest first."""

    @abc.abstractmethod
    async def clear_instance_connections(self, instance_id: str, now: float) -> int:
        """Forget every connection held by an instance (call at its start-up and shutdown)."""

    @abc.abstractmethod
    async def clear_other_instances_connections(self, instance_id: str, now: float) -> int:
        """Forget every connection held by any instance but this one: for a database only one
        instance can serve (SQLite), whose earlier instances died without clearing theirs."""

    # ---- sessions ------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_session(self, session: Session) -> Session:
        """Store a new session row (its id made with ``new_id("ses")`` by the caller).

        NotFound unless the agent exists (not removed) in ``session.team_id``; AlreadyExists on
        a repeated id. Ordered against ``remove_agent`` (the agent's row lock): a session stored
        is seen by a listing made after the removal committed, and none is stored after it.
        """

    @abc.abstractmethod
    async def claim_session_end(
        self, team_id: str, agent_id: str, session_id: str, live_after: float, until: float
    ) -> Session | None:
        """Claim the ending of the agent's open (offered or accepted) session: its updated_at
        becomes ``until`` unless another claim is live (updated_at later than ``live_after``).
        The claimed row (state unchanged), or None: not open, or claimed already."""

    @abc.abstractmethod
    async def release_session_end(
        self, team_id: str, agent_id: str, session_id: str, claim: float, now: float
    ) -> None:
        """Give up a ``claim_session_end`` claim (``claim`` is its ``until``) that did not end
        the session: updated_at becomes ``now`` if the claim is still the row's."""

    @abc.abstractmethod
    async def ended_sessions_among(
        self, team_id: str, agent_id: str, session_ids: Sequence[str], reasons: Sequence[str]
    ) -> list[Session]:
        """Those of ``session_ids`` (at most a few hundred) that are the agent's sessions in the
        team, ended with one of ``reasons``: one query."""

    @abc.abstractmethod
    async def get_session(self, team_id: str, session_id: str) -> Session | None:
        """The team's session with this id, or None."""

    @abc.abstractmethod
    async def listed_session(self, team_id: str, session_id: str) -> ListedSession | None:
        """The team's session with this id with its agent's name and operator's email, as
        ``session_listing`` lists it, in one query; or None."""

    @abc.abstractmethod
    async def session_listing(
        self, team_id: str, query: SessionQuery = EVERY_SESSION
    ) -> SessionListing:
        """The team's sessions ``query`` selects, newest first ((created_at, id) descending),
        in one query. InvalidArgument if the query is out of bounds."""

    @abc.abstractmethod
    async def open_sessions_of_absent_agents(
        self, offline_before: float, limit: int
    ) -> list[Session]:
        """At most ``limit`` offered or accepted sessions, of any team, whose agent has no live
        control connection and was last seen before ``offline_before``, in (team id, session id)
        order."""

    @abc.abstractmethod
    async def open_sessions_of_disabled_operators(
        self, instance_id: str, limit: int, *, after: tuple[str, str] | None = None
    ) -> list[Session]:
        """At most ``limit`` offered or accepted sessions whose operator is disabled and whose
        agent has a connection held by ``instance_id``, in (team id, session id) order, from
        just past ``after`` (a (team id, session id) key; None: from the first)."""

    @abc.abstractmethod
    async def update_session_state(
        self,
        team_id: str,
        agent_id: str,
        session_id: str,
        state: SessionState,
        reason: str | None,
        now: float,
        *,
        from_states: Sequence[SessionState],
        exit_code: int | None = None,
        exit_signal: str | None = None,
    ) -> Session | None:
        """Atomically move the agent's session to ``state`` if it is in one of ``from_states``,
        with how its command ended (``exit_code``, ``exit_signal``) when the agent said so.

        Returns the updated session, or None when no such session of this agent is in those
        states (unknown, another agent's or team's, or already moved on). A move between open
        states (offered to accepted) keeps a later updated_at: a ``claim_session_end`` claim.
        """

    # ---- policy bundles ----------------------------------------------------------------------

    @abc.abstractmethod
    async def latest_policy_bundle(self, team_id: str) -> StoredPolicyBundle | None:
        """The team's newest policy bundle, or None if it never stored one or its chain was
        retired (``retire_policy_bundles``) and no bundle was stored since."""

    @abc.abstractmethod
    async def store_policy_bundle(self, bundle: StoredPolicyBundle) -> StoredPolicyBundle:
        """Store the next version atomically: AlreadyExists unless it is exactly newest + 1
        (a retired chain's last version counts: numbering goes on across a reset)."""

    @abc.abstractmethod
    async def newest_policy_version(self, team_id: str) -> int:
        """The highest version the team ever stored, a retired chain's included (0: none): the
        next bundle must be this + 1."""

    @abc.abstractmethod
    async def retire_policy_bundles(self, team_id: str, now: float) -> int:
        """Retire the team's policy chain (the server admin's ``team reset-policy``): delete
        its bundles but remember the last one's version, so the new chain's first bundle is
        that version + 1 and no grant, approval or agent can mistake one chain's version N for
        the other's. How many bundles were deleted (0: nothing in force to retire)."""

    @abc.abstractmethod
    async def set_agent_policy_version(
        self, team_id: str, agent_id: str, version: int | None, refusal: str | None
    ) -> None:
        """Record the version the agent applied and why it refused a newer one (None: didn't)."""

    # ---- approval requests -------------------------------------------------------------------

    @abc.abstractmethod
    async def create_approval_request(
        self, request: ApprovalRequest, *, max_pending: int | None = None
    ) -> ApprovalRequest:
        """Store a new parked request. NotFound unless the agent exists (not removed) in its
        team; with ``max_pending``, TooManyPendingRequests if its requester already has that
        many waiting at ``request.created_at`` (counted and stored atomically: concurrent
        requests queue on the team's row)."""

    @abc.abstractmethod
    async def publish_approval_request(
        self, team_id: str, request_id: str
    ) -> ApprovalRequest | None:
        """Atomically make a recording request pending (its audit record is written); None if
        it is not recording."""

    @abc.abstractmethod
    async def withdraw_unrecorded_approval_request(
        self,
        team_id: str,
        request_id: str,
        *,
        decided_by: str,
        decided_by_email: str,
        reason: str,
        now: float,
    ) -> ApprovalRequest | None:
        """Atomically withdraw a recording request whose audit record could not be written;
        None if it is not recording."""

    @abc.abstractmethod
    async def get_approval_request(self, team_id: str, request_id: str) -> ApprovalRequest | None:
        """The team's approval request with this id, or None."""

    @abc.abstractmethod
    async def list_approval_requests(
        self, team_id: str, states: Sequence[ApprovalState]
    ) -> list[ApprovalRequest]:
        """The team's requests in one of ``states``, oldest first."""

    @abc.abstractmethod
    async def count_pending_approval_requests(
        self, team_id: str, requester_id: str, now: float
    ) -> int:
        """How many of the team's requests by ``requester_id`` still wait for a decision at
        ``now`` (pending or recording and not past their expiry, whether or not marked expired
        yet)."""

    @abc.abstractmethod
    async def decide_approval_request(
        self,
        team_id: str,
        request_id: str,
        state: ApprovalState,
        *,
        decided_by: str,
        decided_by_email: str,
        reason: str | None,
        approval: str | None,
        now: float,
        expires_at: float | None = None,
    ) -> ApprovalRequest | None:
        """Atomically approve, deny or withdraw a pending, unexpired request; None if it is not
        one.

        ``expires_at``, when given, replaces the request's expiry (an approval's own end).
        """

    @abc.abstractmethod
    async def expire_approval_request(
        self, team_id: str, request_id: str, now: float
    ) -> ApprovalRequest | None:
        """Atomically mark a pending or approved (unused) request past its time expired.

        None if it is not one.
        """

    @abc.abstractmethod
    async def execute_approval_request(
        self, team_id: str, request_id: str, session_id: str, now: float
    ) -> ApprovalRequest | None:
        """Atomically mark an approved request executed by ``session_id``; None if not approved."""

    # ---- service keys ------------------------------------------------------------------------

    @abc.abstractmethod
    async def pin_service_key_fingerprints(
        self, fingerprints: Mapping[str, str], now: float
    ) -> dict[str, str]:
        """Record the fingerprint of each role not recorded yet; return every recorded one.

        The first instance to initialise a database pins its service keys there, so a later
        instance started with other keys (an empty data dir) can be refused by name.
        """

    @abc.abstractmethod
    async def service_key_fingerprints(self) -> dict[str, str]:
        """The service key fingerprints recorded in the database, by role (empty: none yet)."""

    @abc.abstractmethod
    async def rotate_service_key(self, retired: RetiredServiceKey, now: float) -> bool:
        """In one transaction, pin ``retired.replaced_by`` for its role and keep ``retired``.

        False (nothing changed) if the role's pin is no longer ``retired.fingerprint``: another
        rotation got there first.
        """

    @abc.abstractmethod
    async def retired_service_keys(self) -> list[RetiredServiceKey]:
        """Every retired service key, oldest first."""

    # ---- notifications between instances ---------------------------------------------------

    async def notify(self, channel: str, payload: str) -> None:
        """Publish ``payload`` to every instance listening on ``channel`` (after it commits)."""
        raise StoreError(f"the {self.backend} store has no notifications between instances")

    def listen(self, channel: str) -> AbstractAsyncContextManager[AsyncIterator[str]]:
        """Receive the payloads published on ``channel`` while the context is open."""
        raise StoreError(f"the {self.backend} store has no notifications between instances")
