"""The agent control channel: WebSocket ``/v1/agents/connect``, a signed challenge, heartbeats.

Wire protocol (JSON text messages, each at most MAX_MESSAGE_BYTES):

1. server -> ``{"type": "challenge", "challenge", "audience", "heartbeat_seconds"}``
2. agent -> ``{"type": "auth", "envelope": <signed payload, Purpose.AGENT_AUTH, fields
   agent_id, public_key, challenge, audience, machine_fingerprint, and optionally replaces>}``;
   ``replaces`` is the ``connection_id`` of the last connection this agent was welcomed on,
   kept across restarts in its state dir (absent on its first connection).
3. server -> ``{"type": "welcome", "agent_id", "connection_id", "features"}`` or closes with a
   reason; ``features`` lists the optional messages this server understands (WELCOME_FEATURES)
4. agent -> ``{"type": "heartbeat"}`` at least every heartbeat period; server ->
   ``{"type": "heartbeat_ack"}``. Silence past the heartbeat timeout closes the channel, and so
   does a heartbeat on a connection that is no longer recorded (superseded, see below).
5. server -> ``{"type": "session_offer", …}`` (docs/sessions.md §3); agent ->
   ``{"type": "session_offer_ack", "session_id"}`` or
   ``{"type": "session_offer_refused", "session_id", "reason"}``.
5a. server -> ``{"type": "policy_bundle", "bundle"}`` right after ``welcome`` (the team's newest
   bundle, if any) and whenever a new one is stored (docs/sessions.md §6); agent ->
   ``{"type": "policy_applied", "version"}`` (stored as the agent's policy version) or
   ``{"type": "policy_refused", "version", "reason"}`` (audited ``policy.refused``).
6. agent -> ``{"type": "audit_event", "event": <SignedEvent.to_json()>, "id"?}``: verified
   against the agent's registered key and appended to its team's log; server ->
   ``{"type": "audit_event_ack", "id"}`` once durable, or
   ``{"type": "audit_event_refused", "id", "reason"}`` (never storable; also an event of an
   agent removed since its channel was welcomed, e.g. on another instance, unless both the
   event's date and the server's time are within audit/trust.py REMOVED_AGENT_CLOCK_SKEW after
   the removal; a removed agent's channel is closed right after a refusal), or
   ``{"type": "audit_event_failed", "id", "reason"}`` (not stored now; send it again later).
   ``id`` echoes the agent's, if any. An agent-signed ``session.ended`` also moves the session
   row to ended with the event's reason, exit code and signal, and ``session.refused`` to
   refused with the agent's reason (from offered or accepted).
7. agent -> ``{"type": "live_sessions", "ids": [...]}`` (at most MAX_LIVE_SESSION_IDS), after
   a welcome listing ``live_sessions`` in its ``features``: the sessions the agent process
   runs now. This agent's offered or accepted sessions that are not listed end as
   ``agent_lost`` (an offer never answered: ``offer_undelivered``; audited ``session.ended`` by
   the rendezvous): a restarted agent process can
   never continue its predecessor's sessions. Spared: sessions created after the report
   arrived, offers sent down this very channel (they may have crossed the report on the wire),
   and offers not yet expired (they may be in flight elsewhere; they expire on their own).
   The listed sessions of operators disabled since are ended as in 8: an agent whose channel
   was down when its operator was disabled ends them once it is back.
8. server -> ``{"type": "end_sessions", "ids": [...], "reason": "operator_disabled"}`` (at most
   rendezvous/offer_bus.py MAX_END_SESSION_IDS ids) after an admin disabled the operator of
   those sessions (rendezvous/routes_operators.py): the agent ends each one it runs at once and
   signs its ``session.ended`` with that reason, which the session row then shows. The reason
   is ``ended_by_admin`` after ``POST /v1/sessions/{id}/end`` and ``agent_removed`` before a
   removal closes the channel; those rows are ended by the rendezvous first (offer_bus.py
   ``end_open_sessions``), and a ``live_sessions`` report that still lists one of them (the
   channel was down) is answered with ``end_sessions`` again.
9. server -> ``{"type": "service_keys", "keys": [JWK…], "rotations": [statement…]}`` right
   after ``welcome``, before the policy bundle, once any service key was ever rotated
   (``keys rotate``), and on every channel this instance holds after a reload (SIGHUP) changed
   the keys: the current service keys and the rotation statements agents can still need
   (rendezvous/service_keys.py ``rotation_statements``), each signed by the key it retires
   (rendezvous/key_rotation.py). The agent follows the chain from the keys it pinned and
   refuses (logs) a statement that does not chain.

One identity live twice, or presenting another machine fingerprint than it registered with, is
flagged as a clone anomaly (audit record and metric). A reconnect is not a clone: when the
network drops silently (sleep, NAT timeout) or an instance is killed, the old connection stays
recorded for up to the heartbeat timeout, so the agent names it in its signed ``replaces`` and
the store removes it in the same transaction that records the new one (only if it is this
agent's, in this team, from the same machine fingerprint). A connection that is still recorded
and not named is reported as before. The instance holding a superseded channel closes it at
once: this one directly, another one on a ``connection_superseded`` notice (PostgreSQL; see
rendezvous/offer_bus.py). Should the notice be lost, the holder finds out at that channel's next
heartbeat (a half-open one at its timeout).
A clone resumed from a memory snapshot may name the original's live connection; the original
is then closed, reconnects naming its own id, finds the clone's connection unnamed: flagged.

An agent an admin removed (``DELETE /v1/agents/{id}``) is refused at authentication, after its
signature checks, with close code CLOSE_AGENT_REMOVED and REMOVED_REASON, which the agent logs
before it backs off for long. Its live channels close the same way at once: this instance's
directly, another instance's on the ``connection_superseded`` notice (the removal forgot their
rows), and, should a notice be lost, at that channel's next message: a heartbeat or an audit
event looks the agent up each time, any other message at most every REMOVAL_CHECK_SECONDS (an
agent that skips its heartbeats is not kept on by its other messages).

``AgentConnections`` keeps this instance's live channels so session offers and policy bundles
can ``send`` to an agent (its newest channel first).
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from audit.actions import Action as AuditAction
from audit.errors import RecordError
from audit.record import SignedEvent
from audit.trust import REMOVED_AGENT_CLOCK_SKEW
from protocol.domains import Purpose
from protocol.errors import ProtocolError
from protocol.identity import PublicIdentity, b64url_decode
from protocol.signed_payload import unverified_fields
from rendezvous.audit_trail import Action, agent_actor, service_actor
from rendezvous.credentials import new_challenge
from rendezvous.error_responses import store_failure_reason
from rendezvous.errors import ServiceError
from rendezvous.key_rotation import service_keys_message
from rendezvous.offer_bus import (
    ENDED_BY_RENDEZVOUS_REASONS,
    MAX_END_SESSION_IDS,
    OFFER_UNDELIVERED,
    OPERATOR_DISABLED_REASON,
    announce_superseded,
    end_sessions_message,
)
from rendezvous.policy_distribution import policy_message
from rendezvous.store import NotFound, SessionState, StoreError
from rendezvous.store.base import SessionQuery

if TYPE_CHECKING:
    from rendezvous.context import ServiceContext
    from rendezvous.store import Agent, AgentConnection, Session

logger = logging.getLogger("tucdesk.rendezvous.control")

router = APIRouter(tags=["agents"])

MAX_MESSAGE_BYTES = 16 * 1024
AUTH_TIMEOUT_SECONDS = 10.0
OUTGOING_QUEUE_SIZE = 32
SEND_TIMEOUT_SECONDS = 10.0
CLOSE_POLICY_VIOLATION = 1008
CLOSE_GOING_AWAY = 1001
# "Try again later": the rendezvous's store failed; the agent's daemon reconnects with backoff.
CLOSE_TRY_AGAIN_LATER = 1013
STORE_UNAVAILABLE_REASON = "the rendezvous's database is unavailable; retrying"
# A private close code (4000-4999) for a removed agent: it tells the agent's daemon to stop
# retrying in a loop (agent/control_client.py has the same number).
CLOSE_AGENT_REMOVED = 4403
REMOVED_REASON = (
    "this agent was removed from its team by an admin; re-enroll with a new registration key"
)
# The refusal of an event an agent signs after its removal (the agent drops it, as every
# refused event, and its channel is then closed with REMOVED_REASON).
AGENT_REMOVED_EVENT_REASON = (
    "this agent was removed from its team: the audit log takes no more events signed by its key"
)
# How often a message other than a heartbeat or an audit event (which look the agent up each
# time) makes its channel check that the agent was not removed meanwhile (another instance).
REMOVAL_CHECK_SECONDS = 10.0
MAX_SESSION_ID_LENGTH = 128
MAX_REFUSAL_REASON_LENGTH = 512
MAX_EVENT_ID_LENGTH = 64
MAX_POLICY_VERSION = 2**53 - 1
# What the rendezvous issues as connection ids; ``replaces`` must have this shape.
CONNECTION_ID_PREFIX = "conn_"
CONNECTION_ID_RANDOM_BYTES = 12
CONNECTION_ID_PATTERN = re.compile(r"conn_[0-9a-f]{24}")  # the prefix, then 12 bytes in hex
SUPERSEDED_REASON = "replaced by a newer connection of this agent"
# What an agent may sign into its team's log: what it saw of the sessions offered to it.
AGENT_SIGNED_ACTIONS = frozenset(
    {
        AuditAction.SESSION_STARTED,
        AuditAction.SESSION_COMMAND,
        AuditAction.SESSION_ENDED,
        AuditAction.SESSION_REFUSED,
    }
)
# What the welcome says this rendezvous understands beyond the base protocol.
WELCOME_FEATURES = ("live_sessions",)
# The rejected_inputs reason for a message that closed an authenticated control channel.
REJECTED_CHANNEL_MESSAGE = "agent_channel_message"
# A live_sessions report lists at most this many ids (agent/control_client.py sends no report
# rather than a longer one); one report ends at most MAX_LOST_SESSIONS_PER_REPORT sessions (the
# rest at the next report).
MAX_LIVE_SESSION_IDS = 256
MAX_LOST_SESSIONS_PER_REPORT = 500
# Offers sent down one channel that a report on it never ends, remembered per channel.
MAX_TRACKED_OFFERS = 1024
# Offers sent down any channel of an agent here, remembered beyond that channel's life (at most
# this many on the instance, oldest forgotten first) until OFFER_MEMORY_GRACE_SECONDS past the
# offer's expiry: the agent may hold an offer whose ack was lost with its channel, and it must
# not be offered again on the agent's next channel (a catch-up after an outage).
MAX_REMEMBERED_OFFERS = 50_000
OFFER_MEMORY_GRACE_SECONDS = 60.0
# Session ids an end_sessions carried down one channel, remembered (oldest forgotten first) so
# the periodic sweep of disabled operators' sessions tells each channel of each one once.
MAX_TRACKED_ENDS = 4096
AGENT_LOST = "agent_lost"
# A session whose agent has had no control connection for this long is ended as agent_lost by
# the periodic sweep (end_sessions_of_absent_agents), so the session list does not show it open
# for ever when its agent never comes back; an agent that does come back reports its live
# sessions anyway.
ABSENT_AGENT_SECONDS = 3600.0
MAX_ABSENT_SESSIONS_PER_SWEEP = 500
# What of an agent-signed session.ended the session row keeps, so `tucdesk sessions show` says
# why it ended: the reason ("normal", "operator-disconnected", "operator_disabled"…, cut to
# MAX_REFUSAL_REASON_LENGTH) and the exit code (0..255) or the signal's name ("TERM"). A value
# of another shape is not kept (the signed event in the log still has it).
MAX_EXIT_CODE = 255
EXIT_SIGNAL_PATTERN = re.compile(r"[A-Z0-9+]{1,16}")
# Outcomes of tucdesk_agent_audit_events_total.
AGENT_EVENT_STORED = "stored"
AGENT_EVENT_ALREADY_HELD = "already_held"


class ChannelRefused(Exception):
    """The agent failed to authenticate or broke the protocol; the message says how."""


class ConnectionSuperseded(ChannelRefused):
    """The channel's connection is no longer recorded: the agent reconnected naming it."""


