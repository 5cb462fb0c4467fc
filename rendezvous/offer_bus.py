"""Delivering session offers to the agent's control channel, on whichever instance holds it.

The instance that brokered a session looks up which instance holds the agent's live channel
(``agent_connections.instance_id``). Its own channel: the offer goes straight down it. Another
instance's (PostgreSQL only): ``NOTIFY tucdesk_session_offers`` with the instance id, team id and
session id; every instance LISTENs (``listen_for_offers``) and delivers the offers addressed to
it, reading the offer from the sessions table. No token crosses the database: the delivering
instance mints the agent's relay token itself.

The same channel carries two other notices, each a JSON object with a ``kind``: a new policy
bundle for a team (rendezvous/policy_distribution.py), and ``connection_superseded`` (instance,
team id, agent id, connection id): an agent reconnected to another instance naming a connection
this one holds, so the holder closes that channel at once instead of at its next heartbeat. A
notice is a hint, never an order: the holder closes only the named connection of the named agent
in the named team, and only once the store confirms the row is gone. On SQLite (one instance)
there are no notices; a lost one leaves the heartbeat check to close the channel.

A third, ``operator_disabled`` (origin instance, team id, operator id), follows an admin
disabling an operator: every other instance looks up that operator's open sessions (offered or
accepted) and sends ``{"type": "end_sessions", "ids": [...], "reason": "operator_disabled"}``
down the channels it holds of those sessions' agents (the disabling instance does the same for
its own channels directly). It too is a hint: an instance acts only once the store says the
operator is disabled, and only on that operator's sessions in that team. A notice lost (sent
while an instance's LISTEN connection was reconnecting, or not sent at all because the store
failed) is caught by every instance's periodic sweep (``end_disabled_operators_sessions_here``,
run with the prune task every PRUNE_INTERVAL_SECONDS, rendezvous/server.py): it sends
``end_sessions`` for every open session of a disabled operator on the channels it holds, once per
channel (each channel remembers the ids it was sent, bounded), refuses (audited) their offers
past expiry instead, and pages the sessions in (team id, session id) order, at most
MAX_SESSIONS_SWEPT_PER_SWEEP a sweep, going on from there the next time. An
agent offline at that moment is caught when it next reports its live sessions
(rendezvous/control_channel.py): the sessions of disabled operators among them are ended then.
A session brokered while its operator was being disabled may escape that look-up (its row did
not exist yet), so the broker checks the operator again once the row exists, and
``deliver_here`` once more right before sending: an offer of a disabled operator is refused
(audited ``session.refused``, reason ``operator_disabled``) instead of sent. An ``end_sessions``
that still overtakes the offer is remembered by the agent, which then refuses the offer. The
same holds for an agent being removed: the broker and ``deliver_here`` check it too (refused,
reason ``agent_removed``), and the removal lists the agent's open sessions again once it has
committed, so a session stored meanwhile is ended before its channels close.

While this instance is not listening (its LISTEN connection lost, the database down), notices
addressed to it are lost. It listens again within LISTEN_RETRY_MAX_SECONDS (with jitter) of the
database coming back, logs how long it was deaf, and catches up (``catch_up_offers``): the
offers still open for agents whose newest live channel is here, not yet sent to them, are sent
now (an offer goes to an agent at most once from one instance, whichever of its channels it
went down, even one closed since: ``deliver_here``); those that expired meanwhile
end ``offer_undelivered`` (audited). Until then ``/healthz`` answers 503 (``listening_failure``).

A fifth, ``sessions_ended`` (origin instance, team id, agent id, reason, ids), follows the
rendezvous ending sessions itself: an admin ending one (``POST /v1/sessions/{id}/end``, reason
``ended_by_admin``) or removing their agent (``DELETE /v1/agents/{id}``, reason
``agent_removed``). The row is ended (and audited) first; then ``tell_agent_to_end`` sends
``end_sessions`` down this instance's channel of the agent, and publishes the notice (as many
as the ids need, at most MAX_NOTICE_BYTES each) when another instance holds a live channel of
it. It too is a hint: the holder sends ``end_sessions`` only for the ids whose row the store
shows ended with that reason, on that agent, in that team. A removal publishes it before the
``connection_superseded`` notices that close the channels, so the holder (which handles notices
in order) sends ``end_sessions`` down a channel before closing it.

A fourth, ``service_keys_rotated`` (role), follows ``keys rotate`` (rendezvous/key_rotation.py):
every instance reloads its service keys as SIGHUP does (and pushes them to its agents). It too is
a hint: the instance takes only key files that match the database's pins. A role that is not one
of the service key roles makes the notice malformed, and reloads are coalesced, at most one per
KEYS_RELOAD_MIN_INTERVAL_SECONDS (``KeyReloads``).

Every instance hears every notice, so each one refuses a malformed notice (oversized, not a JSON
object, an unknown ``kind``, a field missing or of the wrong type) whoever it is addressed to,
logs it and counts it in ``tucdesk_rejected_inputs_total`` under the notice's kind.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import trio

from protocol.relay_token import Side, issue_relay_token
from rendezvous.audit_trail import Action, Actor, service_actor
from rendezvous.errors import ServiceError
from rendezvous.key_rotation import KEYS_ROTATED_NOTICE_KIND, reload_service_keys
from rendezvous.policy_distribution import POLICY_NOTICE_KIND, handle_policy_notice
from rendezvous.service_keys import KEY_ROLES
from rendezvous.store import AgentConnection, Session, SessionState, StoreError
from rendezvous.store.base import CONNECTION_STALE_AFTER_SECONDS, SessionQuery

if TYPE_CHECKING:
    from rendezvous.context import ServiceContext

logger = logging.getLogger("tucdesk.rendezvous.offers")

OFFER_CHANNEL = "tucdesk_session_offers"
MAX_NOTICE_BYTES = 1024
SUPERSEDED_NOTICE_KIND = "connection_superseded"
OPERATOR_DISABLED_NOTICE_KIND = "operator_disabled"
# The end_sessions reason (agent/session_host.py knows the same word and says it in words).
OPERATOR_DISABLED_REASON = "operator_disabled"
SESSIONS_ENDED_NOTICE_KIND = "sessions_ended"
# The reasons of sessions the rendezvous ends itself, row first (agent/session_host.py knows
# these words too): an admin removed their agent, or ended them (``tucdesk sessions end``).
AGENT_REMOVED_REASON = "agent_removed"
ENDED_BY_ADMIN_REASON = "ended_by_admin"
ENDED_BY_RENDEZVOUS_REASONS = frozenset({AGENT_REMOVED_REASON, ENDED_BY_ADMIN_REASON})
# Session ids in one end_sessions message (agent/session_host.py MAX_END_SESSION_IDS refuses
# more); a disabled operator's sessions on one agent go in as many messages as they need.
MAX_END_SESSION_IDS = 64
# How long one end of a session (``end_open_sessions``) holds its claim on the row while it
# records and ends it: a second end meanwhile (another admin, a retry, a removal) records
# nothing. A claim left by a crash lapses after it. Claims are read with an allowance for the
# instances' clocks: a row updated by an instance up to this far ahead is not taken for claimed.
ENDING_CLAIM_SECONDS = 30.0
ENDING_CLAIM_CLOCK_ALLOWANCE_SECONDS = 5.0
CLAIM_RELEASE_TIMEOUT_SECONDS = 5.0
# Open sessions of one disabled operator looked up at once, newest first; any beyond are ended
# when their agents next report their live sessions.
MAX_SESSIONS_ENDED_PER_OPERATOR = 1000
# Open sessions of disabled operators the periodic sweep reads at once on one instance (one
# page, in (team id, session id) order), and at most how many it reads in one sweep: it goes
# on from there the next time, so every row is reached however many stay open.
SWEEP_PAGE_SESSIONS = 1000
MAX_SESSIONS_SWEPT_PER_SWEEP = 20_000
LISTEN_RETRY_MIN_SECONDS = 0.5
# Offers addressed to this instance are lost while it is not listening, so it tries again soon
# (with jitter, 0.5-1.5x) whatever the length of the outage: a LISTEN costs one connection.
LISTEN_RETRY_MAX_SECONDS = 5.0
# Open offers of one agent read at once by the catch-up after listening again.
MAX_OFFERS_CAUGHT_UP_PER_AGENT = 100
# The end reason of an offer that expired before it reached its agent (the session never ran).
OFFER_UNDELIVERED = "offer_undelivered"
OFFER_NOT_DELIVERED = "the agent's control channel was gone when the offer arrived"

# tucdesk_rejected_inputs_total reasons: a notice whose kind cannot be told, then one per kind.
REJECTED_NOTICE = "bus_notice"
REJECTED_OFFER_NOTICE = "bus_offer_notice"
REJECTED_SUPERSEDED_NOTICE = "bus_superseded_notice"
REJECTED_OPERATOR_DISABLED_NOTICE = "bus_operator_disabled_notice"
REJECTED_KEYS_ROTATED_NOTICE = "bus_keys_rotated_notice"
REJECTED_SESSIONS_ENDED_NOTICE = "bus_sessions_ended_notice"
# Key reloads that notices ask for, at most one per this many seconds: a burst of notices (or a
# flood from whoever can NOTIFY) costs one reload, and one more after it so the last is taken.
KEYS_RELOAD_MIN_INTERVAL_SECONDS = 2.0


def offer_message(ctx: ServiceContext, session: Session, now: float) -> dict[str, Any]:
    """The ``session_offer`` control message, with a fresh agent-side relay token."""
    lifetime = max(1, min(int(session.expires_at - now), 300))
    token = issue_relay_token(
        ctx.keys.relay_token,
        session_id=session.id,
        side=Side.AGENT,
        relay_id=session.relay_id,
        now=now,
        issuer=ctx.config.issuer,
        lifetime=lifetime,
    )
    return {
        "type": "session_offer",
        "session_id": session.id,
        "expires_at": int(session.expires_at),
        "relay": {
            "id": session.relay_id,
            "host": session.relay_host,
            "port": session.relay_port,
            "udp_port": session.relay_udp_port,
        },
        "relay_token": token,
    }


class OfferDelivery(StrEnum):
    """What became of an offer handed to ``deliver_offer`` or ``deliver_here``."""

    SENT = "sent"
    """Sent down this instance's channel, or published for the instance holding the channel."""
    NOT_SENT = "not_sent"
    """No live channel here, or the session is no longer an open offer."""
    OPERATOR_DISABLED = "operator_disabled"
    """The session's operator was disabled meanwhile: the offer must be refused, not sent."""
    AGENT_REMOVED = "agent_removed"
    """The session's agent was removed meanwhile: the offer must be refused, not sent."""


