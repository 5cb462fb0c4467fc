"""The agent's control channel to the rendezvous: a WebSocket held open for as long as it runs.

Protocol (rendezvous/control_channel.py): the server sends a challenge, the agent answers with
a signed payload (Purpose.AGENT_AUTH), the server welcomes it; then the agent sends heartbeats,
the server forwards session offers and signed policy bundles (answered ``policy_applied`` or
``policy_refused``, docs/sessions.md §6), and the agent sends offer acks and its signed audit
events.

When the channel drops (network, rendezvous restart, refusal) the client waits and reconnects:
exponential backoff with full jitter, capped, reset after a welcome. Each reconnect names the
connection it was last welcomed on (``replaces``, inside the signed answer): after a silent drop
the rendezvous may still hold that one, and without the name it would take this process for a
clone of itself. The id is also kept in the state dir (agent/connection_memory.py), so a process
restarted after a crash, a kill -9 or a host reset names the connection its predecessor held.

A close saying an admin removed this agent (code 4403) is logged as an error with the
rendezvous's reason and retried only hourly: that key will never be accepted again. Every
session this process runs then ends at once, as an ``end_sessions`` with the reason
``agent_removed`` would end it (the rendezvous asks for that before it closes the channel, but
an offer it sent just before may have raced its listing, and a channel cut elsewhere says only
the close): nothing a removed agent was offered outlives its removal.

A VM cloned from a disk snapshot carries that file too. It is still flagged, because the
rendezvous removes a named connection only if it is this agent's, in its team, from the same
machine fingerprint, and reports every other live one: a clone presenting another fingerprint
(new network cards) is flagged at once; one with the same fingerprint whose original has
reconnected since the snapshot names a connection that no longer exists and is flagged at once;
one whose original is still on the named connection supersedes it, and the original, closed as
superseded, reconnects at once naming its own (now gone) id and finds the clone's connection
live and unnamed: flagged then, a backoff step later (with several rendezvous instances, as soon
as the superseded notice arrives, at worst at the original's next heartbeat). Either way the
``agent.clone_anomaly`` record names the connection of the other copy.

Audit events produced while disconnected wait in a bounded backlog and are sent, oldest first,
once the channel is back. Each carries an id; it stays queued until the rendezvous acknowledges
it as durable (``audit_event_ack``), and events in flight when a channel drops are sent again on
the next one. Sending is at least once, but the log holds each event once: the rendezvous
identifies an event by the SHA-256 of its signed content, so a resend of one already stored (its
ack lost with the channel) is acknowledged again without a second record. Delivery into the log
is therefore effectively exactly once.

Events also survive the daemon stopping, and a full disk. Each is written to a spool in the state
dir (agent/event_spool.py, slots reserved at start) when it is queued and cleared once
acknowledged (or refused for good); a restarted daemon sends what its predecessor left there.
When the spool has no room for a new session's events (or cannot be used at all), offers are
refused with the reason (no audit, no action), logged and shown by ``tucdesk-agent status``;
running sessions go on. On a clean stop
(``run`` cancelled: SIGTERM, SIGINT) the channel is not cut at once: the client waits, at most
SHUTDOWN_DRAIN_SECONDS, for the sessions it was told about (``live_sessions``) to finish their
teardown and for every queued event to be acknowledged, then closes the WebSocket normally.
Offers arriving meanwhile are refused ("the agent is stopping"). An ``audit_event_failed``
answer (the rendezvous's store briefly unavailable) puts the events in flight back at the
front of the queue, in order; audit events then wait AUDIT_RETRY_INITIAL_SECONDS, doubling
per failure in a row up to AUDIT_RETRY_CAP_SECONDS.

After every welcome from a rendezvous that lists ``live_sessions`` in its ``features``, the
agent sends ``{"type": "live_sessions", "ids": [...]}``: the sessions this process is running
(from the offer it acknowledged to the end of the session). The rendezvous ends this agent's
earlier sessions that are not in it (a restarted process can never continue them;
docs/sessions.md §3). The report goes once the audit events queued before the welcome are
acknowledged, so a ``session.ended`` an earlier run spooled ends its session with the agent's
own account, not as lost. A process running more than MAX_REPORTED_SESSIONS sends no report
rather than an incomplete one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from trio_websocket import ConnectionClosed, ConnectionTimeout, WebSocketConnection

from agent.connection_failure import describe_connection_failure
from agent.connection_memory import is_connection_id, load_last_connection, remember_connection
from agent.enrollment import follow_key_rotations
from agent.errors import ConfigError, ControlChannelError, EnrollmentError
from agent.event_spool import EventSpool
from agent.event_spool import remedy as spool_remedy
from agent.server_address import control_channel_url, tls_context
from agent.state_file import AgentState
from agent.status import DaemonStatus, write_status
from agent.websocket_connect import open_websocket
from audit.record import SignedEvent
from protocol.domains import Purpose
from protocol.exception_chain import root_causes
from protocol.identity import SigningIdentity, b64url
from protocol.policy.signed_policy import MAX_BUNDLE_SIZE
from protocol.signed_payload import JsonValue, create_signed_payload

logger = logging.getLogger("tucdesk.agent.control")

# Room for the largest policy bundle (protocol.policy MAX_BUNDLE_SIZE) plus its envelope.
MAX_MESSAGE_BYTES = MAX_BUNDLE_SIZE + 64 * 1024
CONNECT_TIMEOUT_SECONDS = 15.0
AUTH_TIMEOUT_SECONDS = 15.0
SEND_TIMEOUT_SECONDS = 10.0
DEFAULT_HEARTBEAT_SECONDS = 20.0
MIN_HEARTBEAT_SECONDS = 0.05
MAX_HEARTBEAT_SECONDS = 300.0
# The server is considered gone after this many heartbeat periods without a word from it.
SILENCE_HEARTBEATS = 3
BACKOFF_INITIAL_SECONDS = 0.5
DEFAULT_BACKOFF_CAP_SECONDS = 30.0
MAX_AUDIT_BACKLOG = 1000
MAX_AUDIT_IN_FLIGHT = 64
# After an ``audit_event_failed`` (the rendezvous's store briefly unavailable) the event goes
# back to the front of the queue and audit events wait this long, doubling per failure in a row.
AUDIT_RETRY_INITIAL_SECONDS = 1.0
AUDIT_RETRY_CAP_SECONDS = 60.0
MAX_PENDING_MESSAGES = 256
MAX_ISSUER_LENGTH = 256
# The rendezvous closes with this code (rendezvous/control_channel.py CLOSE_AGENT_REMOVED) when
# an admin removed this agent: its key will never be accepted again, so retrying soon is noise.
AGENT_REMOVED_CLOSE_CODE = 4403
REMOVED_RETRY_SECONDS = 3600.0
# The end_sessions reason (agent/session_host.py END_SESSIONS_REASONS) for the sessions a
# removed agent still runs, and at most how many ids one such message names.
AGENT_REMOVED_REASON = "agent_removed"
MAX_ENDED_IDS_PER_MESSAGE = 64
MAX_ERROR_TEXT = 300
# The rendezvous's refusal of a stale or future auth answer (protocol/signed_payload.py).
SKEW_REFUSAL_PATTERN = re.compile(
    r"payload timestamp is (?P<seconds>\d+)s (?P<direction>ahead of|behind)"
)
# On a clean stop: how long to wait for sessions to finish their teardown and for every queued
# audit event to be acknowledged before the channel closes anyway (the spool keeps the rest).
SHUTDOWN_DRAIN_SECONDS = 5.0
# While draining without a ``sessions_ended`` signal (the session host gives one), how often to
# look again at the sessions (their end queues no event if it was cancelled before it started).
DRAIN_CHECK_SECONDS = 0.05
# The live_sessions report: at most this many ids (the rendezvous takes at most as many), and
# only if the rendezvous's welcome says it understands the message.
MAX_REPORTED_SESSIONS = 256
MAX_REPORT_BYTES = 12 * 1024
LIVE_SESSIONS_FEATURE = "live_sessions"
# Offers that arrive while the daemon stops are refused with this reason.
STOPPING_REFUSAL_REASON = "the agent is stopping"
MAX_OFFER_SESSION_ID_LENGTH = 128

OfferHandler = Callable[[dict[str, Any]], None]
"""Called with each ``session_offer`` and ``end_sessions`` message; must not block (start a
task and return)."""

PolicyBundleHandler = Callable[[dict[str, Any]], dict[str, Any] | None]
"""Called with each ``policy_bundle`` message; returns the reply to send, if any."""

LiveSessions = Callable[[], Collection[str]]
"""The ids of the sessions this process runs now (agent/session_host.py live_session_ids)."""

SessionsEnded = Callable[[], Awaitable[None]]
"""Returns once no session runs (agent/session_host.py wait_all_ended)."""

ServiceKeysSaver = Callable[[dict[str, Any]], None]
"""Seals the pinned service keys (a JWK set) into the state file after a followed rotation."""


class ReconnectBackoff:
    """Exponential backoff with full jitter: each wait is uniform in [0, min(cap, base * 2^n)]."""

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL_SECONDS,
        cap: float = DEFAULT_BACKOFF_CAP_SECONDS,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial <= cap:
            raise ValueError("need 0 < initial <= cap")
        self.initial = initial
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.SystemRandom()

    def ceiling(self) -> float:
        """The upper bound of the next wait."""
        exponent = min(self.attempt, 62)
        return min(self.cap, self.initial * math.pow(2, exponent))

    def next_delay(self) -> float:
        """The next wait, and count the attempt."""
        delay = self._rng.uniform(0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from the initial wait (after a successful connection)."""
        self.attempt = 0