class AgentRemoved(ChannelRefused):
    """An admin removed the agent: its key may never hold a channel again."""


@dataclass(frozen=True)
class AgentAuthentication:
    """What a verified auth answer established about the connecting agent."""

    agent: Agent
    machine_fingerprint: str
    replaces: str | None  # the agent's earlier connection id it names as dead, if any


@dataclass
class LiveChannel:
    """One authenticated control channel on this instance."""

    connection_id: str
    agent_id: str
    team_id: str
    outgoing: trio.MemorySendChannel[dict[str, Any]]
    closed: trio.Event = field(default_factory=trio.Event)
    superseded: bool = False  # ended because the agent reconnected naming this connection
    removed: bool = False  # ended because an admin removed the agent
    # When (trio.current_time()) the store last showed the agent not removed (its welcome).
    removal_checked_at: float = 0.0
    # Sessions offered down this channel (newest last, bounded): the agent may not have had
    # them yet when it sent its live_sessions report, so the report never ends them.
    offered: OrderedDict[str, None] = field(default_factory=OrderedDict)
    # Sessions an end_sessions named down this channel (newest last, bounded).
    ended: OrderedDict[str, None] = field(default_factory=OrderedDict)
    # The agent's address as this instance sees it (HOST:PORT), for the clone-anomaly warning.
    peer: str = "unknown"

    def note_offer(self, session_id: str) -> None:
        """Remember that ``session_id`` was offered down this channel."""
        self.offered[session_id] = None
        while len(self.offered) > MAX_TRACKED_OFFERS:
            self.offered.popitem(last=False)

    def note_ends(self, session_ids: list[str]) -> None:
        """Remember that an ``end_sessions`` for ``session_ids`` went down this channel."""
        for session_id in session_ids:
            self.ended[session_id] = None
            self.ended.move_to_end(session_id)
        while len(self.ended) > MAX_TRACKED_ENDS:
            self.ended.popitem(last=False)