async def deliver_offer(
    ctx: ServiceContext, session: Session, holder: AgentConnection
) -> OfferDelivery:
    """Send the offer down the agent's channel held by ``holder``'s instance.

    SENT for another instance means the notice was published, not that the agent has it.
    """
    if holder.instance_id == ctx.instance_id:
        return await deliver_here(ctx, session.team_id, session.id)
    if not ctx.store.notifications_supported:
        return OfferDelivery.NOT_SENT
    notice = json.dumps(
        {"instance": holder.instance_id, "team_id": session.team_id, "session_id": session.id}
    )
    await ctx.store.notify(OFFER_CHANNEL, notice)
    return OfferDelivery.SENT


async def announce_superseded(ctx: ServiceContext, superseded: AgentConnection) -> None:
    """Tell the instance holding ``superseded`` (not this one) to close that channel now.

    Best effort: if the notice cannot be sent, the holder finds out at the channel's next
    heartbeat, as it did before notices.
    """
    if not ctx.store.notifications_supported:
        return
    notice = json.dumps(
        {
            "kind": SUPERSEDED_NOTICE_KIND,
            "instance": superseded.instance_id,
            "team_id": superseded.team_id,
            "agent_id": superseded.agent_id,
            "connection_id": superseded.connection_id,
        }
    )
    if len(notice) > MAX_NOTICE_BYTES:
        return  # ids are far shorter; the holder would ignore it anyway
    try:
        await ctx.store.notify(OFFER_CHANNEL, notice)
    except StoreError as error:
        logger.warning("announcing a superseded connection failed: %s", type(error).__name__)