@dataclass
class ChannelInfo:
    """What the current (or last) connection learned from the server."""

    issuer: str | None = None
    heartbeat_seconds: float = DEFAULT_HEARTBEAT_SECONDS
    connection_id: str | None = None
    features: frozenset[str] = frozenset()


class ControlClient:
    """Holds the control channel; ``run`` reconnects forever until cancelled."""

    def __init__(
        self,
        state: AgentState,
        machine_fingerprint: str,
        on_offer: OfferHandler,
        *,
        ca_file: Path | str | None = None,
        status_file: Path | None = None,
        backoff: ReconnectBackoff | None = None,
        clock: Callable[[], float] = time.time,
        on_policy_bundle: PolicyBundleHandler | None = None,
        connection_file: Path | None = None,
        event_spool: EventSpool | None = None,
        live_sessions: LiveSessions | None = None,
        sessions_ended: SessionsEnded | None = None,
        on_service_keys_changed: ServiceKeysSaver | None = None,
    ) -> None:
        self._state = state
        self._save_service_keys = on_service_keys_changed
        self._sessions_ended = sessions_ended
        self._spool = event_spool
        self._spooled: set[str] = set()
        self._live_sessions = live_sessions
        # Events queued before this connection's welcome that the live_sessions report waits for.
        self._report_after: set[str] | None = None
        self._stopping = trio.Event()
        self._audit_progress = trio.Event()
        self._connection_file = connection_file
        self._on_policy_bundle = on_policy_bundle
        self._identity: SigningIdentity = state.identity()
        self._machine_fingerprint = machine_fingerprint
        self._on_offer = on_offer
        self._ca_file = ca_file if ca_file is not None else state.ca_file
        self._status_file = status_file
        self._backoff = backoff or ReconnectBackoff()
        self._clock = clock
        self._url = control_channel_url(state.server_url)
        # Built now, so a missing or broken CA file stops the daemon at start-up with a reason;
        # built again at every connection attempt (_current_ssl_context), so a CA appended to
        # the file is trusted from the next reconnect, without a restart.
        self._ssl_context = tls_context(self._ca_file) if self._url.startswith("wss:") else None
        self._audit_backlog: deque[dict[str, Any]] = deque()
        self._audit_in_flight: dict[str, dict[str, Any]] = {}
        self._audit_ids = 0
        # After failures in a row, audit events wait until this trio time (audit_event_failed).
        self._audit_failures = 0
        self._audit_resume_at = -math.inf
        self._messages: deque[dict[str, Any]] = deque()
        self._wakeup = trio.Event()
        self._connected = trio.Event()
        self._disconnected = trio.Event()
        self._disconnected.set()
        # A restarted process starts from the connection its predecessor was last welcomed on.
        self.info = ChannelInfo(
            connection_id=(
                load_last_connection(connection_file) if connection_file is not None else None
            )
        )
        self.connections = 0
        self.dropped_audit_events = 0
        self.refused_audit_events = 0
        self.acknowledged_audit_events = 0
        self.last_connected_at: float | None = None
        self.last_error: str | None = None
        # What is wrong with the audit spool (new sessions are refused meanwhile), or None.
        self.audit_spool_problem: str | None = None
        if event_spool is not None:
            self._load_spool(event_spool)
            self._audit_spool_refusal()

    # ---- what the rest of the agent uses -------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """True while the channel is authenticated and open."""
        return self._connected.is_set()

    @property
    def issuer(self) -> str | None:
        """The rendezvous issuer name (the audience of its challenge), once connected."""
        return self.info.issuer

    @property
    def pending_audit_events(self) -> int:
        """Audit events not yet acknowledged as durable (queued or in flight)."""
        return len(self._audit_backlog) + len(self._audit_in_flight)

    async def wait_connected(self) -> None:
        """Return once the channel is authenticated and open."""
        await self._connected.wait()

    async def wait_disconnected(self) -> None:
        """Return once the channel is down."""
        await self._disconnected.wait()

    def send_audit_event(self, event: SignedEvent) -> None:
        """Queue a signed audit event (and spool it) until it is acknowledged; oldest dropped
        past the bound."""
        if self.pending_audit_events >= MAX_AUDIT_BACKLOG and self._audit_backlog:
            dropped = self._audit_backlog.popleft()
            self._forget_spooled(dropped["id"])
            if self._report_after is not None:
                self._report_after.discard(dropped["id"])
                self._send_report_when_due()
            self.dropped_audit_events += 1
            logger.warning(
                "audit backlog full (%d events): dropped the oldest event", MAX_AUDIT_BACKLOG
            )
        content = event.to_json()
        event_id = self._spool.add(content) if self._spool is not None else None
        if self._spool is not None:
            self._audit_spool_refusal()
        if event_id is not None:
            self._spooled.add(event_id)
        else:
            # Never the shape of a spool key, so the two kinds of id cannot meet.
            self._audit_ids += 1
            event_id = f"m{self._audit_ids}"
        self._audit_backlog.append({"type": "audit_event", "id": event_id, "event": content})
        self._wakeup.set()
        self._audit_progress.set()

    def _load_spool(self, spool: EventSpool) -> None:
        try:
            spooled = spool.load()
        except OSError as error:
            logger.warning(
                "cannot read the audit spool %s (%s): events an earlier run left there are not "
                "sent", spool.directory, error.strerror or error,
            )  # fmt: skip
            return
        for key, content in spooled[-MAX_AUDIT_BACKLOG:]:
            self._spooled.add(key)
            self._audit_backlog.append({"type": "audit_event", "id": key, "event": content})
        if spooled:
            logger.info(
                "%d audit event(s) an earlier run did not get acknowledged are sent again",
                len(spooled),
            )

    def _forget_spooled(self, event_id: str) -> None:
        if event_id in self._spooled and self._spool is not None:
            self._spooled.discard(event_id)
            self._spool.remove(event_id)
            if self.audit_spool_problem is not None:
                self._audit_spool_refusal()  # says so once it has room again

    def send_message(self, message: dict[str, Any]) -> bool:
        """Queue a message for the current connection; False (dropped) while disconnected."""
        if not self.is_connected or len(self._messages) >= MAX_PENDING_MESSAGES:
            return False
        self._messages.append(message)
        self._wakeup.set()
        return True

    # ---- the connection loop -------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, and reconnect with backoff and jitter, until cancelled.

        Cancelled while connected, it drains first (at most SHUTDOWN_DRAIN_SECONDS): the
        connection is shielded from the cancellation until the sessions have ended and their
        audit events are acknowledged, then closed normally.
        """
        work = trio.CancelScope(shield=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._run_shielded, work)
            try:
                await trio.sleep_forever()
            finally:
                self._begin_stop(work)

    def _begin_stop(self, work: trio.CancelScope) -> None:
        self._stopping.set()
        self._wakeup.set()
        if self.is_connected:
            work.deadline = min(work.deadline, trio.current_time() + SHUTDOWN_DRAIN_SECONDS)
        else:
            # Nothing to drain into: the spool keeps what is queued for the next start.
            work.cancel()

    async def _run_shielded(self, work: trio.CancelScope) -> None:
        with work:
            await self._reconnect_loop()

    async def _reconnect_loop(self) -> None:
        while not self._stopping.is_set():
            removed = False
            try:
                await self.serve_once()
                self.last_error = "the rendezvous closed the control channel"
            except Exception as error:  # noqa: BLE001 - the daemon must outlive any one connection
                if self._stopping.is_set():
                    return
                self.last_error = _describe(error, self._ca_file)
                removed = _closed_as_removed(error)
                logger.debug("control channel failed", exc_info=True)
            self._write_status()
            delay = self._backoff.next_delay()
            if removed:
                self._end_sessions_of_removed_agent()
                delay = REMOVED_RETRY_SECONDS
                logger.error(
                    "control channel to %s refused: %s (tucdesk-agent enroll --force with a "
                    "new registration key, then restart); trying again in %.0fs",
                    self._state.server_url, self.last_error, delay,
                )  # fmt: skip
                await self._sleep_unless_stopping(delay)
                continue
            if self._stopping.is_set():
                return
            logger.warning(
                "control channel to %s is down (%s); reconnecting in %.1fs",
                self._state.server_url, self.last_error, delay,
            )
            await self._sleep_unless_stopping(delay)

    def _end_sessions_of_removed_agent(self) -> None:
        """End every session this process runs (reason ``agent_removed``), through the same
        handler an ``end_sessions`` from the rendezvous goes to."""
        running = sorted(self._live_sessions()) if self._live_sessions is not None else []
        if not running:
            return
        logger.error("this agent was removed from its team: ending the %d session(s) it runs",
                     len(running))  # fmt: skip
        for start in range(0, len(running), MAX_ENDED_IDS_PER_MESSAGE):
            self._on_offer({
                "type": "end_sessions", "ids": running[start : start + MAX_ENDED_IDS_PER_MESSAGE],
                "reason": AGENT_REMOVED_REASON,
            })  # fmt: skip

    async def _sleep_unless_stopping(self, delay: float) -> None:
        with trio.move_on_after(delay):
            await self._stopping.wait()

    async def serve_once(self) -> None:
        """One connection: authenticate, then hold the channel until it ends."""
        async with open_websocket(
            self._url,
            self._current_ssl_context(),
            max_message_size=MAX_MESSAGE_BYTES,
            message_queue_size=8,
            connect_timeout=CONNECT_TIMEOUT_SECONDS,
            disconnect_timeout=SEND_TIMEOUT_SECONDS,
        ) as websocket:
            with trio.fail_after(AUTH_TIMEOUT_SECONDS):
                await self._authenticate(websocket)
            if self._connection_file is not None:
                # Before anything else happens on it: a crash from here on names this one.
                await trio.to_thread.run_sync(
                    remember_connection, self._connection_file, self.info.connection_id
                )
            self._on_connected()
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_loop, websocket)
                    nursery.start_soon(self._heartbeat_loop)
                    nursery.start_soon(self._drain_when_stopping, nursery.cancel_scope)
                    await self._receive_loop(websocket)
                    nursery.cancel_scope.cancel()
            finally:
                self._on_disconnected()

    def _current_ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context from the CA file as it is now (it is small: reading it costs about
        a millisecond per attempt). A file that cannot be read or parsed now fails this attempt
        with the reason, and the next attempt reads it again: never a crash."""
        if self._ssl_context is None:
            return None
        self._ssl_context = tls_context(self._ca_file)
        return self._ssl_context

    async def _authenticate(self, websocket: WebSocketConnection) -> None:
        challenge = await _receive_json(websocket)
        if challenge.get("type") != "challenge":
            raise ControlChannelError("the rendezvous did not start with a challenge")
        text, audience = challenge.get("challenge"), challenge.get("audience")
        if not isinstance(text, str) or not isinstance(audience, str):
            raise ControlChannelError("the rendezvous's challenge is malformed")
        if not 0 < len(audience) <= MAX_ISSUER_LENGTH:
            raise ControlChannelError("the rendezvous's challenge names no audience")
        heartbeat = challenge.get("heartbeat_seconds", DEFAULT_HEARTBEAT_SECONDS)
        if isinstance(heartbeat, bool) or not isinstance(heartbeat, int | float):
            heartbeat = DEFAULT_HEARTBEAT_SECONDS
        answer: dict[str, JsonValue] = {
            "agent_id": self._state.agent_id,
            "public_key": b64url(self._identity.public.raw),
            "challenge": text,
            "audience": audience,
            "machine_fingerprint": self._machine_fingerprint,
        }
        if self.info.connection_id is not None:
            # The connection this process last held: a reconnect supersedes it, not a clone.
            answer["replaces"] = self.info.connection_id
        envelope = create_signed_payload(self._identity, Purpose.AGENT_AUTH, answer, self._clock())
        await websocket.send_message(json.dumps({"type": "auth", "envelope": envelope}))
        welcome = await _receive_json(websocket)
        if welcome.get("type") != "welcome" or welcome.get("agent_id") != self._state.agent_id:
            raise ControlChannelError("the rendezvous did not welcome this agent")
        connection_id = welcome.get("connection_id")
        features = welcome.get("features")
        self.info = ChannelInfo(
            issuer=audience,
            heartbeat_seconds=min(
                max(float(heartbeat), MIN_HEARTBEAT_SECONDS), MAX_HEARTBEAT_SECONDS
            ),
            connection_id=(
                connection_id
                if isinstance(connection_id, str) and is_connection_id(connection_id)
                else None
            ),
            features=frozenset(
                item for item in (features if isinstance(features, list) else [])[:32]
                if isinstance(item, str)
            ),
        )

    async def _receive_loop(self, websocket: WebSocketConnection) -> None:
        silence = self.info.heartbeat_seconds * SILENCE_HEARTBEATS
        while True:
            try:
                with trio.fail_after(silence):
                    message = await _receive_json(websocket)
            except trio.TooSlowError:
                raise ControlChannelError(
                    f"no word from the rendezvous for {silence:.0f}s"
                ) from None
            kind = message.get("type")
            if kind == "session_offer":
                if self._stopping.is_set():
                    self._refuse_offer_while_stopping(message)
                elif (refusal := self._audit_spool_refusal()) is not None:
                    self._refuse_offer(message, refusal)
                else:
                    self._on_offer(message)
                    self._promise_spool_room(message)
            elif kind == "end_sessions":
                # Also while stopping: the sessions still draining end now. The offer handler
                # takes it too (agent/session_host.py SessionHost.offer_handler).
                self._on_offer(message)
            elif kind == "service_keys":
                self._follow_service_keys(message)
            elif kind == "policy_bundle" and self._on_policy_bundle is not None:
                reply = self._on_policy_bundle(message)
                if reply is not None:
                    self.send_message(reply)
            elif kind == "heartbeat_ack":
                continue
            elif kind in ("audit_event_ack", "audit_event_refused"):
                self._audit_answered(message)
            elif kind == "audit_event_failed":
                self._audit_failed(message)
            else:
                # Newer servers may send more: unknown types are ignored, as the contract says.
                logger.info("ignoring a control message of type %r", str(kind)[:32])

    def _follow_service_keys(self, message: dict[str, Any]) -> None:
        """Pin the keys the rendezvous rotated to, where the statements chain from our pins."""
        try:
            outcome = follow_key_rotations(self._state.service_keys, message)
        except EnrollmentError as error:
            logger.warning("refused the rendezvous's service keys: %s", error)
            return
        for reason in outcome.refused:
            logger.warning("refused a service key rotation: %s", reason)
        if outcome.changed:
            # In place: the session host's grant keys are a view of this very dict.
            self._state.service_keys.clear()
            self._state.service_keys.update(outcome.service_keys)
            for key in outcome.added:
                logger.info("pinned rotated service key %s (vouched for by its predecessor)", key)
            for key in outcome.dropped:
                logger.info("dropped retired service key %s", key)
            self._persist_service_keys()

    def _persist_service_keys(self) -> None:
        """Seal the followed pins into the state file, so ``status`` and ``check`` show them and
        a restarted daemon starts from them; on failure they hold for this run only."""
        if self._save_service_keys is None:
            return
        try:
            self._save_service_keys(dict(self._state.service_keys))
        except Exception as error:  # noqa: BLE001 - pinned in memory either way
            reason = error.strerror if isinstance(error, OSError) and error.strerror else error
            logger.warning(
                "cannot save the rotated service keys to the state file (%s): they are pinned "
                "for this run only, and followed again after a restart", reason,
            )  # fmt: skip

    def _audit_answered(self, message: dict[str, Any]) -> None:
        event_id = message.get("id")
        if not isinstance(event_id, str) or event_id not in self._audit_in_flight:
            return
        del self._audit_in_flight[event_id]
        # Acknowledged as durable, or refused as never storable: either way not sent again.
        self._forget_spooled(event_id)
        self._audit_progress.set()
        if self._report_after is not None:
            self._report_after.discard(event_id)
            self._send_report_when_due()
        self._audit_failures = 0
        if message["type"] == "audit_event_ack":
            self.acknowledged_audit_events += 1
        else:
            self.refused_audit_events += 1
            logger.warning(
                "the rendezvous refused an audit event: %s", str(message.get("reason"))[:200]
            )
        self._wakeup.set()

    def _refuse_offer_while_stopping(self, message: dict[str, Any]) -> None:
        """A session started now would be cancelled at once: refuse it, as the session host
        refuses an offer it cannot take."""
        self._refuse_offer(message, STOPPING_REFUSAL_REASON)

    def _refuse_offer(self, message: dict[str, Any], reason: str) -> None:
        session_id = message.get("session_id")
        if isinstance(session_id, str) and 0 < len(session_id) <= MAX_OFFER_SESSION_ID_LENGTH:
            logger.info("refusing session %s: %s", session_id, reason)
            self.send_message(
                {"type": "session_offer_refused", "session_id": session_id, "reason": reason}
            )

    def _audit_spool_refusal(self) -> str | None:
        """Why a new session is refused for want of room to keep its audit events (no audit,
        no action; running sessions go on), or None."""
        if self._spool is None:
            return None
        live = None if self._live_sessions is None else self._live_sessions()
        reason = self._spool.refusal_reason(0 if live is None else len(live), live)
        self._note_audit_spool_problem(reason)
        return reason

    def _promise_spool_room(self, message: dict[str, Any]) -> None:
        """The session host took the offer: its events' slots are held for it at once, so that
        the next offer, arriving before they are written, cannot take them too."""
        session_id = message.get("session_id")
        if self._spool is None or self._live_sessions is None or not isinstance(session_id, str):
            return
        if session_id in self._live_sessions():
            self._spool.promise(session_id)

    def _note_audit_spool_problem(self, problem: str | None) -> None:
        """Log and report (status file) a change in what is wrong with the audit spool."""
        changed = (problem is None) != (self.audit_spool_problem is None)
        self.audit_spool_problem = problem
        if not changed:
            return  # the counts in the text move with every event: said once, not each time
        if problem is not None:
            logger.error("%s: new sessions are refused %s", problem, spool_remedy(problem))
        else:
            logger.info("the agent's audit spool has room again: new sessions are accepted")
        self._write_status()

    def _audit_failed(self, message: dict[str, Any]) -> None:
        """Not stored now (the rendezvous's store is briefly unavailable): the events in flight
        go back to the front of the queue, in order, and audit events wait a growing, capped
        while. Answers still coming for them are ignored; the resend of one stored meanwhile is
        acknowledged again without a second record."""
        event_id = message.get("id")
        if not isinstance(event_id, str) or event_id not in self._audit_in_flight:
            return
        self._audit_backlog.extendleft(reversed(list(self._audit_in_flight.values())))
        self._audit_in_flight.clear()
        delay = min(
            AUDIT_RETRY_CAP_SECONDS,
            AUDIT_RETRY_INITIAL_SECONDS * math.pow(2, min(self._audit_failures, 32)),
        )
        self._audit_failures += 1
        self._audit_resume_at = trio.current_time() + delay
        logger.warning(
            "the rendezvous could not store an audit event now (%s): sending again in %.1fs",
            str(message.get("reason"))[:200], delay,
        )  # fmt: skip
        self._audit_progress.set()
        self._wakeup.set()

    async def _drain_when_stopping(self, connection_scope: trio.CancelScope) -> None:
        """Once the daemon stops: wait for the sessions to end and every event to be
        acknowledged (``run`` bounds the wait), then end the connection normally."""
        await self._stopping.wait()
        logger.info(
            "stopping: waiting up to %.0fs for %d session(s) to end and %d audit event(s) to be "
            "acknowledged", SHUTDOWN_DRAIN_SECONDS, self._live_count(), self.pending_audit_events,
        )  # fmt: skip
        while self._live_count() or self.pending_audit_events:
            self._audit_progress = trio.Event()
            if self.pending_audit_events:
                # A session's end queues its event: this wakes for that too.
                await self._audit_progress.wait()
            elif self._sessions_ended is not None:
                await self._sessions_ended()
            else:
                with trio.move_on_after(DRAIN_CHECK_SECONDS):
                    await self._audit_progress.wait()
        connection_scope.cancel()

    def _send_report_when_due(self) -> None:
        if self._report_after is None or self._report_after or not self.is_connected:
            return
        self._report_after = None
        report = self._live_sessions_report()
        if report is not None:
            self._messages.append(report)
            self._wakeup.set()

    def _live_count(self) -> int:
        return 0 if self._live_sessions is None else len(self._live_sessions())

    def _live_sessions_report(self) -> dict[str, Any] | None:
        """The ``live_sessions`` message for a new connection, or None (not understood, or
        too many to report whole: an incomplete list would end running sessions)."""
        if self._live_sessions is None or LIVE_SESSIONS_FEATURE not in self.info.features:
            return None
        ids = sorted(self._live_sessions())
        report = {"type": "live_sessions", "ids": ids}
        if len(ids) > MAX_REPORTED_SESSIONS or len(json.dumps(report)) > MAX_REPORT_BYTES:
            logger.warning(
                "running %d sessions, more than a live_sessions report holds: not reporting "
                "(sessions an earlier run of this agent left open stay open in the list)",
                len(ids),
            )  # fmt: skip
            return None
        return report

    async def _heartbeat_loop(self) -> None:
        while True:
            await trio.sleep(self.info.heartbeat_seconds)
            self._messages.append({"type": "heartbeat"})
            self._wakeup.set()

    def _has_sendable(self) -> bool:
        return bool(self._messages) or (
            bool(self._audit_backlog)
            and len(self._audit_in_flight) < MAX_AUDIT_IN_FLIGHT
            and trio.current_time() >= self._audit_resume_at
        )

    async def _send_loop(self, websocket: WebSocketConnection) -> None:
        while True:
            while self._has_sendable():
                # Live messages (acks, heartbeats) go before the audit backlog.
                queue = self._messages if self._messages else self._audit_backlog
                message = queue[0]
                with trio.fail_after(SEND_TIMEOUT_SECONDS):
                    await websocket.send_message(json.dumps(message))
                if queue and queue[0] is message:
                    queue.popleft()
                    if message.get("type") == "audit_event":
                        self._audit_in_flight[message["id"]] = message
            self._wakeup = trio.Event()
            if self._has_sendable():
                continue
            # Queued audit events held back after a failure wake the loop when their wait ends.
            resume_at = self._audit_resume_at if self._audit_backlog else math.inf
            with trio.move_on_at(resume_at):
                await self._wakeup.wait()

    def _on_connected(self) -> None:
        self.connections += 1
        self.last_connected_at = self._clock()
        self.last_error = None
        self._backoff.reset()
        self._messages.clear()
        # The report goes once the events queued before now are acknowledged: a session.ended
        # an earlier run left in the spool then ends its session with the agent's own reason,
        # not as lost.
        self._report_after = {message["id"] for message in self._audit_backlog}
        self._disconnected = trio.Event()
        self._connected.set()
        self._send_report_when_due()
        self._write_status()
        logger.info(
            "control channel to %s is up (connection %s)",
            self._state.server_url, self.info.connection_id,
        )

    def _on_disconnected(self) -> None:
        self._report_after = None
        self._connected = trio.Event()
        self._disconnected.set()
        self._messages.clear()
        # Unacknowledged events go back to the front, in order, for the next connection.
        self._audit_backlog.extendleft(reversed(list(self._audit_in_flight.values())))
        self._audit_in_flight.clear()

    def _write_status(self) -> None:
        if self._status_file is None:
            return
        status = DaemonStatus(
            pid=os.getpid(),
            server_url=self._state.server_url,
            connected=self.is_connected,
            updated_at=self._clock(),
            last_connected_at=self.last_connected_at,
            last_error=self.last_error,
            audit_spool_problem=self.audit_spool_problem,
        )
        try:
            write_status(self._status_file, status)
        except Exception as error:  # noqa: BLE001 - the status file is informational only
            if isinstance(error, OSError) and error.strerror:
                logger.warning(
                    "cannot write the status file %s (%s)", self._status_file, error.strerror
                )
            else:
                logger.warning("cannot write the status file: %s", error)