class AgentConnections:
    """This instance's live agent channels, by agent id."""

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._by_agent: dict[str, dict[str, LiveChannel]] = {}
        # (team id, agent id, session id) -> the offer's expiry, oldest sent first.
        self._offers_sent: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        # Where the periodic sweep of disabled operators' sessions goes on from next time
        # (rendezvous/offer_bus.py), when the last one stopped at its bound; None: the start.
        self.disabled_sweep_resume_after: tuple[str, str] | None = None

    def __len__(self) -> int:
        return sum(len(channels) for channels in self._by_agent.values())

    def channels(self, team_id: str, agent_id: str) -> list[LiveChannel]:
        """The live channels of one agent of ``team_id`` held by this instance."""
        return [c for c in self._by_agent.get(agent_id, {}).values() if c.team_id == team_id]

    async def send(self, team_id: str, agent_id: str, message: dict[str, Any]) -> bool:
        """Queue ``message`` to one live channel of the agent; False if none is live here.

        The newest channel goes first: an older one may be half-open (the agent reconnected).
        """
        return self.send_now(team_id, agent_id, message)

    def send_now(self, team_id: str, agent_id: str, message: dict[str, Any]) -> bool:
        """``send`` without yielding: a check made just before it still holds when it queues."""
        for channel in reversed(self.channels(team_id, agent_id)):
            try:
                channel.outgoing.send_nowait(message)
                if message.get("type") == "session_offer":
                    # Only once queued (an offer no channel took was not sent: a catch-up or the
                    # next notice must still send it), and with no await since: the report that
                    # must spare it may come at once.
                    channel.note_offer(str(message.get("session_id")))
                    self._remember_offer(team_id, agent_id, message)
                if message.get("type") == "end_sessions":
                    channel.note_ends([str(session_id) for session_id in message["ids"]])
                return True
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                continue
        return False

    def not_yet_ended(self, team_id: str, agent_id: str, session_ids: list[str]) -> list[str]:
        """Those of ``session_ids`` no ``end_sessions`` has named down the agent's newest live
        channel here (the one ``send`` tries first); all of them if it has none."""
        channels = self.channels(team_id, agent_id)
        if not channels:
            return list(session_ids)
        ended = channels[-1].ended
        return [session_id for session_id in session_ids if session_id not in ended]

    def send_to_every_channel(self, message: dict[str, Any]) -> int:
        """Queue ``message`` to every live channel held here (a service keys reload); how many
        took it. A channel whose queue is full gets it at its next reconnect."""
        sent = 0
        for channels in self._by_agent.values():
            for channel in channels.values():
                try:
                    channel.outgoing.send_nowait(message)
                    sent += 1
                except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                    continue
        return sent

    def agents_of_team(self, team_id: str) -> list[str]:
        """The ids of the team's agents with a live channel on this instance."""
        return [
            agent_id
            for agent_id, channels in self._by_agent.items()
            if any(channel.team_id == team_id for channel in channels.values())
        ]

    def held_agents(self) -> list[tuple[str, str]]:
        """The (team id, agent id) of every agent with a live channel on this instance."""
        return sorted(
            {(channel.team_id, channel.agent_id)
             for channels in self._by_agent.values() for channel in channels.values()}
        )  # fmt: skip

    def was_offered(self, team_id: str, agent_id: str, session_id: str) -> bool:
        """Whether ``session_id`` was already offered down a channel of the agent here, live or
        closed since (a catch-up after the offer bus was down must not offer it twice)."""
        expires_at = self._offers_sent.get((team_id, agent_id, session_id))
        if expires_at is not None and self._ctx.now() <= expires_at + OFFER_MEMORY_GRACE_SECONDS:
            return True
        return any(session_id in channel.offered for channel in self.channels(team_id, agent_id))

    def _remember_offer(self, team_id: str, agent_id: str, offer: dict[str, Any]) -> None:
        expires_at = offer.get("expires_at")
        key = (team_id, agent_id, str(offer.get("session_id")))
        self._offers_sent[key] = float(expires_at) if isinstance(expires_at, int) else 0.0
        self._offers_sent.move_to_end(key)
        now = self._ctx.now()
        while self._offers_sent and (
            len(self._offers_sent) > MAX_REMEMBERED_OFFERS
            or next(iter(self._offers_sent.values())) + OFFER_MEMORY_GRACE_SECONDS < now
        ):
            self._offers_sent.popitem(last=False)

    def supersede(
        self, team_id: str, agent_id: str, connection_id: str, *, removed: bool = False
    ) -> bool:
        """End this instance's channel ``connection_id`` of the agent, if held: its agent
        reconnected naming it (or, ``removed``, an admin removed the agent). Its holder then
        closes the WebSocket and audits why."""
        channel = self._by_agent.get(agent_id, {}).get(connection_id)
        if channel is None or channel.team_id != team_id:
            return False
        if removed:
            channel.removed = True
        else:
            channel.superseded = True
        self._remove(channel)
        # The send loop ends on the closed queue and cancels the channel's tasks.
        channel.outgoing.close()
        return True

    def end_removed(self, team_id: str, agent_id: str) -> int:
        """End every channel this instance holds for an agent an admin removed; how many."""
        channels = self.channels(team_id, agent_id)
        for channel in channels:
            self.supersede(team_id, agent_id, channel.connection_id, removed=True)
        return len(channels)

    async def supersede_on_notice(self, team_id: str, agent_id: str, connection_id: str) -> bool:
        """End channel ``connection_id`` of the agent, if held here, that another instance
        announced superseded; only once the store confirms the connection is no longer recorded
        (a notice is a hint, the row is the truth)."""
        if not CONNECTION_ID_PATTERN.fullmatch(connection_id):
            logger.warning("ignored a superseded notice naming a malformed connection id")
            return False
        channel = self._by_agent.get(agent_id, {}).get(connection_id)
        if channel is None or channel.team_id != team_id:
            return False  # already gone, or never this team's agent's channel
        recorded = await self._ctx.store.list_agent_connections(team_id, agent_id)
        if any(connection.connection_id == connection_id for connection in recorded):
            logger.warning("ignored a superseded notice for connection %s, still recorded",
                           connection_id)  # fmt: skip
            return False
        # A removal forgets the rows too and announces them the same way.
        removed = await self._ctx.store.get_agent(team_id, agent_id) is None
        logger.info("closing connection %s of agent %s: %s on another instance",
                    connection_id, agent_id, "removed" if removed else "superseded")  # fmt: skip
        return self.supersede(team_id, agent_id, connection_id, removed=removed)

    def _add(self, channel: LiveChannel) -> None:
        self._by_agent.setdefault(channel.agent_id, {})[channel.connection_id] = channel
        self._ctx.metrics.connected_agents.set(len(self))

    def _remove(self, channel: LiveChannel) -> None:
        channels = self._by_agent.get(channel.agent_id, {})
        channels.pop(channel.connection_id, None)
        if not channels:
            self._by_agent.pop(channel.agent_id, None)
        self._ctx.metrics.connected_agents.set(len(self))