def end_sessions_message(session_ids: list[str], reason: str) -> dict[str, Any]:
    """The ``end_sessions`` control message: the agent ends these sessions of its own now."""
    return {"type": "end_sessions", "ids": session_ids, "reason": reason}


class AgentReach(StrEnum):
    """Where ``tell_agent_to_end`` sent an agent its ``end_sessions``."""

    HERE = "here"
    """Queued down the agent's live channel on this instance."""
    OTHER_INSTANCE = "other_instance"
    """Published for the other instance holding the agent's live channel (a hint it acts on)."""
    NOT_CONNECTED = "not_connected"
    """The agent has no live channel anywhere (or its queue here is full)."""


async def tell_agent_to_end(
    ctx: ServiceContext, team_id: str, agent_id: str, session_ids: list[str], reason: str,
    *, holders: list[AgentConnection] | None = None,
) -> AgentReach:
    """Ask an agent to end ``session_ids`` (ended in the store already with ``reason``, one of
    ENDED_BY_RENDEZVOUS_REASONS): down this instance's live channel of it, and through a
    ``sessions_ended`` notice to another instance holding one (``holders``: the agent's
    connections, when the store no longer has them: a removal forgot them). Never raises: a
    store failure is logged (the rows are ended; a live_sessions report asks it again)."""
    if not session_ids:
        return AgentReach.NOT_CONNECTED
    reach = AgentReach.NOT_CONNECTED
    connections = ctx.connections
    if connections is not None and connections.channels(team_id, agent_id):
        sent_all = True
        for start in range(0, len(session_ids), MAX_END_SESSION_IDS):
            chunk = session_ids[start : start + MAX_END_SESSION_IDS]
            if not await connections.send(team_id, agent_id, end_sessions_message(chunk, reason)):
                sent_all = False
        if sent_all:
            reach = AgentReach.HERE
    if not ctx.store.notifications_supported:
        return reach
    now = ctx.now()
    try:
        if holders is None:
            holders = await ctx.store.list_agent_connections(team_id, agent_id)
        elsewhere = [
            connection
            for connection in holders
            if connection.instance_id != ctx.instance_id
            and connection.heartbeat_at > now - CONNECTION_STALE_AFTER_SECONDS
        ]
        if not elsewhere:
            return reach
        for notice in _sessions_ended_notices(ctx, team_id, agent_id, session_ids, reason):
            await ctx.store.notify(OFFER_CHANNEL, notice)
    except StoreError as error:
        logger.warning("announcing sessions ended (%s) failed: %s", reason, type(error).__name__)
        return reach
    return AgentReach.HERE if reach is AgentReach.HERE else AgentReach.OTHER_INSTANCE


@dataclass(frozen=True)
class SessionsEnded:
    """What ``end_open_sessions`` did: the sessions whose row it ended, and how their agent was
    asked to end them."""

    session_ids: list[str]
    reach: AgentReach


