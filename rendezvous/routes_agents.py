"""Agent registration (a signed payload spending a registration key), the team's agent list,
and removing an agent (an admin cutting off a lost or retired host for good).

A refused removal or tag change (the caller may not write agents, or names no agent of its
team) leaves one ``agent.remove_failed`` or ``agent.tags_change_failed`` record in the CALLER's
team log with the id as sent: another team's agent id and one that does not exist are answered
and recorded alike, so neither the answer nor the log says which it was."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NoReturn

from fastapi import APIRouter
from fastapi.routing import APIRoute
from pydantic import BaseModel

from audit.trust import agent_registration_context
from protocol.domains import Purpose
from protocol.errors import ProtocolError, ReplayError
from protocol.identifiers import HOSTNAME_PATTERN as HOSTNAME_PATTERN  # the one definition
from protocol.identifiers import MAX_HOSTNAME_LENGTH as MAX_HOSTNAME_LENGTH
from protocol.identifiers import is_hostname
from protocol.identity import PublicIdentity, b64url, b64url_decode
from protocol.signed_payload import unverified_fields
from rendezvous.agent_list_query import (
    DEFAULT_AGENTS_PER_PAGE,
    MAX_AGENTS_PER_PAGE,
    encode_cursor,
    openapi_query_parameter,
)
from rendezvous.agent_tags import normalised_tags
from rendezvous.audit_trail import (
    REFUSED_NOT_FOUND,
    REFUSED_NOT_PERMITTED,
    SERVICE_LOG,
    Action,
    agent_actor,
    caller_actor,
    refused_id,
    unauthenticated_actor,
)
from rendezvous.auth import Permission, Principal, authorize
from rendezvous.context import ServiceContext
from rendezvous.control_channel import close_removed_agent_channels
from rendezvous.credentials import REGISTRATION_KEY_PREFIX, has_shape, hash_secret
from rendezvous.dependencies import Caller, CallerReadingAgents, Context, RateLimited
from rendezvous.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    ServiceError,
    Unauthorized,
)
from rendezvous.offer_bus import (
    AGENT_REMOVED_REASON,
    AgentReach,
    end_open_sessions,
)
from rendezvous.schemas import (
    AgentList,
    AgentTagsRequest,
    AgentView,
    RegisterResponse,
    SignedEnvelope,
)
from rendezvous.store import (
    Agent,
    AgentConnection,
    AgentListing,
    AgentQuery,
    AlreadyExists,
    RegistrationKeyUnusable,
    SessionState,
    StoreError,
)
from rendezvous.store import NotFound as StoreNotFound
from rendezvous.store.base import SessionQuery, TagsChanged
from rendezvous.team_policy import enrollment_trust

logger = logging.getLogger("tucdesk.rendezvous.agents")
router = APIRouter(tags=["agents"])
MAX_MACHINE_FINGERPRINT_LENGTH = 256
AGENT_LIST_PATH = "/agents"
NO_SUCH_AGENT = "no such agent in your team"
# Open sessions of an agent a removal ends at most (newest first); a repeat ends any beyond.
MAX_SESSIONS_ENDED_ON_REMOVAL = 1000


class RemovedAgentView(BaseModel):
    """What ``DELETE /v1/agents/{id}`` removed (as it was listed), and when."""

    id: str
    name: str
    hostname: str
    tags: list[str]
    key_fingerprint: str
    registered_at: float
    last_seen_at: float | None
    removed_at: float
    # The agent's open sessions the removal ended (reason agent_removed), and whether the agent
    # was asked to end them over its live channel: AgentReach (rendezvous/offer_bus.py).
    ended_sessions: list[str] = []
    agent_reached: str = AgentReach.NOT_CONNECTED.value
    # Set when ending them failed (the audit log or the store): the agent is removed anyway,
    # and repeating the removal ends them.
    ending_sessions_failed: bool = False


@router.post("/agents/register", response_model=RegisterResponse, dependencies=[RateLimited])
async def register_agent(body: SignedEnvelope, ctx: Context) -> RegisterResponse:
    """Register an agent: its key signs {registration key, public key, fingerprint, hostname}.

    An optional ``team_id`` in the payload pins the team the agent expects to join: a key of any
    other team is then refused as unknown.
    """
    envelope = body.model_dump()
    key = await _claimed_key(ctx, envelope)
    try:
        verified = await ctx.signed_payloads.verify(ctx, envelope, Purpose.REGISTER, key)
    except ReplayError:
        await _refuse(ctx, key, "replayed", "this registration payload was already used")
    except ProtocolError as error:
        await _refuse(ctx, key, "invalid_payload", f"registration refused: {error}")
    fields = verified.fields
    secret = fields.get("registration_key")
    hostname = fields.get("hostname")
    machine = fields.get("machine_fingerprint")
    if not has_shape(secret, REGISTRATION_KEY_PREFIX):
        await _refuse(ctx, key, "malformed_key", "the registration key is malformed")
    if not isinstance(hostname, str) or not is_hostname(hostname):
        await _refuse(ctx, key, "malformed_payload", "hostname is missing or not a host name")
    if (
        not isinstance(machine, str)
        or not machine
        or len(machine) > MAX_MACHINE_FINGERPRINT_LENGTH
    ):
        await _refuse(ctx, key, "malformed_payload", "machine_fingerprint is missing or too long")
    expected_team = fields.get("team_id")
    if expected_team is not None and not isinstance(expected_team, str):
        await _refuse(ctx, key, "malformed_payload", "team_id must be text when given")
    assert isinstance(secret, str) and isinstance(hostname, str) and isinstance(machine, str)
    try:
        agent, registration_key = await ctx.store.register_agent(
            hash_secret(secret),
            ctx.now(),
            key.raw,
            key.fingerprint,
            machine,
            hostname,
            hostname,
            expected_team_id=expected_team,
        )
    except RegistrationKeyUnusable as error:
        reason = error.reason.value
        await _refuse(ctx, key, f"key_{reason}", f"the registration key is {reason}")
    except AlreadyExists:
        await _refuse(ctx, key, "key_already_registered", "this agent key is already registered")
    actor = agent_actor(agent.id, agent.hostname)
    await ctx.audit.record(
        agent.team_id,
        actor=actor,
        action=Action.REGISTRATION_KEY_USED,
        target=f"registration_key:{registration_key.id}",
        details={"agent_id": agent.id},
    )
    await ctx.audit.record(
        agent.team_id,
        actor=actor,
        action=Action.AGENT_REGISTERED,
        target=agent.id,
        details=agent_registration_context(
            PublicIdentity(agent.public_key),
            # The name `tucdesk agents` and agent status show: auditors pin and filter by it.
            name=agent.name,
            hostname=agent.hostname,
            machine_fingerprint=agent.machine_fingerprint,
            tags=list(agent.tags),
        ),
    )
    ctx.metrics.registrations.labels("ok").inc()
    return RegisterResponse(
        agent_id=agent.id,
        name=agent.name,
        team_id=agent.team_id,
        tags=list(agent.tags),
        service_keys=ctx.keys.jwks(),
        policy_trust=await enrollment_trust(ctx, agent.team_id),
        warnings=await _shared_name_warnings(ctx, agent.team_id, agent.id, agent.name),
    )


# How many namesakes a registration looks at to warn that its name is taken.
MAX_NAMESAKES_CHECKED = 16


async def _shared_name_warnings(
    ctx: ServiceContext, team_id: str, agent_id: str, name: str
) -> list[str]:
    """A warning when other agents of the team already have ``name`` (cloned images share a
    host name): operators must then address each one by id. Registration still succeeds: it
    has already been committed and audited, so a failed lookup only loses the warning."""
    try:
        listing = await ctx.store.agent_listing(
            team_id, AgentQuery(limit=MAX_NAMESAKES_CHECKED, name_prefix=name)
        )
    except StoreError as error:
        logger.warning("agent %s registered; looking for namesakes failed: %s",
                       agent_id, type(error).__name__)  # fmt: skip
        return []
    namesakes = sorted(other.id for other in listing.agents
                       if other.name == name and other.id != agent_id)
    if not namesakes:
        return []
    logger.warning("agent %s registered with the name %r that %s of its team already has",
                   agent_id, name, ", ".join(namesakes))
    return [
        f"another agent of this team is already called {name} ({', '.join(namesakes)}); "
        f"operators must use agent ids to tell them apart. Give this one its own name: "
        f"tucdesk-agent enroll --force --name NAME with a new registration key"
    ]


# The query is parsed by ``agent_list_query`` (the same code on both paths), not by FastAPI:
# these only document it.
_AGENT_LIST_PARAMETERS = [
    openapi_query_parameter(
        "limit", "agents per page",
        {"type": "integer", "minimum": 1, "maximum": MAX_AGENTS_PER_PAGE,
         "default": DEFAULT_AGENTS_PER_PAGE},
    ),
    openapi_query_parameter(
        "after", "the next_after of the previous page (opaque)", {"type": "string"}
    ),
    openapi_query_parameter(
        "tag", "only agents carrying this tag (repeat: all of them)",
        {"type": "array", "items": {"type": "string"}},
    ),
    openapi_query_parameter("online", "only online (true) or offline (false) agents",
                     {"type": "boolean"}),
    openapi_query_parameter("name", "only agents whose name starts with this", {"type": "string"}),
]  # fmt: skip


@router.get(
    AGENT_LIST_PATH,
    response_model=AgentList,
    openapi_extra={"parameters": _AGENT_LIST_PARAMETERS},
)
async def list_agents(caller_reading_agents: CallerReadingAgents, ctx: Context) -> AgentList:
    """A page of the caller's team's agents in (name, id) order, filtered by the query (the
    team comes from the verified credential only).

    A running service answers this request in ``rendezvous.agent_list_endpoint``, without
    FastAPI's routing; both call ``team_agent_list``.
    """
    caller, query, listing = caller_reading_agents
    return await team_agent_list(ctx, caller, query, listing)


@router.delete(AGENT_LIST_PATH + "/{agent_id}", response_model=RemovedAgentView)
async def remove_agent(agent_id: str, caller: Caller, ctx: Context) -> RemovedAgentView:
    """Remove an agent of the caller's team (admins): its open sessions end (recorded
    ``session.ended``, reason ``agent_removed``; the agent is told down its live channel, on
    whichever instance, before that closes), its key never authenticates again, its live
    control channel closes at once, and it leaves the list and name resolution (its name is
    free again); its sessions keep their history. Repeating it answers the same removal.
    """
    await _authorize_recorded(ctx, caller, agent_id, Action.AGENT_REMOVE_FAILED)
    agent = await ctx.store.get_agent(caller.team_id, agent_id, include_removed=True)
    if agent is None:
        await _record_refused(ctx, caller, agent_id, Action.AGENT_REMOVE_FAILED, REFUSED_NOT_FOUND)
        raise NotFound(NO_SUCH_AGENT)
    if not agent.is_removed():
        # No audit, no action: the record is durable before the key stops working.
        await ctx.audit.record(
            caller.team_id,
            actor=caller_actor(caller),
            action=Action.AGENT_REMOVED,
            target=agent.id,
            details={
                "name": agent.name,
                "hostname": agent.hostname,
                "key_fingerprint": agent.key_fingerprint,
                "agent_key_id": PublicIdentity(agent.public_key).key_id,
            },
        )
    # Before the key stops working and the channels close: the agent must still hear it. Also
    # on a repeat, which ends what a failed first attempt left open.
    ended: list[str] = []  # every id whose row a pass below ended, also when one failed later
    first = await _end_sessions_of_removed(ctx, caller, agent, ended)
    try:
        removed, forgotten = await ctx.store.remove_agent(caller.team_id, agent.id, ctx.now())
    except StoreNotFound:
        raise NotFound(NO_SUCH_AGENT) from None
    # Again once the removal has committed, before the channels close: a session brokered
    # after the first listing (its POST passed find_agent before the removal) was stored before
    # the commit (create_session is ordered against remove_agent and refuses a removed agent),
    # so this listing finds it, and nothing is stored after. The connections the removal
    # forgot still say where the agent's channels are.
    second = await _end_sessions_of_removed(ctx, caller, agent, ended, holders=forgotten)
    # Also on a repeat, which closes again the channels this instance holds (the first removal
    # deleted the connection rows the other instances' notices are built from: theirs close at
    # their next heartbeat).
    await close_removed_agent_channels(ctx, removed, forgotten)
    reach = second.reach if second.session_ids else first.reach
    if ended:
        logger.info("agent %s removed: ended %d open session(s), agent %s", agent.id,
                    len(ended), reach.value)  # fmt: skip
    view = _removed_agent_view(removed)
    view.ended_sessions = ended
    view.agent_reached = reach.value
    view.ending_sessions_failed = first.failed or second.failed
    return view


@dataclass(frozen=True)
class RemovalEnding:
    """One pass of ending a removed agent's sessions: how it reached the agent, and whether it
    failed partway (the ids it ended before that are in the caller's list all the same)."""

    reach: AgentReach
    session_ids: list[str]
    failed: bool


async def _end_sessions_of_removed(
    ctx: ServiceContext, caller: Principal, agent: Agent, ended: list[str],
    holders: list[AgentConnection] | None = None,
) -> RemovalEnding:
    """End the open sessions of ``agent``, which is being removed (its own ``session.ended``
    would be refused once it is): audited by the admin, reason ``agent_removed``; each id whose
    row ended goes into ``ended``. A failure (the audit log or the store) is logged and said:
    cutting the agent off matters more, and a repeat of the removal ends the rest."""
    before = len(ended)
    try:
        listing = await ctx.store.session_listing(
            caller.team_id,
            SessionQuery(
                limit=MAX_SESSIONS_ENDED_ON_REMOVAL, agent_id=agent.id,
                states=(SessionState.OFFERED, SessionState.ACCEPTED),
            ),
        )  # fmt: skip
        sessions = [listed.session for listed in listing.sessions]
        done = await end_open_sessions(
            ctx, sessions, AGENT_REMOVED_REASON, caller_actor(caller),
            {"agent_name": agent.name}, ended=ended, holders=holders,
        )  # fmt: skip
    except (ServiceError, StoreError) as error:
        logger.warning("ending the sessions of agent %s being removed failed: %s (%d ended "
                       "before that)", agent.id, type(error).__name__,
                       len(ended) - before)  # fmt: skip
        return RemovalEnding(AgentReach.NOT_CONNECTED, ended[before:], True)
    return RemovalEnding(done.reach, done.session_ids, False)


TAGS_CHANGED_MESSAGE = (
    "the agent's tags changed meanwhile (now: {current}); nothing was changed: read them "
    "again and repeat the change"
)


class TagsChangedMeanwhile(Conflict):
    """The agent's tags changed between the caller's read and its write."""

    code = "tags_changed"


class AgentTagsView(BaseModel):
    """An agent's tags after ``PUT /v1/agents/{id}/tags``, and before it."""

    id: str
    name: str
    tags: list[str]
    previous_tags: list[str]


@router.put(AGENT_LIST_PATH + "/{agent_id}/tags", response_model=AgentTagsView)
async def set_agent_tags(
    agent_id: str, body: AgentTagsRequest, caller: Caller, ctx: Context
) -> AgentTagsView:
    """Replace the tags of an agent of the caller's team (admins). The change is audited and
    pending, like a roster change: policy (at the rendezvous and on the agent alike) decides on
    the signed tags, so the new ones count once an admin signs them (``tucdesk roster sign``)."""
    await _authorize_recorded(ctx, caller, agent_id, Action.AGENT_TAGS_CHANGE_FAILED)
    tags = normalised_tags(body.tags)
    seen = None if body.previous_tags is None else normalised_tags(body.previous_tags)
    agent = await ctx.store.get_agent(caller.team_id, agent_id)
    if agent is None:
        await _record_refused(
            ctx, caller, agent_id, Action.AGENT_TAGS_CHANGE_FAILED, REFUSED_NOT_FOUND
        )
        raise NotFound(NO_SUCH_AGENT)
    previous = list(agent.tags)
    if seen is not None and seen != previous:
        raise TagsChangedMeanwhile(TAGS_CHANGED_MESSAGE.format(current=_shown_tags(previous)))
    if previous != tags:
        # No audit, no action: the record is durable before the tags change.
        await ctx.audit.record(
            caller.team_id,
            actor=caller_actor(caller),
            action=Action.AGENT_TAGS_CHANGED,
            target=agent.id,
            details={"name": agent.name, "previous_tags": previous, "tags": tags},
        )
    try:
        # Compare-and-set against the tags just audited as replaced (or, unchanged, just read):
        # a change landing in between is never overwritten unrecorded.
        updated = await ctx.store.set_agent_tags(
            caller.team_id, agent.id, tags, expected=previous
        )
    except StoreNotFound:
        if previous != tags:
            # Removed after the change was recorded: the log must not keep claiming it.
            await _record_tags_change_failed(ctx, caller, agent, previous, tags,
                                             {"reason": "not_found"})  # fmt: skip
        raise NotFound(NO_SUCH_AGENT) from None
    except TagsChanged as changed:
        current = list(changed.current)
        if previous != tags:
            await _record_tags_change_failed(ctx, caller, agent, previous, tags,
                                             {"current_tags": current})  # fmt: skip
        raise TagsChangedMeanwhile(
            TAGS_CHANGED_MESSAGE.format(current=_shown_tags(current))
        ) from None
    return AgentTagsView(
        id=updated.id, name=updated.name, tags=list(updated.tags), previous_tags=previous
    )


async def _authorize_recorded(
    ctx: ServiceContext, caller: Principal, agent_id: str, refused_as: Action
) -> None:
    """``authorize`` for agents:write, a refusal recorded as ``refused_as`` first."""
    try:
        authorize(caller, Permission.AGENTS_WRITE)
    except Forbidden:
        await _record_refused(ctx, caller, agent_id, refused_as, REFUSED_NOT_PERMITTED)
        raise


async def _record_refused(
    ctx: ServiceContext, caller: Principal, agent_id: str, refused_as: Action, reason: str
) -> None:
    """Record, in the caller's own team log, a removal or tag change refused before anything
    was done (its answer does not depend on whether the record could be appended)."""
    await ctx.audit.record_refusal(
        caller.team_id, actor=caller_actor(caller), action=refused_as,
        target=refused_id(agent_id), details={"reason": reason},
    )  # fmt: skip


def _shown_tags(tags: list[str]) -> str:
    return ", ".join(tags) if tags else "(none)"


async def _record_tags_change_failed(
    ctx: ServiceContext,
    caller: Principal,
    agent: Agent,
    previous: list[str],
    tags: list[str],
    why: dict[str, Any],
) -> None:
    """Follow an ``agent.tags_changed`` just recorded that did not take effect."""
    await ctx.audit.record(
        caller.team_id,
        actor=caller_actor(caller),
        action=Action.AGENT_TAGS_CHANGE_FAILED,
        target=agent.id,
        details={"name": agent.name, "previous_tags": previous, "tags": tags, **why},
    )


def _removed_agent_view(agent: Agent) -> RemovedAgentView:
    assert agent.removed_at is not None
    return RemovedAgentView(
        id=agent.id,
        name=agent.name,
        hostname=agent.hostname,
        tags=list(agent.tags),
        key_fingerprint=agent.key_fingerprint,
        registered_at=agent.registered_at,
        last_seen_at=agent.last_seen_at,
        removed_at=agent.removed_at,
    )


def agent_list_route() -> APIRoute:
    """The FastAPI route of the agent list (what request metrics are labelled with)."""
    for route in router.routes:
        if isinstance(route, APIRoute) and route.endpoint is list_agents:
            return route
    raise LookupError("the agent list route is not registered")


async def team_agent_list(
    ctx: ServiceContext, caller: Principal, query: AgentQuery, listing: AgentListing | None
) -> AgentList:
    """The page of the agent list ``caller`` may read: refused without the permission;
    ``listing`` is the one read with the credential for ``query`` (None: read it now)."""
    authorize(caller, Permission.AGENTS_READ)
    if listing is None:
        listing = await ctx.store.agent_listing(caller.team_id, query)
    last = listing.agents[-1] if listing.more and listing.agents else None
    return AgentList(
        next_after=encode_cursor(last.name, last.id) if last is not None else None,
        policy_version=listing.policy_version,
        agents=[
            AgentView(
                id=agent.id,
                name=agent.name,
                hostname=agent.hostname,
                tags=list(agent.tags),
                online=agent.online,
                last_seen_at=agent.last_seen_at,
                registered_at=agent.registered_at,
                key_fingerprint=agent.key_fingerprint,
                public_key=b64url(agent.public_key),
                policy_version=agent.policy_version,
                policy_refusal=agent.policy_refusal,
            )
            for agent in listing.agents
        ]
    )


async def _claimed_key(ctx: ServiceContext, envelope: dict[str, Any]) -> PublicIdentity:
    try:
        value = unverified_fields(envelope).get("public_key")
        if not isinstance(value, str):
            raise BadRequest("the registration payload must carry public_key")
        return PublicIdentity(b64url_decode(value, max_size=64))
    except ProtocolError as error:
        ctx.metrics.registrations.labels("malformed_payload").inc()
        raise BadRequest(f"the registration payload is malformed: {error}") from None


async def _refuse(
    ctx: ServiceContext, key: PublicIdentity, reason: str, message: str
) -> NoReturn:
    """Count and audit a refused registration, then refuse it.

    The caller has not proved membership of any team, so refusals go to the service log.
    """
    ctx.metrics.registrations.labels(reason).inc()
    if reason != "key_already_registered":  # a conflict, not a refused credential
        # In the refusal log too (fail2ban): a guessed rk_live_ key is a refused credential.
        ctx.metrics.refusal_log.refused(f"registration_{reason}")
    await ctx.audit.record(
        SERVICE_LOG,
        actor=unauthenticated_actor(key.fingerprint),
        action=Action.AGENT_REGISTRATION_REFUSED,
        target=f"agent_key:{key.key_id}",
        details={"reason": reason},
    )
    if reason == "key_already_registered":
        raise Conflict(message)
    raise Unauthorized(message, reason)