@router.websocket("/agents/connect")
async def agent_connect(websocket: WebSocket) -> None:
    """Authenticate an agent by signed challenge, then hold its control channel."""
    ctx: ServiceContext = websocket.app.state.context
    connections = ctx.connections
    assert connections is not None
    await websocket.accept()
    try:
        with trio.fail_after(AUTH_TIMEOUT_SECONDS):
            authentication = await _authenticate(ctx, websocket)
    except AgentRemoved as refusal:
        ctx.metrics.auth_failures.labels("agent_removed").inc()
        await _close(websocket, CLOSE_AGENT_REMOVED, str(refusal))
        return
    except ChannelRefused as refusal:
        ctx.metrics.auth_failures.labels("agent_channel").inc()
        await _close(websocket, CLOSE_POLICY_VIOLATION, str(refusal))
        return
    except (WebSocketDisconnect, trio.TooSlowError):
        await _close(websocket, CLOSE_POLICY_VIOLATION, "authentication timed out")
        return
    except StoreError as error:
        # Accepted already: raised on, it would reach Hypercorn as a traceback, the agent none
        # the wiser.
        await _close_for_store_failure(ctx, websocket, "an agent's authentication", error)
        return
    await _hold(ctx, connections, websocket, authentication)


async def _authenticate(ctx: ServiceContext, websocket: WebSocket) -> AgentAuthentication:
    challenge = new_challenge()
    await websocket.send_json(
        {
            "type": "challenge",
            "challenge": challenge,
            "audience": ctx.config.issuer,
            "heartbeat_seconds": ctx.config.heartbeat_seconds,
        }
    )
    message = await _receive(websocket)
    if message.get("type") != "auth" or not isinstance(message.get("envelope"), dict):
        raise ChannelRefused("expected an auth message with a signed envelope")
    envelope = message["envelope"]
    try:
        claimed = unverified_fields(envelope)
        key_text = claimed.get("public_key")
        if not isinstance(key_text, str):
            raise ChannelRefused("auth payload lacks public_key")
        claimed_key = PublicIdentity(b64url_decode(key_text, max_size=64))
    except ProtocolError as error:
        raise ChannelRefused(f"auth payload is malformed: {error}") from None
    agent = await ctx.store.get_agent_by_public_key(claimed_key.raw)
    if agent is None:
        raise ChannelRefused("this agent key is not registered; enroll the agent first")
    try:
        verified = await ctx.signed_payloads.verify(
            ctx, envelope, Purpose.AGENT_AUTH, PublicIdentity(agent.public_key)
        )
    except ProtocolError as error:
        raise ChannelRefused(f"auth refused: {error}") from None
    fields = verified.fields
    if fields.get("challenge") != challenge or fields.get("audience") != ctx.config.issuer:
        raise ChannelRefused("auth answers another challenge")
    if fields.get("agent_id") != agent.id:
        raise ChannelRefused("auth names another agent")
    if agent.is_removed():
        # Said only to the key's holder (the signature checked): a lost host learns it is cut off.
        logger.warning("refused the control channel of removed agent %s", agent.id)
        raise AgentRemoved(REMOVED_REASON)
    machine = fields.get("machine_fingerprint")
    if not isinstance(machine, str) or not machine or len(machine) > 256:
        raise ChannelRefused("auth lacks a machine fingerprint")
    replaces = fields.get("replaces")
    if "replaces" in fields and (
        not isinstance(replaces, str) or not CONNECTION_ID_PATTERN.fullmatch(replaces)
    ):
        raise ChannelRefused(
            "auth's replaces must be the connection_id of an earlier welcome "
            f"({CONNECTION_ID_PREFIX} and {2 * CONNECTION_ID_RANDOM_BYTES} hex digits)"
        )
    return AgentAuthentication(agent, machine, replaces)


