"""The agent side of a session: offer -> relay -> handshake and grant check -> PTY or exec.

For each session offer (docs/sessions.md §3) the host acknowledges it, connects to the relay
with the agent's relay token, and runs ``AgentHandshake``. The grant check (§2) verifies the
grant against the pinned rendezvous key, this agent's id and team, the offer's session id, the
operator key proven in the handshake, expiry, and that the session id was never used before;
then the agent's own signed policy rules on it again (§6, agent/grant_policy.py). A refusal is
sealed into handshake message 4 so the operator sees why, and audited.

Then (§4) the operator's first frame must be CONTROL SessionStart matching the grant's mode and
command. The shell runs on a PTY, the command through exec; frames are pumped both ways with
backpressure (a slow reader stalls the child, never a buffer), ExitStatus and CLOSE end the
session. The operator's CLOSE (or Close) ends it as ``operator-disconnected`` and tears the
process session down; a link that dies without one (end of stream or an error: a cut network,
the relay's dead-peer timeout, a killed CLI) ends it as ``connection-lost`` with a hang-up, as
sshd's dead connection does: SIGHUP, input closed, and what ignores SIGHUP runs on.
With record_sessions on, what the operator received (never what they typed) and resizes also go
to the session's recording (agent/recording.py), whose hash the ``session.ended`` event carries.

An ``end_sessions`` message from the rendezvous (rendezvous/control_channel.py §8: an admin
disabled the sessions' operator) ends the named sessions this process runs at once: a running
one as the operator leaving would (the process group is torn down), after a Close telling the
operator why, and its signed ``session.ended`` carries the message's reason; one still being
set up (relay, handshake) is abandoned and audited as refused with that reason. Ids this
process does not run are remembered (for SESSION_ID_MEMORY_SECONDS, at most
MAX_REMEMBERED_ENDED_SESSIONS of them): the rendezvous may send ``end_sessions`` for a session
whose offer is still on its way (the operator was disabled while it was being brokered), so a
later offer of a remembered id is refused with that reason and audited as refused.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import shlex
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, suppress
from dataclasses import dataclass, field
from typing import Any

import trio

from agent.audit_events import SessionAuditor
from agent.config import AgentConfig
from agent.errors import AgentError, OfferError
from agent.exec_session import ExecSessionSpec, open_exec_session
from agent.grant_policy import GrantPolicy, GrantPolicyRefused, LocalDecision
from agent.login_records import LoginRecordFiles
from agent.process_group import (
    CommandNotStarted,
    ExitStatus,
    LocalSession,
    OutputStream,
    SessionProcessError,
    session_variables,
)
from agent.pty_session import PtySessionSpec, open_pty_session
from agent.recording import (
    RecordingError,
    RecordingFailed,
    SessionRecorder,
    recover_interrupted_recordings,
)
from audit.record import SignedEvent
from protocol.control import (
    Close,
    Keepalive,
    Resize,
    SessionStart,
    Signal,
    decode_control,
    encode_control,
)
from protocol.control import ExitStatus as ExitStatusMessage
from protocol.errors import ProtocolError
from protocol.frames import HEADER_SIZE, MAX_FRAME_PAYLOAD, FrameType, SealedParts, SecureChannel
from protocol.handshake import AgentHandshake, HandshakeRefused, RefusalCode
from protocol.identity import PublicIdentity, SigningIdentity
from protocol.nonce_cache import NonceCache
from protocol.session_grant import (
    MAX_SESSION_GRANT_LIFETIME_SECONDS,
    SESSION_GRANT_LEEWAY_SECONDS,
    SessionGrant,
    SessionMode,
    verify_session_grant,
)
from protocol.stream_framing import (
    StreamFrameBuffer,
    encode_stream_frame,
    encode_stream_frames,
    length_prefix,
)
from relay.client import acquire_at_once, connect_tcp, link_error, send_gathered_in_turn
from relay.errors import RelayError

logger = logging.getLogger("tucdesk.agent.session")

# How the agent names itself in what it writes to a session's stderr.
AGENT_PROGRAM = "tucdesk-agent"
RELAY_CONNECT_TIMEOUT_SECONDS = 10.0
RELAY_PAIR_TIMEOUT_SECONDS = 35.0
SESSION_START_TIMEOUT_SECONDS = 15.0
CLOSE_SEND_TIMEOUT_SECONDS = 5.0
OFFER_EXPIRY_LEEWAY_SECONDS = 5
# What the operator sends is keystrokes and stdin: room for a few full frames is plenty.
RECEIVE_BUFFER_SIZE = 256 * 1024
# A receive at least this large suggests more is waiting: read again before waiting.
LARGE_RECEIVE_BYTES = 16 * 1024
# Frames handed out in a row without waiting, at most, before the link lets the session's
# other tasks run (writing input to the child does not yield unless it has to wait).
MAX_FRAMES_WITHOUT_YIELD = 16
MAX_SESSION_ID_LENGTH = 128
# A command line can carry secrets: INFO names only its program and a short hash of it; the
# command itself (cut to this many characters; the audit log has it whole) is logged at DEBUG.
MAX_LOGGED_COMMAND_CHARACTERS = 4096
MAX_LOGGED_PROGRAM_CHARACTERS = 128
LOGGED_DIGEST_HEX_DIGITS = 12
MAX_RELAY_HOST_LENGTH = 253
MAX_RELAY_TOKEN_LENGTH = 8 * 1024
# end_sessions: at most this many ids in one message (the rendezvous sends at most 64), and
# the reasons it may give, each with what the operator is told (Close reason "revoked").
MAX_END_SESSION_IDS = 256
END_SESSIONS_REASONS: Mapping[str, str] = {
    "operator_disabled": "the operator was disabled by an admin",
    "agent_removed": "this agent was removed from its team by an admin",
    "ended_by_admin": "an admin ended the session",
}
END_SESSIONS_CLOSE_REASON = "revoked"
# A session id is remembered at least as long as any grant naming it could still be accepted.
SESSION_ID_MEMORY_SECONDS = MAX_SESSION_GRANT_LIFETIME_SECONDS + 2 * SESSION_GRANT_LEEWAY_SECONDS
# Ids named in end_sessions before their offer arrived, remembered at most this many at once
# (oldest forgotten first); the rendezvous names at most 1000 sessions per disabled operator.
MAX_REMEMBERED_ENDED_SESSIONS = 10_000

# How a relay stream reports that the other end (or the relay) is gone.
LINK_CLOSED = (trio.BrokenResourceError, trio.ClosedResourceError)
_KEEPALIVE_REPLY = encode_control(Keepalive(reply=True))
# A session that sent the operator nothing for this long says it is still here (a CONTROL
# Keepalive), so the operator's CLI can tell a quiet session from a dead host or a cut network
# (operator_cli/session_client.py KEEPALIVE_TIMEOUT_SECONDS) without asking, which it could not
# do while a command that is not reading its stdin holds up the frames behind.
HEARTBEAT_INTERVAL_SECONDS = 15.0
# After the operator's link died without a CLOSE, the session is hung up (docs/sessions.md §4):
# the main process has this long to exit on its SIGHUP; one that ignores it is left running.
HANG_UP_WAIT_SECONDS = 2.0

RelayConnector = Callable[..., Awaitable[trio.abc.Stream]]
ControlSender = Callable[[dict[str, Any]], object]
AuditSink = Callable[[SignedEvent], None]


@dataclass(frozen=True)
class SessionOffer:
    """A session offer, checked for shape (the relay checks its token)."""

    session_id: str
    expires_at: int
    relay_id: str
    relay_host: str
    relay_port: int
    relay_token: str = field(repr=False)

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> SessionOffer:
        """Parse a ``session_offer`` control message; OfferError names what is wrong."""
        session_id = message.get("session_id")
        if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_SESSION_ID_LENGTH:
            raise OfferError("the offer's session_id is missing or too long")
        expires_at = message.get("expires_at")
        if isinstance(expires_at, bool) or not isinstance(expires_at, int):
            raise OfferError("the offer's expires_at is not an integer")
        relay = message.get("relay")
        if not isinstance(relay, Mapping):
            raise OfferError("the offer names no relay")
        relay_id, host, port = relay.get("id"), relay.get("host"), relay.get("port")
        if not isinstance(relay_id, str) or not relay_id:
            raise OfferError("the offer's relay has no id")
        if not isinstance(host, str) or not 0 < len(host) <= MAX_RELAY_HOST_LENGTH:
            raise OfferError("the offer's relay host is missing or too long")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise OfferError("the offer's relay port is not a port number")
        token = message.get("relay_token")
        if not isinstance(token, str) or not 0 < len(token) <= MAX_RELAY_TOKEN_LENGTH:
            raise OfferError("the offer's relay token is missing or too long")
        return cls(session_id, expires_at, relay_id, host, port, token)

    def same_session_as(self, other: SessionOffer) -> bool:
        """Whether ``other`` offers this very session again: the same id, expiry and relay
        (the relay token is minted afresh for each sending)."""
        return (self.session_id, self.expires_at, self.relay_id, self.relay_host,
                self.relay_port) == (other.session_id, other.expires_at, other.relay_id,
                                     other.relay_host, other.relay_port)  # fmt: skip


@dataclass(frozen=True)
class SessionIdentity:
    """Who this agent is, for grant checks and audit: from its state file."""

    agent_id: str
    team_id: str
    grant_keys: Mapping[str, PublicIdentity]


@dataclass
class SessionOutcome:
    """What one session did, for the ``session.ended`` record."""

    exit_status: ExitStatus | None = None
    reason: str = "normal"
    bytes_in: int = 0
    bytes_out: int = 0
    # When the rendezvous ended it: the Close (reason, message) the operator is sent.
    closing: tuple[str, str] | None = None


class EndSessionsRefused(AgentError):
    """An ``end_sessions`` message is malformed; nothing it names is ended."""


@dataclass(frozen=True)
class EndSessions:
    """An ``end_sessions`` message, checked for shape: which sessions to end, and why."""

    session_ids: tuple[str, ...]
    reason: str

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> EndSessions:
        """Parse an ``end_sessions`` control message; EndSessionsRefused says what is wrong."""
        ids = message.get("ids")
        if not isinstance(ids, list) or not 0 < len(ids) <= MAX_END_SESSION_IDS:
            raise EndSessionsRefused(
                f"end_sessions must list 1 to {MAX_END_SESSION_IDS} session ids"
            )
        if not all(isinstance(i, str) and 0 < len(i) <= MAX_SESSION_ID_LENGTH for i in ids):
            raise EndSessionsRefused("an end_sessions id is not a session id")
        reason = message.get("reason")
        if not isinstance(reason, str) or reason not in END_SESSIONS_REASONS:
            raise EndSessionsRefused(
                f"end_sessions must give one of the reasons {sorted(END_SESSIONS_REASONS)}"
            )
        return cls(tuple(ids), reason)


@dataclass
class _RunningSession:
    """One offer this process took, from its acknowledgement to its end: how to end it early."""

    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    # Set once the shell or command runs: from then on it is ended through ``end_requested``
    # (a Close to the operator, then the normal teardown) rather than by cancelling ``scope``.
    running: bool = False
    end_requested: trio.Event = field(default_factory=trio.Event)
    end_reason: str | None = None

    def end(self, reason: str) -> bool:
        """Ask the session to end for ``reason``; False if it was asked already."""
        if self.end_reason is not None:
            return False
        self.end_reason = reason
        self.end_requested.set()
        if not self.running:
            self.scope.cancel()
        return True


class EndedSessionIds:
    """Session ids the rendezvous asked to end before their offer arrived, each remembered for
    ``ttl`` seconds, at most ``capacity`` at once (the oldest forgotten first)."""

    def __init__(self, ttl: float, capacity: int = MAX_REMEMBERED_ENDED_SESSIONS) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._reasons: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def remember(self, session_id: str, reason: str, now: float) -> None:
        """Remember that ``session_id`` was ended for ``reason`` at ``now``."""
        self._forget_expired(now)
        self._reasons.pop(session_id, None)
        while len(self._reasons) >= self._capacity:
            self._reasons.popitem(last=False)
        self._reasons[session_id] = (now, reason)

    def reason(self, session_id: str, now: float) -> str | None:
        """Why ``session_id`` was ended, if it is remembered; else None."""
        self._forget_expired(now)
        remembered = self._reasons.get(session_id)
        return None if remembered is None else remembered[1]

    def __len__(self) -> int:
        return len(self._reasons)

    def _forget_expired(self, now: float) -> None:
        while self._reasons:
            _, (ended_at, _) = next(iter(self._reasons.items()))
            if ended_at + self._ttl >= now:
                break
            self._reasons.popitem(last=False)


class SessionRefusal(Exception):
    """The session is refused after the handshake; sent to the operator as a Close message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class SessionHost:
    """Takes session offers and runs each session in its own task under ``nursery``."""

    def __init__(
        self,
        config: AgentConfig,
        identity: SigningIdentity,
        who: SessionIdentity,
        auditor: SessionAuditor,
        *,
        send_control: ControlSender,
        audit_sink: AuditSink,
        issuer: Callable[[], str | None],
        policy: GrantPolicy,
        connect_relay: RelayConnector = connect_tcp,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._policy = policy
        self._identity = identity
        self._who = who
        self._auditor = auditor
        self._send_control = send_control
        self._audit_sink = audit_sink
        self._issuer = issuer
        self._connect_relay = connect_relay
        self._wall_clock = wall_clock
        self._seen_sessions = NonceCache(ttl=SESSION_ID_MEMORY_SECONDS)
        self._ended_before_offer = EndedSessionIds(ttl=SESSION_ID_MEMORY_SECONDS)
        # The offers acknowledged and not ended yet, by session id.
        self._offered: dict[str, SessionOffer] = {}
        self._running: dict[str, _RunningSession] = {}
        # Set while no session runs; a new one is made when the first session is accepted.
        self._all_ended = trio.Event()
        self._all_ended.set()
        self.active_sessions = 0

    def live_session_ids(self) -> frozenset[str]:
        """The sessions this process runs now: from the offer it acknowledged to the session's
        end (the control channel reports them on each connect and waits for them on a stop)."""
        return frozenset(self._offered)

    async def wait_all_ended(self) -> None:
        """Return once no session runs (at once if none does): the control channel's stop
        drain waits on this rather than polling."""
        while self._offered:
            await self._all_ended.wait()

    def offer_handler(self, nursery: trio.Nursery) -> Callable[[dict[str, Any]], None]:
        """A control-channel offer callback that runs each accepted offer under ``nursery``."""

        def on_offer(message: dict[str, Any]) -> None:
            if message.get("type") == "end_sessions":
                # The same callback carries the rendezvous's other session message.
                self.end_sessions(message)
                return
            offer = self.accept_offer(message)
            if offer is not None:
                nursery.start_soon(self.run_offer, offer, name=f"session {offer.session_id}")

        return on_offer

    def end_sessions(self, message: Mapping[str, Any]) -> int:
        """End at once the sessions an ``end_sessions`` message names that this process runs;
        how many. The others are remembered, so that their offer, should it still come, is
        refused. A malformed message ends nothing and is logged."""
        try:
            request = EndSessions.from_message(message)
        except EndSessionsRefused as error:
            logger.warning("refused an end_sessions message from the rendezvous: %s", error)
            return 0
        ended = 0
        for session_id in request.session_ids:
            running = self._running.get(session_id)
            if running is None:
                self._ended_before_offer.remember(session_id, request.reason, self._wall_clock())
            elif running.end(request.reason):
                ended += 1
        logger.warning(
            "the rendezvous asked to end %d session(s) (%s): ending the %d this agent runs",
            len(request.session_ids), request.reason, ended,
        )  # fmt: skip
        return ended

    def accept_offer(self, message: Mapping[str, Any]) -> SessionOffer | None:
        """Check an offer and answer it on the control channel; the offer to run, or None."""
        try:
            offer = SessionOffer.from_message(message)
        except OfferError as error:
            session_id = message.get("session_id")
            logger.warning("refusing a malformed session offer: %s", error)
            if isinstance(session_id, str) and len(session_id) <= MAX_SESSION_ID_LENGTH:
                self._refuse_offer(session_id, str(error))
            return None
        held = self._offered.get(offer.session_id)
        if held is not None:
            if held.same_session_as(offer):
                # The rendezvous may send an offer again when the ack of the first was lost
                # with its channel: answer as the first time (a refusal would mark refused a
                # session this agent runs), and run it only once. Looked up before the expiry:
                # the repeat (a catch-up) may come after it, and the session runs regardless.
                logger.info("session %s was offered again; it runs already", offer.session_id)
                self._send_control({"type": "session_offer_ack", "session_id": offer.session_id})
                return None
            self._refuse_offer(offer.session_id, "this session was already offered")
            return None
        if self._wall_clock() > offer.expires_at + OFFER_EXPIRY_LEEWAY_SECONDS:
            self._refuse_offer(offer.session_id, "the offer expired before it arrived")
            return None
        ended_reason = self._ended_before_offer.reason(offer.session_id, self._wall_clock())
        if ended_reason is not None:
            # The rendezvous ended it while the offer was on its way (its operator was
            # disabled meanwhile): it never runs.
            text = END_SESSIONS_REASONS[ended_reason]
            logger.warning("refusing the offer of session %s: %s", offer.session_id, text)
            self._refuse_offer(offer.session_id, text)
            self._audit(self._auditor.refused(offer.session_id, ended_reason, text, None))
            return None
        if self.active_sessions >= self._config.max_sessions:
            self._refuse_offer(
                offer.session_id,
                f"the agent is running its maximum of {self._config.max_sessions} sessions",
            )
            return None
        if not self._offered:
            self._all_ended = trio.Event()
        self._offered[offer.session_id] = offer
        # From the ack on, an end_sessions request can name it (before its task even starts).
        self._running[offer.session_id] = _RunningSession()
        self.active_sessions += 1
        self._send_control({"type": "session_offer_ack", "session_id": offer.session_id})
        return offer

    async def run_offer(self, offer: SessionOffer) -> None:
        """Connect to the relay and run the session; never raises (each failure is logged)."""
        running = self._running.setdefault(offer.session_id, _RunningSession())
        try:
            with running.scope:
                await self._connect_and_serve(offer)
            if running.scope.cancelled_caught and running.end_reason is not None:
                # Ended by the rendezvous before the shell or command started.
                text = END_SESSIONS_REASONS[running.end_reason]
                logger.warning("session %s abandoned before it started: %s",
                               offer.session_id, text)  # fmt: skip
                self._audit(self._auditor.refused(offer.session_id, running.end_reason, text, None))
        except Exception:
            logger.exception("session %s failed", offer.session_id)
        finally:
            self._running.pop(offer.session_id, None)
            self.active_sessions -= 1
            self._offered.pop(offer.session_id, None)
            if not self._offered:
                self._all_ended.set()

    async def _connect_and_serve(self, offer: SessionOffer) -> None:
        try:
            stream = await self._connect_relay(
                offer.relay_host,
                offer.relay_port,
                offer.relay_token,
                connect_timeout=RELAY_CONNECT_TIMEOUT_SECONDS,
                pair_timeout=RELAY_PAIR_TIMEOUT_SECONDS,
            )
        except (OSError, RelayError, trio.TooSlowError) as error:
            logger.warning(
                "session %s: cannot reach relay %s at %s:%d: %s",
                offer.session_id, offer.relay_id, offer.relay_host, offer.relay_port, error,
            )
            self._audit(
                self._auditor.refused(
                    offer.session_id, "relay-unreachable", f"relay unreachable: {error}", None
                )
            )
            return
        async with stream:
            await self.serve(stream, offer.session_id)

    async def serve(self, stream: trio.abc.Stream, session_id: str) -> None:
        """Run the handshake and then the session over a paired relay stream."""
        link = FrameLink(stream)
        accepted = await self._handshake(link, session_id)
        if accepted is None:
            return
        channel, grant, operator, decision = accepted
        await self._run_session(link, channel, grant, operator, decision)

    # ---- handshake ---------------------------------------------------------------------

    async def _handshake(
        self, link: FrameLink, session_id: str
    ) -> tuple[SecureChannel, SessionGrant, PublicIdentity, LocalDecision] | None:
        verified: list[SessionGrant] = []
        decided: list[LocalDecision] = []
        presented: list[PublicIdentity] = []

        def check_grant(grant: str | bytes, operator: PublicIdentity) -> str | None:
            presented.append(operator)
            if not isinstance(grant, str):
                return "session grant refused: it must be a JWT (text)"
            issuer = self._issuer()
            if issuer is None:
                return "the agent has not learned its rendezvous's issuer yet; try again"
            result = verify_session_grant(
                grant,
                self._who.grant_keys,
                issuer=issuer,
                agent_id=self._who.agent_id,
                team_id=self._who.team_id,
                session_id=session_id,
                operator_key_thumbprint=operator.key_id,
                now=self._wall_clock(),
            )
            try:
                self._seen_sessions.check_and_remember(session_id, self._wall_clock())
            except ProtocolError:
                return "session grant refused: this session id was already used"
            try:
                decision = self._policy.check(result, operator.key_id, self._wall_clock())
            except GrantPolicyRefused as refusal:
                return refusal.reason
            # Who, what and as whom, as sshd's "Accepted publickey for ..." line says it.
            logger.info(
                "session %s: accepted %s for %s (%s, key %s) as user %s%s; "
                "policy version %d: %s (%s)",
                session_id, result.mode.value, _printable(result.operator_email, 320),
                _printable(result.operator_id, 128), operator.fingerprint,
                self._session_user(), _described_command(result),
                decision.policy_version, decision.result.value,
                decision.rule_id or "mode default",
            )  # fmt: skip
            if result.mode is SessionMode.EXEC and result.command is not None:
                logger.debug(
                    "session %s: command %s", session_id,
                    _printable(shlex.join(result.command), MAX_LOGGED_COMMAND_CHARACTERS),
                )  # fmt: skip
            verified.append(result)
            decided.append(decision)
            return None

        timeout = self._config.handshake_timeout_seconds
        handshake = AgentHandshake(
            self._identity, session_id, check_grant, deadline=time.monotonic() + timeout
        )
        operator_fingerprint: str | None = None
        with trio.move_on_after(timeout) as scope:
            try:
                hello = await link.receive()
                if hello is None:
                    raise _HandshakeAbandoned("the operator left before the handshake")
                await link.send(handshake.receive(hello, time.monotonic()))
                auth = await link.receive()
                if auth is None:
                    raise _HandshakeAbandoned("the operator left during the handshake")
                try:
                    result = handshake.receive(auth, time.monotonic())
                except HandshakeRefused as refusal:
                    if refusal.reply is not None:
                        await link.send(refusal.reply)
                    operator_fingerprint = _fingerprint(presented[0] if presented else None)
                    logger.warning("session %s refused: %s", session_id, refusal.reason)
                    self._audit(
                        self._auditor.refused(
                            session_id, refusal.code, refusal.reason, operator_fingerprint
                        )
                    )
                    return None
                await link.send(result)
            except (_HandshakeAbandoned, ProtocolError, *LINK_CLOSED) as error:
                reason = str(error) or type(error).__name__
                logger.warning("session %s: handshake failed: %s", session_id, reason)
                self._audit(
                    self._auditor.refused(
                        session_id, RefusalCode.HANDSHAKE_FAILED.value, reason, None
                    )
                )
                return None
        if scope.cancelled_caught:
            logger.warning("session %s: the handshake timed out", session_id)
            self._audit(
                self._auditor.refused(
                    session_id, "timeout", f"the handshake did not finish in {timeout:.0f}s", None
                )
            )
            return None
        operator = handshake.peer_identity
        assert operator is not None and verified and decided
        return handshake.channel(time.monotonic()), verified[0], operator, decided[0]

    # ---- the session -------------------------------------------------------------------

    async def _run_session(
        self,
        link: FrameLink,
        channel: SecureChannel,
        grant: SessionGrant,
        operator: PublicIdentity,
        decision: LocalDecision,
    ) -> None:
        session_id = grant.session_id
        sealed = SealedLink(link, channel)
        try:
            with trio.fail_after(SESSION_START_TIMEOUT_SECONDS):
                start = await sealed.receive_session_start()
            check_start_matches_grant(start, grant)
            if start.pty:
                try:
                    self._policy.check_terminal(operator.key_id, self._wall_clock())
                except GrantPolicyRefused as refusal:
                    raise SessionRefusal("policy-denied", refusal.reason) from None
            opener = self._opener(start, grant)
            recorder = await self._open_recording(start, grant)
        except SessionRefusal as refusal:
            logger.warning("session %s refused: %s", session_id, refusal.message)
            self._audit(
                self._auditor.refused(
                    session_id, refusal.reason, refusal.message, operator.fingerprint
                )
            )
            await sealed.close_quietly(refusal.reason, refusal.message)
            return
        except trio.TooSlowError:
            self._audit(
                self._auditor.refused(
                    session_id, "timeout", "no session start arrived", operator.fingerprint
                )
            )
            await sealed.close_quietly("timeout", "no session start arrived in time")
            return
        except (ProtocolError, *LINK_CLOSED) as error:
            self._audit(
                self._auditor.refused(
                    session_id, "protocol-error", str(error), operator.fingerprint
                )
            )
            await sealed.close_quietly("protocol-error", str(error))
            return
        running = self._running.get(session_id)  # None when serve() was called directly
        if running is not None:
            if running.end_reason is not None:
                await trio.lowlevel.checkpoint()  # its scope is cancelled: this raises Cancelled
            # From here an end_sessions request ends it through the pump, not by cancelling.
            running.running = True
        self._audit(
            self._auditor.started(grant, operator.fingerprint, decision, terminal=start.pty)
        )
        if grant.mode is SessionMode.EXEC:
            self._audit(self._auditor.command(grant, start.command))
        outcome = SessionOutcome()
        began = time.monotonic()
        try:
            await self._pump(sealed, opener, outcome, recorder, running)
        except BaseException:
            # Only cancellation from outside gets here (the daemon is stopping): say so.
            outcome.reason = "shutdown"
            await sealed.close_quietly("shutdown", "the agent is shutting down")
            raise
        finally:
            outcome.bytes_in, outcome.bytes_out = sealed.bytes_in, sealed.bytes_out
            logger.info(
                "session %s ended (%s): %s after %.1f s, %d bytes in, %d bytes out (%s by %s)",
                session_id, outcome.reason, describe_exit(outcome.exit_status),
                time.monotonic() - began, outcome.bytes_in, outcome.bytes_out, grant.mode.value,
                _printable(grant.operator_email, 320),
            )  # fmt: skip
            recording = None if recorder is None else (await recorder.close()).audit_context()
            self._audit(
                self._auditor.ended(
                    session_id,
                    duration_ms=int((time.monotonic() - began) * 1000),
                    exit_status=outcome.exit_status,
                    bytes_in=outcome.bytes_in,
                    bytes_out=outcome.bytes_out,
                    reason=outcome.reason,
                    recording=recording,
                )
            )

    async def _open_recording(
        self, start: SessionStart, grant: SessionGrant
    ) -> SessionRecorder | None:
        """The session's recorder when recording is on. A recording that cannot be created
        refuses the session: with recording on, no session runs unrecorded."""
        config = self._config
        if not config.record_sessions:
            return None
        terminal = grant.mode is SessionMode.SHELL or start.pty
        try:
            return await SessionRecorder.create(
                config.recordings_path,
                grant.session_id,
                width=start.cols if terminal else 80,
                height=start.rows if terminal else 24,
                term=start.terminal_type if terminal else None,
                title=f"tucdesk {grant.mode.value} session {grant.session_id}",
                max_bytes=config.max_recording_bytes,
                wall_clock=self._wall_clock,
            )
        except RecordingError as error:
            logger.error("session %s refused: %s", grant.session_id, error)
            raise SessionRefusal(
                "internal-error",
                "the agent must record every session and cannot record this one "
                f"({error.reason})",
            ) from None

    def _opener(
        self, start: SessionStart, grant: SessionGrant
    ) -> Callable[[], AbstractAsyncContextManager[LocalSession]]:
        config = self._config
        # The operator as the grant names them: the email, or the id if the email is not plain
        # printable text (session_variables leaves out what is not).
        variables = session_variables(grant.session_id, grant.operator_email)
        if "TUCDESK_OPERATOR" not in dict(variables):
            variables = session_variables(grant.session_id, grant.operator_id)
        try:
            if grant.mode is SessionMode.SHELL or start.pty:
                # A shell, or an exec on a terminal (exec -t): the command as an argv, as on
                # pipes, with a login record as sshd writes one for any session with a PTY.
                pty_spec = PtySessionSpec(
                    term=start.terminal_type,
                    rows=start.rows,
                    cols=start.cols,
                    user=config.user,
                    shell=config.shell,
                    command=list(start.command) if start.pty else None,
                    environment=start.env,
                    session_variables=variables,
                    kill_leftover_processes=config.kill_leftover_processes,
                    umask=config.session_umask_bits,
                    login_records=LoginRecordFiles(config.utmp_file, config.wtmp_file),
                    operator=dict(variables).get("TUCDESK_OPERATOR", ""),
                )
                return lambda: open_pty_session(pty_spec)
            exec_spec = ExecSessionSpec(
                command=list(start.command),
                user=config.user,
                environment=start.env,
                session_variables=variables,
                kill_leftover_processes=config.kill_leftover_processes,
                umask=config.session_umask_bits,
            )
            return lambda: open_exec_session(exec_spec)
        except SessionProcessError as error:
            raise SessionRefusal("internal-error", str(error)) from None

    async def _pump(
        self,
        sealed: SealedLink,
        opener: Callable[[], AbstractAsyncContextManager[LocalSession]],
        outcome: SessionOutcome,
        recorder: SessionRecorder | None = None,
        running: _RunningSession | None = None,
    ) -> None:
        # Nurseries wrap what escapes them in exception groups, hence except*.
        opened: list[LocalSession] = []
        # Set when the operator's link dies without a CLOSE, whichever task notices (a receive,
        # or a send of output, a heartbeat, a keepalive reply): the session is then hung up.
        link_lost = sealed.lost
        try:
            async with opener() as local:
                opened.append(local)
                async with trio.open_nursery() as nursery:
                    await self._run_local(
                        sealed, local, outcome, nursery, recorder, running, link_lost
                    )
                if running is not None and running.end_requested.is_set():
                    # The rendezvous ended it (an admin disabled the operator, revoked the
                    # session): a forced end, even if the link died first and the session was
                    # being hung up. Raised out of the opener, which then tears it all down.
                    _note_end_request(running, outcome)
                    raise _EndRequested
            if link_lost.is_set():
                pass  # nobody is left to tell
            elif outcome.closing is not None:
                await sealed.close_quietly(*outcome.closing)
            else:
                await sealed.send_exit(outcome.exit_status)
        except* _EndRequested:
            if not link_lost.is_set() and outcome.closing is not None:
                await sealed.close_quietly(*outcome.closing)
        except* CommandNotStarted as group:
            # As a shell would: the reason on stderr, then exit 127 (not found) or 126.
            failure = group.exceptions[0]
            assert isinstance(failure, CommandNotStarted)
            message = f"{AGENT_PROGRAM}: {failure}\n".encode()
            await sealed.send_output(FrameType.STDERR, message)
            if recorder is not None:
                with suppress(RecordingFailed):  # the session ends here anyway
                    await recorder.output(OutputStream.STDERR, message)
            outcome.exit_status = ExitStatus(code=failure.exit_code)
            await sealed.send_exit(outcome.exit_status)
        except* RecordingFailed as group:
            # With recording on, no session runs unrecorded: one that can no longer be
            # recorded (disk full) ends, and the operator is told why.
            outcome.reason = "recording-failed"
            await sealed.close_quietly(
                "internal-error",
                f"the agent must record every session and {group.exceptions[0]}",
            )
        except* SessionProcessError as group:
            outcome.reason = "internal-error"
            await sealed.close_quietly("internal-error", str(group.exceptions[0]))
        except* LINK_CLOSED:
            if outcome.reason == "normal":
                outcome.reason = "connection-lost"
        finally:
            # Ended early after the main process exited (an exec session still reading what it
            # left behind): the record still says how the main process ended.
            if outcome.exit_status is None and opened:
                outcome.exit_status = opened[0].exit_status

    async def _run_local(
        self,
        sealed: SealedLink,
        local: LocalSession,
        outcome: SessionOutcome,
        nursery: trio.Nursery,
        recorder: SessionRecorder | None,
        running: _RunningSession | None,
        link_lost: trio.Event,
    ) -> None:
        """The session's tasks in ``nursery``: input, heartbeats, the hang-up on a lost link,
        the rendezvous's end request, and output until ``local.run`` returns."""
        forward = self._forward_input
        nursery.start_soon(forward, sealed, local, outcome, nursery, recorder, link_lost)
        nursery.start_soon(sealed.send_heartbeats)
        nursery.start_soon(_hang_up_when_lost, link_lost, sealed, local, outcome, nursery, running)
        if running is not None:
            nursery.start_soon(_end_when_asked, running, outcome, nursery)

        async def send_output(kind: FrameType, data: bytes) -> bool:
            # False once the link is gone: output is dropped while the session hangs up.
            try:
                await sealed.send_output(kind, data)
            except LINK_CLOSED:
                link_lost.set()
                return False
            return True

        async def on_output(stream: OutputStream, data: bytes) -> None:
            kind = FrameType.STDERR if stream is OutputStream.STDERR else FrameType.STDOUT
            await send_output(kind, data)

        if recorder is not None:
            # Writes what waits at most FLUSH_INTERVAL_SECONDS after it arrived; raises
            # RecordingFailed (ending the session) if the disk can take no more.
            nursery.start_soon(recorder.flush_periodically)

            # A separate handler, so that with recording off the output path is as it was.
            async def on_output_recorded(stream: OutputStream, data: bytes) -> None:
                kind = FrameType.STDERR if stream is OutputStream.STDERR else FrameType.STDOUT
                if await send_output(kind, data):  # only what the operator was sent
                    await recorder.output(stream, data)

            on_output = on_output_recorded

        status = await local.run(on_output)
        outcome.exit_status = status
        nursery.cancel_scope.cancel()

    async def _forward_input(
        self,
        sealed: SealedLink,
        local: LocalSession,
        outcome: SessionOutcome,
        nursery: trio.Nursery,
        recorder: SessionRecorder | None = None,
        link_lost: trio.Event | None = None,
    ) -> None:
        """Operator -> child: keystrokes and stdin, resizes, signals, until the operator leaves.

        The operator's CLOSE ends the session (torn down); a link that ends without one sets
        ``link_lost`` (the session is hung up) and is ``connection-lost``: the relay passes on a
        dead connection's end as a plain end of stream, which is not the operator leaving.
        Nothing typed is recorded (keystrokes include passwords); resizes are."""
        try:
            while True:
                frame = await sealed.receive()
                if frame is None:
                    outcome.reason = "connection-lost"
                    if link_lost is not None:
                        link_lost.set()
                        return
                    break
                kind, payload = frame
                if kind is FrameType.DATA:
                    if payload:
                        await local.send_input(payload)
                    else:
                        await local.close_input()
                elif kind is FrameType.CONTROL:
                    message = decode_control(payload)
                    if isinstance(message, Resize):
                        local.resize(message.rows, message.cols)
                        if recorder is not None:
                            await recorder.resize(message.cols, message.rows)
                    elif isinstance(message, Signal):
                        local.signal(message.name)
                    elif isinstance(message, Close):
                        outcome.reason = operator_close_reason(message)
                        break
                    elif isinstance(message, Keepalive):
                        if not message.reply:  # the operator asks whether we are still here
                            await sealed.send_keepalive_reply()
                    else:
                        raise SessionRefusal(
                            "protocol-error", f"unexpected {type(message).__name__} mid-session"
                        )
                elif kind is FrameType.CLOSE:
                    outcome.reason = "operator-disconnected"
                    break
        except SessionRefusal as refusal:
            outcome.reason = refusal.reason
            await sealed.close_quietly(refusal.reason, refusal.message)
        except (ProtocolError, SessionProcessError) as error:
            outcome.reason = "protocol-error"
            await sealed.close_quietly("protocol-error", str(error))
        except OSError as error:
            outcome.reason = "internal-error"
            await sealed.close_quietly("internal-error", f"input to the session failed: {error}")
        except LINK_CLOSED:
            outcome.reason = "connection-lost"
            if link_lost is not None:
                link_lost.set()
                return
        # Whatever else ended the input side ends the session: the child is torn down on the
        # way out.
        nursery.cancel_scope.cancel()

    async def recover_interrupted_recordings(self) -> None:
        """At start: mark the recordings a stopped agent left unfinished as interrupted, warn
        about each, and send a signed ``session.ended`` (reason "interrupted") binding each
        marked file's hash, as the session's own end would have."""
        directory = self._config.recordings_path
        recovered = await trio.to_thread.run_sync(recover_interrupted_recordings, directory)
        for item in recovered:
            logger.warning(
                "recording %s in %s was left unfinished: the agent stopped during session %s "
                "(its last output %.1f s in); marked interrupted, %d bytes, sha256 %s",
                item.summary.file, directory, item.session_id, item.duration_ms / 1000,
                item.summary.bytes, item.summary.sha256,
            )  # fmt: skip
            self._audit(
                self._auditor.interrupted(
                    item.session_id, item.duration_ms, item.summary.audit_context()
                )
            )

    def _session_user(self) -> str:
        if self._config.user is not None:
            return _printable(self._config.user, 64)
        try:
            return pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            return f"uid {os.geteuid()}"

    def _refuse_offer(self, session_id: str, reason: str) -> None:
        self._send_control(
            {"type": "session_offer_refused", "session_id": session_id, "reason": reason}
        )

    def _audit(self, event: SignedEvent) -> None:
        try:
            self._audit_sink(event)
        except Exception:
            logger.exception("could not queue an audit event")


async def _hang_up_when_lost(
    link_lost: trio.Event,
    sealed: SealedLink,
    local: LocalSession,
    outcome: SessionOutcome,
    nursery: trio.Nursery,
    running: _RunningSession | None = None,
) -> None:
    """Once the operator's link has died without a CLOSE, end the session as sshd's dead
    connection does: hang it up, and let ``run`` end it (its main process exits on SIGHUP; what
    ignores SIGHUP runs on). A main process still running after HANG_UP_WAIT_SECONDS is left
    too: ``open_pty_session``/``open_exec_session`` tear down only a forced end. The
    rendezvous's end request wins over a hang-up, before it or during the wait (``_pump``
    raises ``_EndRequested`` out of the opener, which then tears everything down)."""
    await link_lost.wait()
    if running is not None and running.end_requested.is_set():
        return  # a forced end is under way
    if outcome.closing is None:
        outcome.reason = "connection-lost"
    await sealed.abort()
    local.hang_up()
    await trio.sleep(HANG_UP_WAIT_SECONDS)
    nursery.cancel_scope.cancel()


class _EndRequested(Exception):
    """Raised out of the session's opener when the rendezvous asked to end the session, so that
    it is torn down (a forced end), even one the lost link had begun to hang up."""


def _note_end_request(running: _RunningSession, outcome: SessionOutcome) -> None:
    """Record the rendezvous's end request in ``outcome``: its reason for ``session.ended``,
    and the Close telling the operator why."""
    reason = running.end_reason or "operator_disabled"
    outcome.reason = reason
    outcome.closing = (END_SESSIONS_CLOSE_REASON, END_SESSIONS_REASONS.get(reason, reason))


def operator_close_reason(message: Close) -> str:
    """The ``session.ended`` reason for the operator's Close: ``operator-disconnected`` for a
    CLI leaving as asked (``~.``, Ctrl-C, the end of its session), else ``operator-closed (R)``."""
    if message.reason == "normal":
        return "operator-disconnected"
    return f"operator-closed ({message.reason})"


async def _end_when_asked(
    running: _RunningSession, outcome: SessionOutcome, nursery: trio.Nursery
) -> None:
    """Wait for an end_sessions request; then end the session as the operator leaving would,
    with the reason for the record and a Close telling the operator why."""
    await running.end_requested.wait()
    _note_end_request(running, outcome)
    nursery.cancel_scope.cancel()


def check_start_matches_grant(start: SessionStart, grant: SessionGrant) -> None:
    """Refuse (policy-denied) a SessionStart whose mode or command differs from the grant's."""
    if start.mode != grant.mode.value:
        raise SessionRefusal(
            "policy-denied",
            f"the grant allows a {grant.mode.value} session, not {start.mode}",
        )
    if grant.mode is SessionMode.EXEC and tuple(start.command) != tuple(grant.command or ()):
        raise SessionRefusal(
            "policy-denied", "the command differs from the one the grant allows"
        )


class _HandshakeAbandoned(Exception):
    """The operator closed the connection before the handshake finished."""


class FrameLink:
    """Length-prefixed messages over a relay stream: one reader, serialised writers.

    Received frames are views of one reusable buffer (protocol.stream_framing.StreamFrameBuffer)
    that a socket receives straight into; several frames ready together go out in one write.
    On a socket the link does its own non-blocking reads and writes: each system call costs
    tens of microseconds here, and trio's socket methods add a scheduler pass to each one.
    """

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._frames = StreamFrameBuffer(RECEIVE_BUFFER_SIZE)
        self._send_lock = trio.Lock()
        self._ended = False
        # After a large receive more is likely waiting: read before waiting for readiness.
        self._more_expected = False
        self._frames_without_yield = 0

    async def receive(self) -> bytes | None:
        """The next message, or None when the peer closed the stream at a message boundary."""
        frame = await self.receive_view()
        return None if frame is None else bytes(frame)

    async def receive_view(self) -> memoryview | None:
        """``receive`` without the copy: a view valid until the next receive."""
        frames = self._frames
        while True:
            frame = frames.next_frame()
            if frame is not None:
                self._frames_without_yield += 1
                if self._frames_without_yield >= MAX_FRAMES_WITHOUT_YIELD:
                    self._frames_without_yield = 0
                    await trio.lowlevel.checkpoint()
                return frame
            if self._ended:
                return None
            space = frames.writable()
            if self._socket is not None:
                count = await self._receive_from_socket(self._socket, space)
                if count is None:
                    continue
            else:
                data = await self._stream.receive_some(len(space))
                count = len(data)
                space[:count] = data
            if not count:
                self._ended = True
                frames.finish()
                return None
            frames.commit(count)

    async def _receive_from_socket(
        self, sock: trio.socket.SocketType, space: memoryview
    ) -> int | None:
        """Bytes received into ``space`` (0 at end of stream), or None if there were none yet."""
        if not self._more_expected:
            await trio.lowlevel.wait_readable(sock)
            self._frames_without_yield = 0
        try:
            count = os.readv(sock.fileno(), [space])
        except BlockingIOError:
            self._more_expected = False
            return None
        except OSError as error:
            raise link_error(error) from None
        self._more_expected = count >= LARGE_RECEIVE_BYTES
        return count

    async def send(self, message: bytes) -> None:
        """Send one message; concurrent senders take turns, whole messages at a time."""
        await self._send_pieces([encode_stream_frame(message)])

    async def send_sealed(self, frames: Sequence[SealedParts]) -> None:
        """Send sealed frames given as (header, body) in one write, each with its prefix."""
        if self._socket is None:
            await self._send_pieces([encode_stream_frames(frames)])
            return
        pieces: list[bytes] = []
        for header, body in frames:
            pieces += (length_prefix(len(header) + len(body)), header, body)
        await self._send_pieces(pieces)

    async def abort(self) -> None:
        """Close the stream at once: a send waiting for room on a dead connection gives up."""
        await trio.aclose_forcefully(self._stream)

    async def _send_pieces(self, pieces: list[bytes]) -> None:
        if self._socket is not None:
            await send_gathered_in_turn(self._socket, pieces, self._send_lock)
            return
        lock = self._send_lock
        await acquire_at_once(lock)
        try:
            await self._stream.send_all(b"".join(pieces))
        finally:
            lock.release()


class SealedLink:
    """The session's frames over a FrameLink: sealing, opening and the byte counters."""

    def __init__(self, link: FrameLink, channel: SecureChannel) -> None:
        self._link = link
        self._channel = channel
        self._closed = False
        self._last_sent = time.monotonic()
        # Set once a receive or send found the link dead (by the session's tasks; heartbeats
        # here), so that the session is hung up whichever task noticed: even while the input
        # side waits to write to a command that reads nothing and prints nothing.
        self.lost = trio.Event()
        self.bytes_in = 0
        self.bytes_out = 0

    async def receive(self) -> tuple[FrameType, bytes] | None:
        """The next opened frame's type and payload; None once the operator's stream ended."""
        message = await self._link.receive_view()
        if message is None:
            return None
        frame = self._channel.open_parts(
            bytes(message[:HEADER_SIZE]), message[HEADER_SIZE:], time.monotonic()
        )
        if frame.type is FrameType.DATA:
            self.bytes_in += len(frame.payload)
        return frame.type, frame.payload

    async def receive_session_start(self) -> SessionStart:
        """The first frame, which must be a CONTROL SessionStart."""
        frame = await self.receive()
        if frame is None:
            raise SessionRefusal("normal", "the operator left before starting the session")
        kind, payload = frame
        if kind is not FrameType.CONTROL:
            raise SessionRefusal("protocol-error", "the first frame must be a session start")
        message = decode_control(payload)
        if not isinstance(message, SessionStart):
            raise SessionRefusal("protocol-error", "the first frame must be a session start")
        return message

    async def send_output(self, kind: FrameType, data: bytes | memoryview) -> None:
        """Seal child output as STDOUT/STDERR frames of at most MAX_FRAME_PAYLOAD bytes, sent
        together in one write; waits while the relay is full."""
        if self._closed:
            raise trio.ClosedResourceError("the session already sent CLOSE")
        seal, now = self._channel.seal_parts, time.monotonic()
        self._last_sent = now
        size = len(data)
        if size <= MAX_FRAME_PAYLOAD:
            frames = [seal(kind, data, now)]  # type: ignore[arg-type]
        else:
            view = memoryview(data)
            frames = [
                seal(kind, view[offset : offset + MAX_FRAME_PAYLOAD], now)  # type: ignore[arg-type]
                for offset in range(0, size, MAX_FRAME_PAYLOAD)
            ]
        await self._link.send_sealed(frames)
        self.bytes_out += size

    async def send_exit(self, status: ExitStatus | None) -> None:
        """ExitStatus (exactly once, when there is one), then CLOSE."""
        if status is not None:
            message = ExitStatusMessage(code=status.code, signal=status.signal)
            await self._send(FrameType.CONTROL, encode_control(message))
        await self._send_close()

    async def close_quietly(self, reason: str, text: str) -> None:
        """Tell the operator why the session ends (Close, then CLOSE); ignore a dead link."""
        with trio.move_on_after(CLOSE_SEND_TIMEOUT_SECONDS, shield=True):
            try:
                if not self._closed:
                    message = Close(reason=reason, message=text[:1024])
                    await self._send(FrameType.CONTROL, encode_control(message))
                await self._send_close()
            except (ProtocolError, *LINK_CLOSED):
                pass

    async def _send_close(self) -> None:
        if self._closed:
            return
        await self._send(FrameType.CLOSE, b"")
        self._closed = True

    async def abort(self) -> None:
        """The link died: send nothing more (output is dropped) and close the stream."""
        self._closed = True
        await self._link.abort()

    async def send_keepalive_reply(self) -> None:
        """Answer the operator's keepalive (a CONTROL frame), so an idle session is not lost."""
        await self._send(FrameType.CONTROL, _KEEPALIVE_REPLY)

    async def send_heartbeats(self) -> None:
        """Run beside the session: whenever nothing went to the operator for
        HEARTBEAT_INTERVAL_SECONDS, send a Keepalive, whatever the input side is waiting for."""
        while not self._closed:
            due = self._last_sent + HEARTBEAT_INTERVAL_SECONDS
            await trio.sleep(max(0.0, due - time.monotonic()))
            if self._closed or time.monotonic() < self._last_sent + HEARTBEAT_INTERVAL_SECONDS:
                continue
            try:
                await self._send(FrameType.CONTROL, _KEEPALIVE_REPLY)
            except ProtocolError:
                return
            except LINK_CLOSED:
                self.lost.set()  # nobody may be reading the link: say so here
                return

    async def _send(self, kind: FrameType, payload: bytes) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the session already sent CLOSE")
        self._last_sent = time.monotonic()
        await self._link.send_sealed([self._channel.seal_parts(kind, payload, time.monotonic())])


def describe_exit(status: ExitStatus | None) -> str:
    """How the session's process ended, in words: "exit 0", "killed by signal 9 (KILL)"."""
    if status is None:
        return "no exit status"
    if status.signal is not None:
        return f"killed by signal {status.signal} ({status.signal_name})"
    return f"exit {status.code}"


def _described_command(grant: SessionGrant) -> str:
    """For the INFO line: the program and a hash of the command line, which can carry secrets
    (``mysql -p...``) and the journal has more readers than the audit log (which holds it)."""
    if grant.mode is not SessionMode.EXEC or grant.command is None:
        return ""
    program = _printable(grant.command[0], MAX_LOGGED_PROGRAM_CHARACTERS) if grant.command else ""
    return f", command {program} (sha256 {command_digest(grant.command)})"


def command_digest(command: Sequence[str]) -> str:
    """The first LOGGED_DIGEST_HEX_DIGITS hex digits of the SHA-256 of ``shlex.join(command)``
    (UTF-8): enough to match a log line to the command in the audit log."""
    joined = shlex.join(command).encode("utf-8", "surrogatepass")
    return hashlib.sha256(joined).hexdigest()[:LOGGED_DIGEST_HEX_DIGITS]


def _printable(text: str, limit: int) -> str:
    """``text`` for a log line: control characters (newlines, escapes) as \\x.. escapes so
    nothing can forge a line or drive a terminal, cut to ``limit`` characters."""
    shown = "".join(
        character if character.isprintable() else repr(character)[1:-1] for character in text
    )
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _fingerprint(identity: PublicIdentity | None) -> str | None:
    return None if identity is None else identity.fingerprint