async def end_open_sessions(
    ctx: ServiceContext, sessions: list[Session], reason: str, actor: Actor,
    details: dict[str, Any], *, ended: list[str] | None = None,
    holders: list[AgentConnection] | None = None,
) -> SessionsEnded:
    """End open sessions of ONE agent at the rendezvous's word (``reason``, one of
    ENDED_BY_RENDEZVOUS_REASONS): for each, its ending is claimed (``claim_session_end``: of
    two ends at once, one goes on, the other records nothing and leaves it out), then
    ``session.ended`` by ``actor`` (with ``details``) is recorded, then its row ends; then the
    agent is asked to end them (``tell_agent_to_end``, ``holders`` as there).

    Raises ServiceError (the audit log failed: nothing more is done) or StoreError; ``ended``,
    if given, receives each id as its row ends, so the caller knows them even then."""
    if not sessions:
        return SessionsEnded([], AgentReach.NOT_CONNECTED)
    team_id, agent_id = sessions[0].team_id, sessions[0].agent_id
    assert all(s.team_id == team_id and s.agent_id == agent_id for s in sessions)
    ended = [] if ended is None else ended
    ended_here: list[str] = []
    try:
        for session in sessions:
            now = ctx.now()
            claimed = await ctx.store.claim_session_end(
                team_id, agent_id, session.id, now + ENDING_CLAIM_CLOCK_ALLOWANCE_SECONDS,
                now + ENDING_CLAIM_SECONDS,
            )  # fmt: skip
            if claimed is None:
                continue  # ended already, or another end has it (and records it)
            try:
                # No audit, no action: the record is durable before the row ends.
                await ctx.audit.record(
                    team_id, actor=actor, action=Action.SESSION_ENDED, target=agent_id,
                    session_id=session.id,
                    details={"reason": reason, "state": claimed.state.value,
                             "operator_id": claimed.operator_id, **details},
                )  # fmt: skip
            except BaseException:
                await _release_claim(ctx, claimed)
                raise
            # Any open state: an offer accepted meanwhile ends too. Only the agent's own end
            # (or the service's, agent_lost) landing since the claim makes this match nothing:
            # both records then stand (docs/sessions.md).
            updated = await ctx.store.update_session_state(
                team_id, agent_id, session.id, SessionState.ENDED, reason, ctx.now(),
                from_states=(SessionState.OFFERED, SessionState.ACCEPTED),
            )  # fmt: skip
            if updated is not None:
                ended.append(session.id)
                ended_here.append(session.id)
    finally:
        # Also when a later one failed: those whose row ended must end on the host too.
        reach = await tell_agent_to_end(
            ctx, team_id, agent_id, ended_here, reason, holders=holders
        )
    return SessionsEnded(ended_here, reach)