async def _hold(
    ctx: ServiceContext,
    connections: AgentConnections,
    websocket: WebSocket,
    authentication: AgentAuthentication,
) -> None:
    agent, machine = authentication.agent, authentication.machine_fingerprint
    connection_id = CONNECTION_ID_PREFIX + secrets.token_hex(CONNECTION_ID_RANDOM_BYTES)
    now = ctx.now()
    actor = agent_actor(agent.id, agent.hostname)
    connected: dict[str, Any] = {"connection_id": connection_id, "instance": ctx.instance_id}
    if authentication.replaces is not None:
        connected["replaces"] = authentication.replaces
    send_channel, receive_channel = trio.open_memory_channel[dict[str, Any]](OUTGOING_QUEUE_SIZE)
    channel = LiveChannel(connection_id, agent.id, agent.team_id, send_channel)
    channel.peer = _peer(websocket)
    channel.removal_checked_at = trio.current_time()  # authenticated just now: not removed
    try:
        await ctx.audit.record(
            agent.team_id,
            actor=actor,
            action=Action.AGENT_CONNECTED,
            target=agent.id,
            details=connected,
        )
        report = await ctx.store.mark_agent_connected(
            agent.team_id, agent.id, ctx.instance_id, connection_id, machine, now,
            replaces=authentication.replaces,
        )  # fmt: skip
        # Held here before any further await: a removal landing once the row exists must find
        # this channel to close it, or the agent would stay connected until its next heartbeat.
        connections._add(channel)
        superseded = report.superseded
        if superseded is not None:
            logger.info(
                "agent %s reconnected: connection %s replaces %s (instance %s)",
                agent.id, connection_id, superseded.connection_id, superseded.instance_id,
            )  # fmt: skip
            if superseded.instance_id == ctx.instance_id:
                connections.supersede(agent.team_id, agent.id, superseded.connection_id)
            else:
                await announce_superseded(ctx, superseded)
        if report.clone_suspected:
            kinds = []
            if report.fingerprint_mismatch:
                kinds.append("machine_fingerprint")
            if report.other_connections:
                kinds.append("concurrent_connection")
            for kind in kinds:
                ctx.metrics.clone_anomalies.labels(kind).inc()
            # Logged too, not only audited: an admin reading this log sees both copies.
            live_here = {c.connection_id: c for c in connections.channels(agent.team_id, agent.id)}
            others = [
                f"{other.connection_id} from "
                + (
                    live_here[other.connection_id].peer
                    if other.connection_id in live_here
                    else f"an address known to instance {other.instance_id}"
                )
                for other in report.other_connections
            ]
            logger.warning(
                "clone anomaly (%s): agent %s of team %s connected as %s from %s with machine "
                "fingerprint %s (registered %s)%s; a cloned VM or copied state? sessions go to "
                "one copy only: re-enroll the clone (tucdesk-agent enroll --force)",
                ", ".join(kinds), agent.id, agent.team_id, connection_id, channel.peer,
                report.presented_fingerprint[:16], report.registered_fingerprint[:16],
                f"; also live: {'; '.join(others)}" if others else "",
            )  # fmt: skip
            await ctx.audit.record(
                agent.team_id,
                actor=actor,
                action=Action.AGENT_CLONE_ANOMALY,
                target=agent.id,
                details={
                    "kinds": kinds,
                    "registered_fingerprint": report.registered_fingerprint,
                    "presented_fingerprint": report.presented_fingerprint,
                    "other_connections": [c.connection_id for c in report.other_connections],
                },
            )
    except BaseException as error:
        connections._remove(channel)
        send_channel.close()
        if isinstance(error, ServiceError):
            await _close(websocket, CLOSE_GOING_AWAY, error.message)
            return
        if isinstance(error, NotFound):
            # Removed between its authentication and now: the row refuses the connection.
            ctx.metrics.auth_failures.labels("agent_removed").inc()
            await _close(websocket, CLOSE_AGENT_REMOVED, REMOVED_REASON)
            return
        if isinstance(error, StoreError):
            await _close_for_store_failure(ctx, websocket, f"the connect of {agent.id}", error)
            return
        raise
    store_failure: StoreError | None = None
    try:
        with trio.fail_after(SEND_TIMEOUT_SECONDS):
            await websocket.send_json(
                {
                    "type": "welcome",
                    "agent_id": agent.id,
                    "connection_id": connection_id,
                    "features": list(WELCOME_FEATURES),
                }
            )
            if ctx.keys.retired:  # only once a key was rotated: nothing to follow before
                await websocket.send_json(service_keys_message(ctx.keys))
            latest = await ctx.store.latest_policy_bundle(agent.team_id)
            if latest is not None:
                await websocket.send_json(policy_message(latest))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_loop, websocket, receive_channel, nursery.cancel_scope)
            try:
                await _receive_loop(ctx, websocket, channel, agent)
            except (WebSocketDisconnect, ChannelRefused, trio.TooSlowError) as ending:
                logger.info("control channel of %s ended: %s", agent.id, type(ending).__name__)
                if isinstance(ending, ChannelRefused) and not isinstance(
                    ending, ConnectionSuperseded | AgentRemoved
                ):
                    # A malformed, oversized or unexpected message closed the channel.
                    ctx.metrics.rejected_inputs.labels(REJECTED_CHANNEL_MESSAGE).inc()
            except StoreError as error:
                # Caught here, inside the nursery: raised out of it, it would leave wrapped in
                # an exception group that reaches Hypercorn as a traceback and an HTTP 503
                # attempted on the accepted WebSocket; closed 1013 below instead.
                store_failure = error
            nursery.cancel_scope.cancel()
    except WebSocketDisconnect:
        pass
    except StoreError as error:
        store_failure = error
    finally:
        connections._remove(channel)
        send_channel.close()
        disconnected: dict[str, Any] = {"connection_id": connection_id}
        if channel.removed:
            disconnected["reason"] = "removed"
        elif channel.superseded:
            disconnected["reason"] = "superseded"
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            # Harmless when superseded: the row is gone and last-seen only moves forward.
            try:
                await ctx.store.mark_agent_disconnected(
                    agent.team_id, agent.id, connection_id, ctx.now()
                )
            except StoreError as error:
                store_failure = store_failure or error
            try:
                await ctx.audit.record(
                    agent.team_id,
                    actor=actor,
                    action=Action.AGENT_DISCONNECTED,
                    target=agent.id,
                    details=disconnected,
                )
            except ServiceError:
                logger.error("could not audit the disconnection of %s", agent.id)
            if channel.removed:
                await _close(websocket, CLOSE_AGENT_REMOVED, REMOVED_REASON)
            elif store_failure is not None:
                await _close_for_store_failure(
                    ctx, websocket, f"the control channel of {agent.id}", store_failure
                )
            else:
                await _close(
                    websocket,
                    CLOSE_GOING_AWAY,
                    SUPERSEDED_REASON if channel.superseded else "closing",
                )


async def close_removed_agent_channels(
    ctx: ServiceContext, agent: Agent, forgotten: list[AgentConnection]
) -> None:
    """Close the control channels of an agent just removed: this instance's at once, another
    instance's through a ``connection_superseded`` notice for each connection the removal
    forgot (its holder confirms the row is gone, sees the agent removed, and closes it)."""
    connections = ctx.connections
    closed = connections.end_removed(agent.team_id, agent.id) if connections is not None else 0
    elsewhere = [c for c in forgotten if c.instance_id != ctx.instance_id]
    for connection in elsewhere:
        await announce_superseded(ctx, connection)
    logger.info("agent %s removed: closed %d channel(s) here, announced %d elsewhere",
                agent.id, closed, len(elsewhere))  # fmt: skip