async def _receive_json(websocket: WebSocketConnection) -> dict[str, Any]:
    message = await websocket.get_message()
    if len(message) > MAX_MESSAGE_BYTES:
        raise ControlChannelError("the rendezvous sent an oversized control message")
    try:
        parsed = json.loads(message)
    except (ValueError, RecursionError):
        raise ControlChannelError("the rendezvous sent a non-JSON control message") from None
    if not isinstance(parsed, dict):
        raise ControlChannelError("the rendezvous sent a control message that is not an object")
    return parsed


def _closed_as_removed(error: BaseException) -> bool:
    """Whether the rendezvous closed the channel because an admin removed this agent."""
    for item in root_causes(error):
        if isinstance(item, ConnectionClosed):
            reason = item.reason
            return reason is not None and reason.code == AGENT_REMOVED_CLOSE_CODE
    return False


def _describe(error: BaseException, ca_file: Path | str | None = None) -> str:
    """One line for why a connection ended: the agent's own reason, the rendezvous's close
    reason, or the most specific cause in the exception chain."""
    for item in root_causes(error):
        if isinstance(item, ControlChannelError | ConfigError):
            # ConfigError: the CA file could not be read for this attempt (named in it).
            return str(item)[:MAX_ERROR_TEXT]
        if isinstance(item, ConnectionClosed):
            reason = item.reason
            detail = getattr(reason, "reason", None) if reason is not None else None
            skew = _clock_skew_refusal(str(detail)) if detail else None
            if skew is not None:
                return skew
            return f"closed by the rendezvous{': ' + str(detail)[:200] if detail else ''}"
        if isinstance(item, ConnectionTimeout):
            # Names the step that took too long (agent/websocket_connect.py).
            return str(item)[:MAX_ERROR_TEXT] or "the connection timed out"
        if isinstance(item, trio.TooSlowError):
            return "timed out"
    return describe_connection_failure(error, ca_file)


def _clock_skew_refusal(reason: str) -> str | None:
    """For the rendezvous's refusal of an auth answer stamped outside its skew window (its close
    reason is cut at the WebSocket limit, 123 bytes, before its advice), a line that keeps the
    remedy: which way this host's clock is off, by how much, and what to check. None otherwise.
    """
    found = SKEW_REFUSAL_PATTERN.search(reason)
    if found is None:
        return None
    seconds, direction = found.group("seconds"), found.group("direction")
    way = "ahead of" if direction == "ahead of" else "behind"
    return (
        f"the rendezvous refused this agent's authentication: the host clock is {seconds} s "
        f"{way} the rendezvous's; check NTP (timedatectl / chronyc tracking)"
    )