async def _release_claim(ctx: ServiceContext, claimed: Session) -> None:
    """Give up the claim on ``claimed`` after its record failed, so that a repeat need not wait
    for it to lapse (best effort: it lapses after ENDING_CLAIM_SECONDS anyway)."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLAIM_RELEASE_TIMEOUT_SECONDS):
        try:
            await ctx.store.release_session_end(
                claimed.team_id, claimed.agent_id, claimed.id, claimed.updated_at, ctx.now()
            )
        except StoreError as error:
            logger.warning("releasing the end claim of session %s failed: %s", claimed.id,
                           type(error).__name__)  # fmt: skip


def _sessions_ended_notices(
    ctx: ServiceContext, team_id: str, agent_id: str, session_ids: list[str], reason: str
) -> list[str]:
    """``sessions_ended`` notices naming ``session_ids``, as few as fit MAX_NOTICE_BYTES each."""
    notices: list[str] = []
    chunk: list[str] = []

    def encoded(ids: list[str]) -> str:
        return json.dumps({"kind": SESSIONS_ENDED_NOTICE_KIND, "origin": ctx.instance_id,
                           "team_id": team_id, "agent_id": agent_id, "reason": reason,
                           "ids": ids})  # fmt: skip

    for session_id in session_ids:
        if len(encoded([*chunk, session_id])) > MAX_NOTICE_BYTES and chunk:
            notices.append(encoded(chunk))
            chunk = []
        chunk.append(session_id)
    if chunk and len(encoded(chunk)) <= MAX_NOTICE_BYTES:  # ids are far shorter
        notices.append(encoded(chunk))
    return notices


async def end_disabled_operator_sessions(
    ctx: ServiceContext, team_id: str, operator_id: str
) -> int:
    """Have the agents end the open sessions of an operator just disabled: those whose channel
    this instance holds at once, the others through an ``operator_disabled`` notice to the
    instances holding them. How many sessions this instance asked its agents to end.

    Raises StoreError if either part failed (the other is still tried); every instance's
    periodic sweep (``end_disabled_operators_sessions_here``) ends them later anyway.
    """
    failure: StoreError | None = None
    told = 0
    try:
        told = await end_disabled_operator_sessions_here(ctx, team_id, operator_id)
    except StoreError as error:
        failure = error
    if ctx.store.notifications_supported:
        notice = json.dumps(
            {
                "kind": OPERATOR_DISABLED_NOTICE_KIND,
                "origin": ctx.instance_id,
                "team_id": team_id,
                "operator_id": operator_id,
            }
        )
        if len(notice) <= MAX_NOTICE_BYTES:  # ids are far shorter; others would refuse it
            try:
                await ctx.store.notify(OFFER_CHANNEL, notice)
            except StoreError as error:
                logger.warning("announcing a disabled operator failed: %s", type(error).__name__)
                failure = failure or error
    if failure is not None:
        raise failure
    return told


async def end_disabled_operator_sessions_here(
    ctx: ServiceContext, team_id: str, operator_id: str
) -> int:
    """Send ``end_sessions`` down this instance's channels for the open sessions of operator
    ``operator_id`` of ``team_id``, if the store says it is disabled; how many sessions."""
    connections = ctx.connections
    if connections is None:
        return 0
    operator = await ctx.store.get_operator(team_id, operator_id)
    if operator is None or operator.is_active():
        return 0  # a hint, not an order: only a disabled operator's sessions end
    listing = await ctx.store.session_listing(
        team_id,
        SessionQuery(
            limit=MAX_SESSIONS_ENDED_PER_OPERATOR,
            states=(SessionState.OFFERED, SessionState.ACCEPTED),
            operator_id=operator_id,
        ),
    )
    by_agent: dict[str, list[str]] = {}
    for listed in listing.sessions:
        by_agent.setdefault(listed.session.agent_id, []).append(listed.session.id)
    told = 0
    for agent_id, session_ids in by_agent.items():
        if not connections.channels(team_id, agent_id):
            continue  # another instance's agent (the notice reaches it), or offline
        for start in range(0, len(session_ids), MAX_END_SESSION_IDS):
            chunk = session_ids[start : start + MAX_END_SESSION_IDS]
            message = end_sessions_message(chunk, OPERATOR_DISABLED_REASON)
            if await connections.send(team_id, agent_id, message):
                told += len(chunk)
    return told


async def end_disabled_operators_sessions_here(ctx: ServiceContext) -> int:
    """The periodic sweep: send ``end_sessions`` down this instance's channels for the open
    sessions of disabled operators (catching a lost notice or a failed disable), each once per
    channel; refuse (audited) their offers past expiry instead. How many it asked to end."""
    connections = ctx.connections
    if connections is None:
        return 0
    told = swept = 0
    after = connections.disabled_sweep_resume_after
    while swept < MAX_SESSIONS_SWEPT_PER_SWEEP:
        page = await ctx.store.open_sessions_of_disabled_operators(
            ctx.instance_id, SWEEP_PAGE_SESSIONS, after=after
        )
        told += await _end_or_refuse(ctx, page)
        swept += len(page)
        if len(page) < SWEEP_PAGE_SESSIONS:
            after = None  # the end reached: the next sweep starts over
            break
        after = (page[-1].team_id, page[-1].id)
    connections.disabled_sweep_resume_after = after
    return told


async def _end_or_refuse(ctx: ServiceContext, sessions: list[Session]) -> int:
    """One page of the sweep: an offer past its expiry is refused (operator_disabled, audited)
    rather than sent to its agent; the rest are sent ``end_sessions`` unless this channel was
    already sent one naming them (a row that stays open must not be repeated every minute)."""
    connections = ctx.connections
    assert connections is not None
    now = ctx.now()
    by_agent: dict[tuple[str, str], list[str]] = {}
    for session in sessions:
        if session.state is SessionState.OFFERED and now > session.expires_at:
            try:
                await refuse_offer_of_disabled_operator(ctx, session)
            except (ServiceError, StoreError) as error:
                logger.warning("refusing the expired offer %s failed: %s; the next sweep "
                               "retries", session.id, type(error).__name__)  # fmt: skip
            continue
        by_agent.setdefault((session.team_id, session.agent_id), []).append(session.id)
    told = 0
    for (team_id, agent_id), session_ids in by_agent.items():
        if not connections.channels(team_id, agent_id):
            continue  # its row says this instance, but the channel closed meanwhile
        unsent = connections.not_yet_ended(team_id, agent_id, session_ids)
        for start in range(0, len(unsent), MAX_END_SESSION_IDS):
            chunk = unsent[start : start + MAX_END_SESSION_IDS]
            message = end_sessions_message(chunk, OPERATOR_DISABLED_REASON)
            if await connections.send(team_id, agent_id, message):
                told += len(chunk)
    return told


async def deliver_here(ctx: ServiceContext, team_id: str, session_id: str) -> OfferDelivery:
    """Send a still-open offer down this instance's channel to the agent, unless its operator
    was disabled or its agent removed since the session was brokered (checked last, right
    before sending), or it went down a live channel of the agent here already (SENT)."""
    session = await ctx.store.get_session(team_id, session_id)
    now = ctx.now()
    if session is None or session.state is not SessionState.OFFERED or now > session.expires_at:
        return OfferDelivery.NOT_SENT
    connections = ctx.connections
    if connections is None:
        return OfferDelivery.NOT_SENT
    if connections.was_offered(session.team_id, session.agent_id, session.id):
        # The notice and the catch-up after a listening gap may both name it, or the agent's
        # channel it went down may have closed since (its ack lost): the agent has it.
        return OfferDelivery.SENT
    # A disable that committed after the broker's check must not let the offer through: its
    # own look-up of open sessions may have run before this session's row existed.
    operator = await ctx.store.get_operator(team_id, session.operator_id)
    if operator is None or not operator.is_active():
        return OfferDelivery.OPERATOR_DISABLED
    # Likewise a removal: its second look-up of the agent's open sessions (after its commit)
    # ends a session it finds, but this offer must not go out once the agent is removed.
    if await ctx.store.get_agent(team_id, session.agent_id) is None:
        return OfferDelivery.AGENT_REMOVED
    offer = offer_message(ctx, session, now)
    # Again with no await from here to the queue: the broker's and a catch-up's deliver_here
    # for one session may both have passed the check above while the store answered.
    if connections.was_offered(session.team_id, session.agent_id, session.id):
        return OfferDelivery.SENT
    if connections.send_now(session.team_id, session.agent_id, offer):
        return OfferDelivery.SENT
    return OfferDelivery.NOT_SENT


async def refuse_offer_of_disabled_operator(ctx: ServiceContext, session: Session) -> None:
    """Audit, then mark refused (reason ``operator_disabled``), an offer whose operator was
    disabled before it could be sent (no audit, no action: the record comes first)."""
    await _refuse_unsent_offer(ctx, session, OPERATOR_DISABLED_REASON)


async def refuse_offer_of_removed_agent(ctx: ServiceContext, session: Session) -> None:
    """Audit, then mark refused (reason ``agent_removed``), an offer whose agent was removed
    before it could be sent."""
    await _refuse_unsent_offer(ctx, session, AGENT_REMOVED_REASON)


async def refuse_undeliverable_offer(
    ctx: ServiceContext, session: Session, delivered: OfferDelivery
) -> bool:
    """Refuse (audited) an offer ``deliver_here`` would not send because its operator was
    disabled or its agent removed; False for any other outcome (nothing done)."""
    if delivered is OfferDelivery.OPERATOR_DISABLED:
        await refuse_offer_of_disabled_operator(ctx, session)
        return True
    if delivered is OfferDelivery.AGENT_REMOVED:
        await refuse_offer_of_removed_agent(ctx, session)
        return True
    return False


async def _refuse_unsent_offer(ctx: ServiceContext, session: Session, reason: str) -> None:
    await ctx.audit.record(
        session.team_id, actor=service_actor("session offer"), action=Action.SESSION_REFUSED,
        target=session.agent_id, session_id=session.id, details={"reason": reason},
    )  # fmt: skip
    await ctx.store.update_session_state(
        session.team_id, session.agent_id, session.id, SessionState.REFUSED, reason,
        ctx.now(), from_states=(SessionState.OFFERED,),
    )  # fmt: skip


@dataclass
class ListeningGap:
    """Since when, and why, an instance has not been listening for notices."""

    since: float
    reason: str


# The instances of this process whose listener is not listening now, by instance id (an entry
# lives only while its listen_for_offers runs).
_not_listening: dict[str, ListeningGap] = {}


def listening_failure(ctx: ServiceContext) -> ListeningGap | None:
    """Why this instance is not listening for offers now (PostgreSQL only), or None."""
    return _not_listening.get(ctx.instance_id)


class KeyReloads:
    """The service key reloads ``service_keys_rotated`` notices ask for, coalesced: at most one
    per KEYS_RELOAD_MIN_INTERVAL_SECONDS (``run`` does them, under the listener's nursery)."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._wanted = trio.Event()
        self._roles: set[str] = set()

    def request(self, role: str) -> None:
        """Ask for a reload because ``role`` was rotated; returns at once."""
        self._roles.add(role)
        self._wanted.set()

    async def run(self) -> None:
        """Reload whenever asked, then wait out the interval; until cancelled."""
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            roles, self._roles = sorted(self._roles), set()
            # Never raises: a failure is logged (ERROR) and the minute sweep tries again.
            await reload_service_keys(
                self._ctx, f"the {', '.join(roles)} key was rotated (keys rotate)"
            )
            await trio.sleep(KEYS_RELOAD_MIN_INTERVAL_SECONDS)


async def listen_for_offers(
    ctx: ServiceContext, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Deliver offers other instances publish for this one's channels, until cancelled.

    Reports started once it is listening (at once on a store without notifications). A lost
    database connection (server restarted, backend terminated) is logged and retried with
    backoff and jitter; the instance's agent channels do not depend on it. Listening again, it
    says how long it was not, and catches up on the offers it may have missed meanwhile.
    """
    if not ctx.store.notifications_supported:
        task_status.started()
        return
    reloads = KeyReloads(ctx)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reloads.run)
        await _listen(ctx, reloads, task_status)


async def _listen(
    ctx: ServiceContext, reloads: KeyReloads, task_status: trio.TaskStatus[None]
) -> None:
    delay = LISTEN_RETRY_MIN_SECONDS
    started = False
    try:
        while True:
            try:
                async with ctx.store.listen(OFFER_CHANNEL) as notices:
                    gap = _not_listening.pop(ctx.instance_id, None)
                    if not started:
                        task_status.started()
                        started = True
                    delay = LISTEN_RETRY_MIN_SECONDS
                    if gap is not None:
                        await _resume_after_gap(ctx, gap)
                    async for notice in notices:
                        await _handle_notice(ctx, notice, reloads)
            except StoreError as error:
                _note_gap(ctx, str(error))
                logger.warning(
                    "listening for session offers failed: %s; listening again in about %.1f s",
                    error, delay,
                )  # fmt: skip
            except Exception as error:  # noqa: BLE001 - a bus fault must not take the channels down
                _note_gap(ctx, type(error).__name__)
                logger.exception(
                    "listening for session offers failed unexpectedly; listening again in about "
                    "%.1f s", delay,
                )  # fmt: skip
            if not started:
                # Report started anyway so the service serves; offers go direct or are retried.
                task_status.started()
                started = True
            await trio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter, not a secret
            delay = min(delay * 2, LISTEN_RETRY_MAX_SECONDS)
    finally:
        _not_listening.pop(ctx.instance_id, None)


def _note_gap(ctx: ServiceContext, reason: str) -> None:
    gap = _not_listening.get(ctx.instance_id)
    since = gap.since if gap is not None else ctx.now()
    _not_listening[ctx.instance_id] = ListeningGap(since, reason)


async def _resume_after_gap(ctx: ServiceContext, gap: ListeningGap) -> None:
    """Say that listening resumed, then catch up on the offers missed meanwhile."""
    logger.info("listening for session offers again, after %.1f s without", ctx.now() - gap.since)
    try:
        sent, ended = await catch_up_offers(ctx)
    except (StoreError, ServiceError) as error:
        # The offers not caught up expire; the agent's next live_sessions report ends them.
        logger.warning("catching up on missed session offers failed: %s", type(error).__name__)
        return
    if sent or ended:
        logger.info("caught up on missed session offers: sent %d, ended %d that expired "
                    "undelivered", sent, ended)  # fmt: skip


async def catch_up_offers(ctx: ServiceContext) -> tuple[int, int]:
    """Send the open offers this instance may have missed a notice for: those of agents whose
    newest live channel is here, not yet sent down a channel here; end (``offer_undelivered``,
    audited) those that expired. (How many were sent, how many ended.)"""
    connections = ctx.connections
    if connections is None:
        return 0, 0
    sent = ended = 0
    for team_id, agent_id in connections.held_agents():
        listing = await ctx.store.session_listing(
            team_id,
            SessionQuery(
                limit=MAX_OFFERS_CAUGHT_UP_PER_AGENT, states=(SessionState.OFFERED,),
                agent_id=agent_id,
            ),
        )  # fmt: skip
        missed = [
            listed.session for listed in listing.sessions
            if not connections.was_offered(team_id, agent_id, listed.session.id)
        ]  # fmt: skip
        if not missed or not await _newest_channel_is_here(ctx, team_id, agent_id):
            continue  # addressed to another instance's channel: its own catch-up sends it
        for session in missed:
            if ctx.now() > session.expires_at:
                ended += await end_undelivered_offer(ctx, session)
                continue
            delivered = await deliver_here(ctx, team_id, session.id)
            if await refuse_undeliverable_offer(ctx, session, delivered):
                continue
            if delivered is OfferDelivery.SENT:
                sent += 1
    return sent, ended


async def _newest_channel_is_here(ctx: ServiceContext, team_id: str, agent_id: str) -> bool:
    """Whether the connection a broker would send the agent's offers to is this instance's."""
    now = ctx.now()
    live = [
        connection
        for connection in await ctx.store.list_agent_connections(team_id, agent_id)
        if connection.heartbeat_at > now - CONNECTION_STALE_AFTER_SECONDS
    ]
    return bool(live) and live[-1].instance_id == ctx.instance_id


async def end_undelivered_offer(ctx: ServiceContext, session: Session) -> int:
    """Audit, then end (``offer_undelivered``), an offer that expired before its agent had it;
    1 if this call ended it, 0 if it was answered or ended meanwhile."""
    await ctx.audit.record(
        session.team_id, actor=service_actor("session offer"), action=Action.SESSION_ENDED,
        target=session.agent_id, session_id=session.id,
        details={"reason": OFFER_UNDELIVERED, "state": session.state.value,
                 "operator_id": session.operator_id},
    )  # fmt: skip
    updated = await ctx.store.update_session_state(
        session.team_id, session.agent_id, session.id, SessionState.ENDED, OFFER_UNDELIVERED,
        ctx.now(), from_states=(SessionState.OFFERED,),
    )  # fmt: skip
    return 0 if updated is None else 1


async def _handle_notice(ctx: ServiceContext, notice: str, reloads: KeyReloads) -> None:
    if len(notice) > MAX_NOTICE_BYTES:
        _refuse_notice(ctx, REJECTED_NOTICE, "an oversized notice")
        return
    try:
        fields = json.loads(notice)
    except ValueError:
        _refuse_notice(ctx, REJECTED_NOTICE, "a notice that is not JSON")
        return
    if not isinstance(fields, dict):
        _refuse_notice(ctx, REJECTED_NOTICE, "a notice that is not a JSON object")
        return
    kind = fields.get("kind")
    if kind == POLICY_NOTICE_KIND:
        await handle_policy_notice(ctx, fields)
    elif kind == SUPERSEDED_NOTICE_KIND:
        await _handle_superseded_notice(ctx, fields)
    elif kind == OPERATOR_DISABLED_NOTICE_KIND:
        await _handle_operator_disabled_notice(ctx, fields)
    elif kind == KEYS_ROTATED_NOTICE_KIND:
        _handle_keys_rotated_notice(ctx, fields, reloads)
    elif kind == SESSIONS_ENDED_NOTICE_KIND:
        await _handle_sessions_ended_notice(ctx, fields)
    elif "kind" in fields:
        _refuse_notice(ctx, REJECTED_NOTICE, "a notice of an unknown kind")
    else:
        await _handle_offer_notice(ctx, fields)


def _refuse_notice(ctx: ServiceContext, reason: str, what: str) -> None:
    ctx.metrics.rejected_inputs.labels(reason).inc()
    logger.warning("ignored %s on %s", what, OFFER_CHANNEL)


async def _handle_offer_notice(ctx: ServiceContext, fields: dict[str, Any]) -> None:
    """Deliver the offer another instance published for a channel this one holds."""
    instance, team_id = fields.get("instance"), fields.get("team_id")
    session_id = fields.get("session_id")
    if not (isinstance(instance, str) and isinstance(team_id, str) and isinstance(session_id, str)):
        _refuse_notice(ctx, REJECTED_OFFER_NOTICE, "a malformed session offer notice")
        return
    if instance != ctx.instance_id:
        return
    try:
        delivered = await deliver_here(ctx, team_id, session_id)
        if delivered in (OfferDelivery.OPERATOR_DISABLED, OfferDelivery.AGENT_REMOVED):
            session = await ctx.store.get_session(team_id, session_id)
            if session is not None:
                await refuse_undeliverable_offer(ctx, session, delivered)
        elif delivered is OfferDelivery.NOT_SENT:
            session = await ctx.store.get_session(team_id, session_id)
            if session is not None:
                await ctx.store.update_session_state(
                    team_id, session.agent_id, session_id, SessionState.REFUSED,
                    OFFER_NOT_DELIVERED, ctx.now(), from_states=(SessionState.OFFERED,),
                )  # fmt: skip
    except (StoreError, ServiceError) as error:
        logger.warning("delivering a session offer failed: %s", type(error).__name__)


async def _handle_superseded_notice(ctx: ServiceContext, fields: dict[str, Any]) -> None:
    """Close this instance's channel another instance reports superseded (see the docstring)."""
    instance, team_id = fields.get("instance"), fields.get("team_id")
    agent_id, connection_id = fields.get("agent_id"), fields.get("connection_id")
    if not (
        isinstance(instance, str) and isinstance(team_id, str)
        and isinstance(agent_id, str) and isinstance(connection_id, str)
    ):  # fmt: skip
        _refuse_notice(ctx, REJECTED_SUPERSEDED_NOTICE, "a malformed connection superseded notice")
        return
    connections = ctx.connections
    if instance != ctx.instance_id or connections is None:
        return
    try:
        await connections.supersede_on_notice(team_id, agent_id, connection_id)
    except StoreError as error:
        # The channel stays until its next heartbeat finds its row gone.
        logger.warning("checking a superseded connection failed: %s", type(error).__name__)


async def _handle_operator_disabled_notice(ctx: ServiceContext, fields: dict[str, Any]) -> None:
    """End this instance's share of a disabled operator's sessions (see the docstring)."""
    origin, team_id = fields.get("origin"), fields.get("team_id")
    operator_id = fields.get("operator_id")
    if not (isinstance(origin, str) and isinstance(team_id, str) and isinstance(operator_id, str)):
        _refuse_notice(
            ctx, REJECTED_OPERATOR_DISABLED_NOTICE, "a malformed operator disabled notice"
        )
        return
    if origin == ctx.instance_id:
        return  # the disabling instance told its own agents already
    try:
        told = await end_disabled_operator_sessions_here(ctx, team_id, operator_id)
    except StoreError as error:
        # The agents end them at their next live_sessions report instead.
        logger.warning("ending a disabled operator's sessions failed: %s", type(error).__name__)
        return
    if told:
        logger.info("operator %s disabled on another instance: asked agents here to end %d "
                    "session(s)", operator_id, told)  # fmt: skip


def _handle_keys_rotated_notice(
    ctx: ServiceContext, fields: dict[str, Any], reloads: KeyReloads
) -> None:
    """Reload the service keys after a ``keys rotate`` anywhere (see the docstring)."""
    role = fields.get("role")
    if role not in KEY_ROLES:
        # Only a known role: it is written into the reload's log lines.
        _refuse_notice(ctx, REJECTED_KEYS_ROTATED_NOTICE, "a malformed service keys notice")
        return
    reloads.request(str(role))


async def _handle_sessions_ended_notice(ctx: ServiceContext, fields: dict[str, Any]) -> None:
    """Send ``end_sessions`` down this instance's channel of the agent for the sessions another
    instance ended (see the docstring): only those the store shows ended with that reason."""
    origin, team_id, agent_id = fields.get("origin"), fields.get("team_id"), fields.get("agent_id")
    reason, ids = fields.get("reason"), fields.get("ids")
    if not (
        isinstance(origin, str) and isinstance(team_id, str) and isinstance(agent_id, str)
        and reason in ENDED_BY_RENDEZVOUS_REASONS and isinstance(ids, list)
        and 0 < len(ids) <= MAX_END_SESSION_IDS and all(isinstance(i, str) for i in ids)
    ):  # fmt: skip
        _refuse_notice(ctx, REJECTED_SESSIONS_ENDED_NOTICE, "a malformed sessions ended notice")
        return
    connections = ctx.connections
    if origin == ctx.instance_id or connections is None:
        return
    if not connections.channels(team_id, agent_id):
        return  # another instance's channel, or none
    try:
        # One query for all the ids (as the agent's live_sessions report does).
        shown = await ctx.store.ended_sessions_among(team_id, agent_id, ids, [str(reason)])
        shown_ids = {session.id for session in shown}
        confirmed = [i for i in dict.fromkeys(ids) if i in shown_ids]
    except StoreError as error:
        logger.warning("checking ended sessions failed: %s", type(error).__name__)
        return
    if confirmed and await connections.send(
        team_id, agent_id, end_sessions_message(confirmed, str(reason))
    ):
        logger.info("sessions ended on another instance (%s): asked agent %s here to end %d",
                    reason, agent_id, len(confirmed))  # fmt: skip