async def _receive_loop(
    ctx: ServiceContext, websocket: WebSocket, channel: LiveChannel, agent: Agent
) -> None:
    while True:
        with trio.fail_after(ctx.config.heartbeat_timeout_seconds):
            message = await _receive(websocket)
        kind = message.get("type")
        if kind == "heartbeat":
            # Only this connection's row: a killed instance's rows must go stale, not live on.
            recorded = await ctx.store.touch_agent(
                agent.team_id, agent.id, ctx.now(), channel.connection_id
            )
            if not recorded:
                # Superseded by a reconnect held elsewhere (or cleared, or the agent removed):
                # the agent must not stay on a channel nothing routes to. It reconnects and is
                # recorded again, unless it was removed.
                if await ctx.store.get_agent(agent.team_id, agent.id) is None:
                    raise _removed(channel)
                channel.superseded = True
                raise ConnectionSuperseded(SUPERSEDED_REASON)
            # A removal forgets the agent's connection rows: recorded, it is not removed.
            channel.removal_checked_at = trio.current_time()
            with trio.fail_after(SEND_TIMEOUT_SECONDS):
                await websocket.send_json({"type": "heartbeat_ack"})
            continue
        elif kind in ("session_offer_ack", "session_offer_refused"):
            try:
                await _answer_offer(ctx, agent, message)
            except (ServiceError, StoreError) as error:
                # The offer simply expires unanswered; the channel itself is fine.
                logger.warning("recording an offer answer failed: %s", type(error).__name__)
        elif kind == "audit_event":
            reply, removed = await _append_agent_event(ctx, agent, message)
            with trio.fail_after(SEND_TIMEOUT_SECONDS):
                await websocket.send_json(reply)
            if removed is not None:
                if removed and reply["type"] != "audit_event_ack":
                    # Answered first: the agent learns why its event was refused, then the
                    # channel closes.
                    raise _removed(channel)
                if not removed:
                    channel.removal_checked_at = trio.current_time()
                # A removed agent's event dated before the removal was taken: the rest it
                # spooled may follow (each checked alike); its next heartbeat, a refusal or any
                # other message (REMOVAL_CHECK_SECONDS) closes the channel.
                continue
        elif kind == "live_sessions":
            try:
                await _end_lost_sessions(ctx, agent, channel, message)
            except (ServiceError, StoreError) as error:
                # They stay open in the list until the agent's next report.
                logger.warning("ending lost sessions failed: %s", type(error).__name__)
        elif kind in ("policy_applied", "policy_refused"):
            try:
                await _record_policy_answer(ctx, agent, message)
            except (ServiceError, StoreError) as error:
                logger.warning("recording a policy answer failed: %s", type(error).__name__)
        elif kind == "close":
            return
        else:
            raise ChannelRefused(f"unexpected message type {str(kind)[:32]!r}")
        await _close_if_removed(ctx, channel, agent)


def _removed(channel: LiveChannel) -> AgentRemoved:
    """Mark ``channel`` ended because its agent was removed; the error that ends it."""
    channel.removed = True
    return AgentRemoved(REMOVED_REASON)


async def _close_if_removed(ctx: ServiceContext, channel: LiveChannel, agent: Agent) -> None:
    """Raise AgentRemoved if the agent was removed, looking at most every
    REMOVAL_CHECK_SECONDS: heartbeats are not the only messages that keep a channel open."""
    if trio.current_time() - channel.removal_checked_at < REMOVAL_CHECK_SECONDS:
        return
    try:
        current = await ctx.store.get_agent(agent.team_id, agent.id)
    except StoreError as error:
        # The next heartbeat's touch looks again (and closes the channel if the store is down).
        logger.warning("checking agent %s is not removed failed: %s", agent.id,
                       type(error).__name__)  # fmt: skip
        return
    if current is None:
        raise _removed(channel)
    channel.removal_checked_at = trio.current_time()


async def _answer_offer(ctx: ServiceContext, agent: Agent, message: dict[str, Any]) -> None:
    """Record the agent taking or refusing an offer (only its own, only while offered)."""
    session_id = message.get("session_id")
    if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_SESSION_ID_LENGTH:
        raise ChannelRefused("an offer answer must name its session_id")
    if message["type"] == "session_offer_ack":
        state, reason = SessionState.ACCEPTED, None
    else:
        raw_reason = message.get("reason")
        reason = raw_reason[:MAX_REFUSAL_REASON_LENGTH] if isinstance(raw_reason, str) else ""
        state = SessionState.REFUSED
    session = await ctx.store.get_session(agent.team_id, session_id)
    if session is None or session.agent_id != agent.id or session.state is not SessionState.OFFERED:
        logger.info("agent %s answered an offer it does not hold", agent.id)
        return
    if state is SessionState.REFUSED:
        # Audited before the refusal takes effect, like every other decision.
        await ctx.audit.record(
            agent.team_id, actor=agent_actor(agent.id, agent.hostname),
            action=Action.SESSION_REFUSED, target=agent.id, session_id=session_id,
            details={"reason": "refused_by_agent", "agent_reason": reason or ""},
        )  # fmt: skip
    await ctx.store.update_session_state(
        agent.team_id, agent.id, session_id, state, reason or None, ctx.now(),
        from_states=(SessionState.OFFERED,),
    )  # fmt: skip


async def end_sessions_of_absent_agents(ctx: ServiceContext) -> int:
    """End (``agent_lost``, audited by the service) the open sessions whose agent has had no
    control connection for ABSENT_AGENT_SECONDS; how many. Run by every instance's sweep: the
    conditional update lets one of them end each session."""
    now = ctx.now()
    absent = await ctx.store.open_sessions_of_absent_agents(
        now - ABSENT_AGENT_SECONDS, MAX_ABSENT_SESSIONS_PER_SWEEP
    )
    ended = 0
    for session in absent:
        ended += await _end_as_lost(
            ctx, session, {"absent_seconds": int(ABSENT_AGENT_SECONDS)}
        )
    return ended


async def _end_as_lost(ctx: ServiceContext, session: Session, details: dict[str, Any]) -> bool:
    """Record (first, like every other decision) and then make the ending of ``session`` as
    ``agent_lost`` by the service (``offer_undelivered`` for an offer the agent never
    answered: it never ran), if it is still in the state it was read in."""
    reason = OFFER_UNDELIVERED if session.state is SessionState.OFFERED else AGENT_LOST
    await ctx.audit.record(
        session.team_id, actor=service_actor(), action=Action.SESSION_ENDED,
        target=session.agent_id, session_id=session.id,
        details={
            "reason": reason, "state": session.state.value,
            "operator_id": session.operator_id, **details,
        },
    )  # fmt: skip
    updated = await ctx.store.update_session_state(
        session.team_id, session.agent_id, session.id, SessionState.ENDED, reason,
        ctx.now(), from_states=(session.state,),
    )  # fmt: skip
    return updated is not None


async def _end_lost_sessions(
    ctx: ServiceContext, agent: Agent, channel: LiveChannel, message: dict[str, Any]
) -> int:
    """End (``agent_lost``) the agent's open sessions its live_sessions report does not list
    and that cannot still be on their way to it; how many."""
    ids = message.get("ids")
    if (
        not isinstance(ids, list)
        or len(ids) > MAX_LIVE_SESSION_IDS
        or not all(isinstance(i, str) and 0 < len(i) <= MAX_SESSION_ID_LENGTH for i in ids)
    ):
        raise ChannelRefused(
            f"a live_sessions report must list at most {MAX_LIVE_SESSION_IDS} session ids"
        )
    reported_at = ctx.now()
    live = set(ids)
    listing = await ctx.store.session_listing(
        agent.team_id,
        SessionQuery(
            limit=MAX_LOST_SESSIONS_PER_REPORT,
            states=(SessionState.OFFERED, SessionState.ACCEPTED),
            agent_id=agent.id,
        ),
    )
    lost = [
        listed.session
        for listed in listing.sessions
        if listed.session.id not in live
        and listed.session.id not in channel.offered
        and listed.session.created_at <= reported_at
        and (
            listed.session.state is SessionState.ACCEPTED
            or listed.session.expires_at < reported_at
        )
    ]
    ended = 0
    for listed_session in lost:
        # Read again, just before the record: the listing may predate an answer since.
        session = await ctx.store.get_session(agent.team_id, listed_session.id)
        if session is None or session.state is not listed_session.state:
            continue
        ended += await _end_as_lost(ctx, session, {"connection_id": channel.connection_id})
    if lost:
        logger.info("agent %s reported %d live session(s); ended %d it lost",
                    agent.id, len(live), ended)  # fmt: skip
    running = [listed.session for listed in listing.sessions if listed.session.id in live]
    await _end_disabled_operators_sessions(ctx, agent, channel, running)
    open_ids = {listed.session.id for listed in listing.sessions}
    await _end_sessions_ended_meanwhile(ctx, agent, channel, [i for i in ids if i not in open_ids])
    return ended


async def _end_sessions_ended_meanwhile(
    ctx: ServiceContext, agent: Agent, channel: LiveChannel, reported: list[str]
) -> int:
    """Ask the agent to end the sessions it reported running that the rendezvous ended while
    its channel was down (their rows ended, ENDED_BY_RENDEZVOUS_REASONS); how many. One query
    for all of them, whatever the report lists (at most MAX_LIVE_SESSION_IDS ids)."""
    unsent = [i for i in dict.fromkeys(reported) if i not in channel.ended]  # told already
    if not unsent:
        return 0
    by_reason: dict[str, list[str]] = {}
    ended = await ctx.store.ended_sessions_among(
        agent.team_id, agent.id, unsent, sorted(ENDED_BY_RENDEZVOUS_REASONS)
    )
    for session in sorted(ended, key=lambda ended_session: ended_session.id):
        by_reason.setdefault(str(session.state_reason), []).append(session.id)
    told = 0
    for reason, ending in by_reason.items():
        for start in range(0, len(ending), MAX_END_SESSION_IDS):
            chunk = ending[start : start + MAX_END_SESSION_IDS]
            try:
                channel.outgoing.send_nowait(end_sessions_message(chunk, reason))
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                return told  # the next report asks again
            channel.note_ends(chunk)
            told += len(chunk)
    if told:
        logger.info("agent %s runs %d session(s) an admin ended; asked it to end them",
                    agent.id, told)  # fmt: skip
    return told


async def _end_disabled_operators_sessions(
    ctx: ServiceContext, agent: Agent, channel: LiveChannel, running: list[Session]
) -> int:
    """Ask the agent to end the sessions it reported running whose operator was disabled since
    (its channel was down when that happened); how many."""
    disabled: dict[str, bool] = {}
    ending = []
    for session in running:
        if session.operator_id not in disabled:
            operator = await ctx.store.get_operator(agent.team_id, session.operator_id)
            disabled[session.operator_id] = operator is None or not operator.is_active()
        if disabled[session.operator_id]:
            ending.append(session.id)
    for start in range(0, len(ending), MAX_END_SESSION_IDS):
        message = end_sessions_message(
            ending[start : start + MAX_END_SESSION_IDS], OPERATOR_DISABLED_REASON
        )
        try:
            channel.outgoing.send_nowait(message)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            break  # the next report asks again
    if ending:
        logger.info("agent %s runs %d session(s) of disabled operators; asked it to end them",
                    agent.id, len(ending))  # fmt: skip
    return len(ending)


async def _record_policy_answer(
    ctx: ServiceContext, agent: Agent, message: dict[str, Any]
) -> None:
    """Store the policy version the agent applied; audit a refusal (with its reason)."""
    version = message.get("version")
    if type(version) is not int or not 0 <= version <= MAX_POLICY_VERSION:
        raise ChannelRefused("a policy answer must carry the bundle's version")
    current = await ctx.store.get_agent(agent.team_id, agent.id)
    applied = None if current is None else current.policy_version
    if message["type"] == "policy_applied":
        await ctx.store.set_agent_policy_version(agent.team_id, agent.id, version, None)
        return
    raw_reason = message.get("reason")
    reason = raw_reason[:MAX_REFUSAL_REASON_LENGTH] if isinstance(raw_reason, str) else ""
    await ctx.audit.record(
        agent.team_id, actor=agent_actor(agent.id, agent.hostname),
        action=Action.POLICY_REFUSED, target=agent.id,
        details={"version": version, "reason": reason, "applied_version": applied},
    )  # fmt: skip
    await ctx.store.set_agent_policy_version(
        agent.team_id, agent.id, applied, reason or "refused without a reason"
    )


async def _append_agent_event(
    ctx: ServiceContext, agent: Agent, message: dict[str, Any]
) -> tuple[dict[str, Any], bool | None]:
    """Verify an agent-signed audit event and append it; the reply says whether it is durable,
    and the flag whether the agent was removed (None: not looked up, the event was malformed).

    The log holds each agent-signed event once: a resend of one it already holds (its ack was
    lost with the channel) is acknowledged again without a second record, and counted (a burst
    after a reconnect is normal; an agent replaying far more than it sends is not).
    """
    event_id = message.get("id")
    if not isinstance(event_id, str) or len(event_id) > MAX_EVENT_ID_LENGTH:
        event_id = None
    removed: bool | None = None
    try:
        signed = SignedEvent.from_json(message.get("event"))
        session_id = signed.event.session_id
        if signed.event.action not in AGENT_SIGNED_ACTIONS:
            # An allowlist: anything else (policy changes, key introductions, session decisions)
            # is the rendezvous's or an operator's to record, never an agent's.
            raise RecordError(
                f"an agent may sign only {', '.join(sorted(a.value for a in AGENT_SIGNED_ACTIONS))}"
                f" events, not {signed.event.action.value}"
            )
        if session_id is None:
            raise RecordError("a session event must name its session")
        current = await ctx.store.get_agent(agent.team_id, agent.id, include_removed=True)
        removed = current is None or current.removed_at is not None
        if current is None or not _storable_despite_removal(signed, current.removed_at, ctx.now()):
            # Removed since this channel was welcomed (on another instance, whose notice has
            # not closed it yet): its key signs nothing more into the log.
            raise RecordError(AGENT_REMOVED_EVENT_REASON)
        session = await ctx.store.get_session(agent.team_id, session_id)
        if session is None or session.agent_id != agent.id:
            raise RecordError("the event names a session this agent was not offered")
        appended = await ctx.audit.record_agent_event(
            agent.team_id, signed, agent.id, PublicIdentity(agent.public_key)
        )
    except RecordError as error:
        ctx.metrics.rejected_inputs.labels("agent_audit_event").inc()
        logger.warning("refused an audit event from agent %s", agent.id)
        refused = {"type": "audit_event_refused", "id": event_id, "reason": str(error)[:200]}
        return refused, removed
    except (ServiceError, StoreError):
        # Not stored, but not the event's fault: the agent keeps it and sends it again later.
        failed = {"type": "audit_event_failed", "id": event_id, "reason": "audit log unavailable"}
        return failed, removed
    if appended.already_held:
        ctx.metrics.agent_audit_events.labels(AGENT_EVENT_ALREADY_HELD).inc()
        # Ids only: the event's content is in the log, not for the service log.
        logger.info("agent %s resent an audit event the log holds as record %d",
                    agent.id, appended.record.seq)  # fmt: skip
    else:
        ctx.metrics.agent_audit_events.labels(AGENT_EVENT_STORED).inc()
    row_update = _row_update_for(signed)
    if row_update is not None and session_id is not None:
        # Also for a resend: the first copy may have been stored just before a crash.
        state, reason, exit_code, exit_signal = row_update
        try:
            await ctx.store.update_session_state(
                agent.team_id, agent.id, session_id, state, reason, ctx.now(),
                from_states=(SessionState.OFFERED, SessionState.ACCEPTED),
                exit_code=exit_code, exit_signal=exit_signal,
            )  # fmt: skip
        except StoreError as error:
            # The record is durable, which is what the agent needs to hear; the row lags.
            logger.warning("marking a session %s failed: %s", state.value, type(error).__name__)
    return {"type": "audit_event_ack", "id": event_id}, removed


def _storable_despite_removal(signed: SignedEvent, removed_at: float | None, now: float) -> bool:
    """Whether ``signed`` may go in although its agent may be removed (at ``removed_at``;
    None: not removed): only an event delivered late, while the server's own time is within
    REMOVED_AGENT_CLOCK_SKEW after the removal, and dated no later than that (the verifier's
    allowance). The date is the agent's to choose, so it alone bounds nothing."""
    if removed_at is None:
        return True
    allowance = REMOVED_AGENT_CLOCK_SKEW.total_seconds()
    if now > removed_at + allowance:
        return False
    removal = datetime.fromtimestamp(removed_at, UTC)
    return signed.event.occurred_at <= removal + REMOVED_AGENT_CLOCK_SKEW


def _row_update_for(
    signed: SignedEvent,
) -> tuple[SessionState, str | None, int | None, str | None] | None:
    """The session row state an agent-signed event moves its session to, if any, with its
    reason, exit code and exit signal (agent/audit_events.py ``ended``)."""
    event = signed.event
    if event.action is AuditAction.SESSION_ENDED:
        reason = event.context.get("reason")
        code = event.context.get("exit_code")
        signal = event.context.get("signal")
        return (
            SessionState.ENDED,
            reason[:MAX_REFUSAL_REASON_LENGTH] if isinstance(reason, str) and reason else None,
            code if type(code) is int and 0 <= code <= MAX_EXIT_CODE else None,
            signal if isinstance(signal, str) and EXIT_SIGNAL_PATTERN.fullmatch(signal) else None,
        )
    if event.action is AuditAction.SESSION_REFUSED:
        reason = event.policy_result.reason if event.policy_result is not None else ""
        code = event.context.get("code")
        if not reason and isinstance(code, str):
            reason = code
        reason = (reason or "refused by the agent")[:MAX_REFUSAL_REASON_LENGTH]
        return SessionState.REFUSED, reason, None, None
    return None


async def _send_loop(
    websocket: WebSocket,
    outgoing: trio.MemoryReceiveChannel[dict[str, Any]],
    scope: trio.CancelScope,
) -> None:
    try:
        async with outgoing:
            async for message in outgoing:
                with trio.fail_after(SEND_TIMEOUT_SECONDS):
                    await websocket.send_json(message)
    except (WebSocketDisconnect, trio.TooSlowError, OSError, RuntimeError):
        logger.info("control channel send failed; closing it")
    scope.cancel()


async def _receive(websocket: WebSocket) -> dict[str, Any]:
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    text = message.get("text")
    if text is None:
        raise ChannelRefused("messages must be JSON text")
    if len(text) > MAX_MESSAGE_BYTES:
        raise ChannelRefused("message is too large")
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        raise ChannelRefused("message is not JSON") from None
    if not isinstance(parsed, dict):
        raise ChannelRefused("message must be a JSON object")
    return parsed


async def _close_for_store_failure(
    ctx: ServiceContext, websocket: WebSocket, during: str, error: StoreError
) -> None:
    """Close an accepted channel the store failed: one log line with the store's reason (no
    traceback), the failure kept for ``/healthz``, and a close the agent logs and retries."""
    reason = store_failure_reason(error)
    logger.error("store error during %s: %s", during, reason)
    ctx.store_health.failed(reason, ctx.now())
    await _close(websocket, CLOSE_TRY_AGAIN_LATER, STORE_UNAVAILABLE_REASON)


def _peer(websocket: WebSocket) -> str:
    """The connection's remote HOST:PORT (behind a proxy: the proxy's), or "unknown"."""
    client = websocket.client
    return f"{client.host}:{client.port}" if client is not None else "unknown"


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    try:
        await websocket.close(code=code, reason=reason[:120])
    except Exception:  # noqa: BLE001 - the peer may already be gone; nothing left to tell it
        return
