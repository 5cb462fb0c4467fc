"""The operator's side of a session (docs/sessions.md): ask the rendezvous, meet the agent at the
relay, run the handshake with the agent's key checked against the known-agents pin, then speak
sealed frames.

``request_session`` is the HTTP step (token + request proof); ``open_session`` does the rest and
returns an OperatorSession whose ``send_*`` methods and ``receive`` carry the session. The
terminal, stdin and stdout live in connect.py and exec_command.py; nothing here prints.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import select
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import trio

from operator_cli.approval_requests import ApprovalFormatError, PendingApproval
from operator_cli.client import Session
from operator_cli.known_agents import (
    AgentKeyChangedError,
    AgentKeyNotPinnedError,
    KnownAgents,
    PinOutcome,
)
from protocol.control import (
    Close,
    ControlMessage,
    ExitStatus,
    Resize,
    SessionStart,
    Signal,
    decode_control,
    encode_control,
)
from protocol.errors import ProtocolError
from protocol.frames import HEADER_SIZE, MAX_FRAME_PAYLOAD, FrameType, SecureChannel
from protocol.handshake import HandshakeRefused, OperatorHandshake
from protocol.identity import PublicIdentity, SigningIdentity, b64url_decode
from protocol.stream_framing import (
    StreamFrameBuffer,
    encode_stream_frame,
    encode_stream_parts,
    length_prefix,
)
from relay.client import (
    PairingTimeout,
    acquire_at_once,
    connect_tcp,
    gathered_views,
    send_remaining,
    write_available,
)
from relay.errors import RelayError, RelayRefusedError

HANDSHAKE_TIMEOUT_SECONDS = 15.0
RELAY_CONNECT_TIMEOUT_SECONDS = 10.0
RELAY_PAIR_TIMEOUT_SECONDS = 30.0
# After this long without the agent at the relay, the caller is told (to say we are waiting).
SLOW_PAIRING_NOTICE_SECONDS = 2.0
CLOSE_SEND_TIMEOUT_SECONDS = 2.0
# The agent sends a Keepalive whenever it sent nothing for 15 s (agent/session_host.py
# HEARTBEAT_INTERVAL_SECONDS); after KEEPALIVE_TIMEOUT_SECONDS spent waiting for the agent
# without a byte, the CLI gives the session up: a dead host or a cut network sends nothing at
# all, not even a close (as ssh with ServerAliveInterval 15, ServerAliveCountMax 4). Time the CLI
# spends not reading (its output blocked by a paused pager, the process suspended) does not
# count. KEEPALIVE_INTERVAL_SECONDS is how often it looks.
KEEPALIVE_INTERVAL_SECONDS = 15.0
KEEPALIVE_TIMEOUT_SECONDS = 60.0
# keep_alive waking this many intervals late means the process was stopped or the machine slept.
LATE_WAKE_FACTOR = 2
REFUSAL_POLL_SECONDS = 1.0
MAX_TARGET_LENGTH = 256
HTTP_ACCEPTED = 202
# A receive at least this large suggests more is waiting: read again before waiting.
LARGE_RECEIVE_BYTES = 16 * 1024
# Allocations between young-generation collections once a session is open (CPython: 700).
GC_YOUNG_THRESHOLD = 20_000


class SessionError(Exception):
    """A session could not be opened or ended abnormally; the message is for the operator."""


class SessionRefused(SessionError):
    """The agent (or the rendezvous before it) refused the session, with its reason."""


class ConnectionLost(SessionError):
    """The connection through the relay ended before the session did."""


class PairingTimedOut(SessionError):
    """The relay took our token, but the agent never joined within the pairing wait."""


@dataclass(frozen=True)
class SessionTicket:
    """The rendezvous's answer to POST /v1/sessions: who to meet, where, and with what."""

    session_id: str
    expires_at: float
    agent_id: str
    agent_name: str
    agent_key: PublicIdentity
    grant: str
    relay_id: str
    relay_host: str
    relay_port: int
    relay_token: str
    # What the operator typed (an agent name or id), set by request_session: the name pin for
    # it is checked too, so a ticket whose id is that text cannot skip the pin for the name.
    requested_as: str | None = None

    @classmethod
    def from_response(cls, body: Any) -> SessionTicket:
        """Parse and check the response body; SessionError if it is not what the contract says."""
        try:
            agent, relay = body["agent"], body["relay"]
            ticket = cls(
                session_id=_text(body["session_id"]),
                expires_at=float(body["expires_at"]),
                agent_id=_text(agent["id"]),
                agent_name=_text(agent.get("name") or agent["id"]),
                agent_key=PublicIdentity(b64url_decode(_text(agent["public_key"]), 64)),
                grant=_text(body["grant"]),
                relay_id=_text(relay["id"]),
                relay_host=_text(relay["host"]),
                relay_port=int(relay["port"]),
                relay_token=_text(body["relay_token"]),
            )
        except (KeyError, TypeError, ValueError, ProtocolError) as error:
            raise SessionError(
                f"the rendezvous answered the session request in an unexpected form "
                f"({type(error).__name__}); is the server the same TucDesk version?"
            ) from None
        if not 0 < ticket.relay_port < 65536:
            raise SessionError("the rendezvous named a relay with an invalid port")
        return ticket


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected text")
    return value


class ApprovalPending(SessionError):
    """The rendezvous parked the request until an approver confirms it (202)."""

    def __init__(self, pending: PendingApproval) -> None:
        super().__init__(f"the session needs approval first ({pending.request_id})")
        self.pending = pending


def request_session(
    api: Session,
    target: str,
    mode: Literal["shell", "exec"],
    command: list[str] | None = None,
    term: str = "xterm-256color",
    rows: int = 24,
    cols: int = 80,
    approval_id: str | None = None,
) -> SessionTicket:
    """POST /v1/sessions for ``target`` (an agent name or id); ApiError when refused.

    Raises ApprovalPending when the policy parks the request for an approver (202);
    ``approval_id`` names an approved request to redeem (docs/sessions.md §6).
    """
    if not target or len(target) > MAX_TARGET_LENGTH:
        raise SessionError(f"{target[:40]!r} is not an agent name or id")
    body: dict[str, Any] = {"target": target, "mode": mode, "term": term, "rows": rows,
                            "cols": cols}
    if mode == "exec":
        body["command"] = list(command or [])
    if approval_id is not None:
        body["approval_id"] = approval_id
    status, answer = api.request_with_status("POST", "/v1/sessions", body)
    if status == HTTP_ACCEPTED:
        try:
            pending = PendingApproval.from_response(answer)
        except ApprovalFormatError as error:
            raise SessionError(
                f"the rendezvous parked the session in an unexpected form ({error})"
            ) from None
        raise ApprovalPending(pending)
    ticket = SessionTicket.from_response(answer)
    if target != ticket.agent_id and target != ticket.agent_name:
        # An honest rendezvous resolves the target by exact id or name; a ticket for another
        # agent would sidestep the pin kept for the name the operator asked for.
        raise SessionError(
            f"the rendezvous answered for agent {ticket.agent_name!r} ({ticket.agent_id}), "
            f"not {target!r}; nothing was run"
        )
    # A ticket whose id is the typed text but whose name is another is checked against the
    # name pin for the typed text as well (AgentKeyPin).
    return dataclasses.replace(ticket, requested_as=target)


class AgentKeyPin:
    """The operator's check of the agent's handshake key: its known-agents pins.

    A pinned agent must present exactly the pinned key, and an agent id new under a name pinned
    on this server must present that name's pinned key (either change raises
    AgentKeyChangedError, which names both fingerprints and ``tucdesk agents trust``). An agent
    seen for the first time must present the key the rendezvous registered for it, which is then
    pinned for its id and its name; in strict mode (KnownAgents.strict) it is refused instead
    (AgentKeyNotPinnedError, which says how to pin the expected key). When the operator typed
    a name other than the ticket's (the ticket's id equals it), that name's pin is applied as
    well: a rendezvous cannot skip the pin for ``web1`` by answering with an agent whose id is
    ``web1`` and whose name is another.
    """

    def __init__(self, known_agents: KnownAgents, ticket: SessionTicket) -> None:
        self.known_agents = known_agents
        self.ticket = ticket
        self.first_use = False
        self.key_changed: AgentKeyChangedError | None = None
        # Strict mode and no pin for this agent: refused, and raised once the handshake ends.
        self.not_pinned: AgentKeyNotPinnedError | None = None
        # Set when the operator typed the id of an agent whose name other pinned agents share.
        self.shared_name_note: str | None = None

    def __call__(self, presented: PublicIdentity) -> str | None:
        """None when ``presented`` is the agent's expected key; otherwise the reason it is not."""
        agent_id = self.ticket.agent_id
        if self.known_agents.pinned_key(agent_id) is None and presented != self.ticket.agent_key:
            return (
                f"the agent presented key {presented.fingerprint}, but the rendezvous "
                f"registered {self.ticket.agent_key.fingerprint} for {agent_id}"
            )
        # The name the operator typed, and the id itself (a ticket whose id is a pinned name is
        # the same trick when the typed text is not known), are checked as names too.
        also_names = {self.ticket.requested_as, agent_id} - {None, self.ticket.agent_name}
        try:
            for name in sorted(name for name in also_names if name is not None):
                self.known_agents.check_name(name, agent_id, presented)
            # Typed by id: that id's own pin (or first use) judges, not the pin of a host name
            # other agents share; an agent reached by name is still held to the name's pin.
            by_id = self.ticket.requested_as == agent_id != self.ticket.agent_name
            sharing = {other for other, key in
                       self.known_agents.pins_for_name(self.ticket.agent_name).items()
                       if other != agent_id and key != presented} if by_id else set()
            outcome = self.known_agents.verify_or_pin(
                agent_id, presented, name=self.ticket.agent_name, addressed_by_id=by_id
            )
        except AgentKeyChangedError as error:
            self.key_changed = error
            return str(error)
        except AgentKeyNotPinnedError as error:
            self.not_pinned = error
            return str(error)
        self.first_use = outcome is PinOutcome.FIRST_USE
        if self.first_use and sharing:
            self.shared_name_note = (
                f"note: several agents are called {self.ticket.agent_name} "
                f"({', '.join(sorted(sharing | {agent_id}))}); their keys are pinned by agent "
                f"id, so address them by id"
            )
        return None


@dataclass(frozen=True)
class Output:
    """Bytes the remote process wrote: ``stream`` is "stdout" or "stderr"."""

    stream: Literal["stdout", "stderr"]
    data: bytes


@dataclass(frozen=True)
class Exited:
    """The remote process ended (its ExitStatus)."""

    status: ExitStatus


@dataclass(frozen=True)
class Closed:
    """The agent ended the session; ``reason`` is its Close message when it sent one."""

    reason: Close | None


SessionEvent = Output | Exited | Closed


def output_runs(
    events: Sequence[SessionEvent],
) -> Iterator[tuple[Literal["stdout", "stderr"] | None, list[bytes], SessionEvent | None]]:
    """``events`` in order, with each run of consecutive Output on one stream gathered into one
    item (stream, [data, …], None) so it can be written at once; any other event comes as
    (None, [], event)."""
    stream: Literal["stdout", "stderr"] | None = None
    chunks: list[bytes] = []
    for event in events:
        if isinstance(event, Output):
            if event.stream != stream and chunks:
                yield stream, chunks, None
                chunks = []
            stream = event.stream
            chunks.append(event.data)
            continue
        if chunks:
            yield stream, chunks, None
            stream, chunks = None, []
        yield None, [], event
    if chunks:
        yield stream, chunks, None


def exit_code_for(status: ExitStatus) -> int:
    """The exit code to report for ``status``, as a shell would: 128 + signal for a signal."""
    if status.code is not None:
        return status.code
    assert status.signal is not None
    return 128 + status.signal


class OperatorSession:
    """An open session: sealed frames over the relay stream. Sends may come from several tasks.

    Frames arrive in one reusable buffer that a socket receives straight into
    (StreamFrameBuffer); each is opened from a view of it (``open_parts``), never copied out.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        channel: SecureChannel,
        frames: StreamFrameBuffer,
        ticket: SessionTicket,
    ) -> None:
        self.stream = stream
        self.channel = channel
        self.ticket = ticket
        self._frames = frames
        # On a socket the session does its own non-blocking reads and writes: each system call
        # costs tens of microseconds here, and trio's socket methods add a scheduler pass to
        # each one (keystroke echo pays for every one of them).
        self._socket = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._more_expected = False  # after a large receive, read before waiting
        self._send_lock = trio.Lock()
        self._closed_sent = False
        self._ended = False
        self._ready: deque[SessionEvent] = deque()  # opened, not yet handed out
        self._failure: SessionError | None = None  # to raise after the events before it
        self._last_heard = trio.current_time()  # when a byte last came from the agent
        self._lost_because: str | None = None  # why keep_alive closed the connection
        self._waiting_since: float | None = None  # while waiting for the agent: since when
        self.keepalive_interval = KEEPALIVE_INTERVAL_SECONDS
        self.keepalive_timeout = KEEPALIVE_TIMEOUT_SECONDS
        self.bytes_sent = 0
        self.bytes_received = 0

    async def _send_frame(self, frame_type: FrameType, payload: bytes) -> None:
        lock = self._send_lock
        sock = self._socket
        if sock is None or lock.locked():
            await acquire_at_once(lock)
            held = True
        else:
            # A free turn: a frame the socket takes whole at once (a keystroke) is sealed and
            # written without touching the lock, as nothing can run in between.
            held = False
        try:
            if self._closed_sent:
                return
            header, body = self.channel.seal_parts(frame_type, payload, time.monotonic())
            if frame_type is FrameType.CLOSE:
                self._closed_sent = True
            try:
                if sock is None:
                    await self.stream.send_all(encode_stream_parts((header, body)))
                    return
                views = gathered_views([length_prefix(len(header) + len(body)), header, body])
                write_available(sock, views)
                if views:  # the socket is full: wait for room, holding the turn
                    if not held:
                        lock.acquire_nowait()  # seen free, and nothing else ran since
                        held = True
                    await send_remaining(sock, views)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise ConnectionLost("the connection through the relay was lost") from None
        finally:
            if held:
                lock.release()

    async def send_data(self, data: bytes) -> None:
        """Forward input (keystrokes or stdin) to the remote side, in frames of at most 64 KiB."""
        if 0 < len(data) <= MAX_FRAME_PAYLOAD:  # a keystroke: one frame, no slicing
            self.bytes_sent += len(data)
            await self._send_frame(FrameType.DATA, data)
            return
        view = memoryview(data)
        while view:
            chunk, view = bytes(view[:MAX_FRAME_PAYLOAD]), view[MAX_FRAME_PAYLOAD:]
            self.bytes_sent += len(chunk)
            await self._send_frame(FrameType.DATA, chunk)

    async def send_eof(self) -> None:
        """Tell the remote side its input has ended (an empty DATA frame)."""
        await self._send_frame(FrameType.DATA, b"")

    async def send_control(self, message: ControlMessage) -> None:
        """Send a control message (Resize, Signal, Close)."""
        await self._send_frame(FrameType.CONTROL, encode_control(message))

    async def resize(self, rows: int, cols: int) -> None:
        """Tell the remote terminal its new size."""
        await self.send_control(Resize(rows=rows, cols=cols))

    async def signal(self, name: str) -> None:
        """Deliver a signal (INT, TERM, HUP, …) to the remote process."""
        await self.send_control(Signal(name=name))

    async def close(self, message: str = "") -> None:
        """End the session from this side (Close then CLOSE, best effort) and drop the stream."""
        with trio.move_on_after(CLOSE_SEND_TIMEOUT_SECONDS):
            try:
                if not self._closed_sent and not self._ended:
                    await self.send_control(Close(reason="normal", message=message))
                    await self._send_frame(FrameType.CLOSE, b"")
            except (SessionError, ProtocolError):
                pass
        await trio.aclose_forcefully(self.stream)

    async def receive(self) -> SessionEvent | None:
        """The next event from the agent; None once the connection has ended cleanly after CLOSE.

        Raises ConnectionLost when the connection ends without the agent closing the session,
        and SessionError when the agent sends something that does not open or parse.
        """
        if not self._ready:
            self._ready.extend(await self.receive_batch())
            if not self._ready:
                return None
        return self._ready.popleft()

    async def receive_batch(self) -> list[SessionEvent]:
        """Every event that has arrived (waiting for at least one), in order; [] once the
        connection has ended cleanly after CLOSE. Errors as for ``receive``, raised once the
        events before them have been handed out."""
        if self._ready:
            ready = list(self._ready)
            self._ready.clear()
            return ready
        frames = self._frames
        events: list[SessionEvent] = []
        while not events:
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
            if self._ended:
                break
            try:
                while not self._ended:
                    sealed = frames.next_frame()
                    if sealed is None:
                        break
                    event = self._open(sealed)
                    if event is not None:
                        events.append(event)
            except SessionError as error:
                self._failure = error
                continue
            except ProtocolError as error:
                self._failure = SessionError(f"the agent sent a malformed stream: {error}")
                continue
            if events or self._ended:
                break
            if not await self._receive_more():
                self._ended = True
                lost = self._lost_because or "the connection through the relay was lost"
                raise ConnectionLost(lost)
        return events

    async def keep_alive(self) -> None:
        """Run beside the session, in the caller's nursery: once the CLI has waited for the agent
        for the keepalive timeout without a byte (the agent says it is still here every 15 s),
        close the connection, so that receiving ends with ConnectionLost saying the agent
        stopped answering. The receive path only notes when it waits and hears (no timer per
        wait); time the CLI is not waiting to read does not count, nor time it was stopped."""
        while True:
            slept_from = trio.current_time()
            await trio.sleep(self.keepalive_interval)
            now = trio.current_time()
            waiting_since = self._waiting_since
            if waiting_since is None:
                continue  # busy with what it received: the agent is not the one silent
            if now - slept_from > LATE_WAKE_FACTOR * self.keepalive_interval:
                # Woke far too late: the process was stopped (Ctrl-Z, SIGSTOP) or the machine
                # slept. What the agent sent meanwhile waits in the socket: start counting anew.
                self._waiting_since = now
                continue
            silent = now - max(self._last_heard, waiting_since)
            if silent >= self.keepalive_timeout and not self._bytes_waiting():
                self._lost_because = (
                    f"the agent stopped answering (nothing through the relay for {silent:.0f} s: "
                    "its host may be down or its network cut)"
                )
                await trio.aclose_forcefully(self.stream)  # wakes the receiving task
                return

    def _bytes_waiting(self) -> bool:
        """Whether the agent's bytes are already in the socket, not yet read (the receiving task
        has not run since they came)."""
        sock = self._socket
        if sock is None:
            return False
        try:
            return bool(select.select([sock.fileno()], [], [], 0)[0])
        except (OSError, ValueError):
            return False

    async def _receive_more(self) -> int:
        """Receive into the frame buffer; 0 once the connection has ended."""
        sock = self._socket
        if sock is None:
            self._waiting_since = trio.current_time()
            count = await receive_into(self.stream, self._frames)
            self._last_heard, self._waiting_since = trio.current_time(), None
            return count
        space = self._frames.writable()
        while True:
            try:
                if not self._more_expected:
                    self._waiting_since = trio.current_time()
                    await trio.lowlevel.wait_readable(sock)
                    self._waiting_since = None
                count = os.readv(sock.fileno(), [space])
            except BlockingIOError:
                self._more_expected = False
                continue
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                return 0
            self._more_expected = count >= LARGE_RECEIVE_BYTES
            self._frames.commit(count)
            self._last_heard = trio.current_time()
            return count

    def _open(self, sealed: memoryview) -> SessionEvent | None:
        try:
            frame = self.channel.open_parts(
                bytes(sealed[:HEADER_SIZE]), sealed[HEADER_SIZE:], time.monotonic()
            )
        except ProtocolError as error:
            raise SessionError(f"a frame from the agent was refused: {error}") from None
        kind = frame.type
        if kind is FrameType.STDOUT:
            self.bytes_received += len(frame.payload)
            return Output("stdout", frame.payload)
        if kind is FrameType.STDERR:
            self.bytes_received += len(frame.payload)
            return Output("stderr", frame.payload)
        if kind is FrameType.CLOSE:
            self._ended = True
            return Closed(None)
        try:
            message = decode_control(frame.payload)
        except ProtocolError as error:
            raise SessionError(f"the agent sent a bad control message: {error}") from None
        if isinstance(message, ExitStatus):
            return Exited(message)
        if isinstance(message, Close):
            return Closed(message)
        return None  # nothing else is meaningful agent -> operator; ignore it


@dataclass(frozen=True)
class SessionNotices:
    """What the caller wants to hear of while a session opens (the CLI prints them)."""

    # The agent has not joined at the relay after SLOW_PAIRING_NOTICE_SECONDS.
    slow_pairing: Callable[[], None] | None = None
    # This agent was seen for the first time and its key is now pinned.
    pinned_on_first_use: Callable[[SessionTicket, PublicIdentity], None] | None = None
    # Asked once the relay's pairing timed out: why the agent did not come (say, it never took
    # the offer), to report instead of the relay's timeout; None keeps the relay's message.
    explain_pairing_timeout: Callable[[], Awaitable[str | None]] | None = None


RefusalProbe = Callable[[], Awaitable[str | None]]
"""Asks the rendezvous whether the agent refused the offer: its reason, or None (not refused)."""


async def open_session(
    ticket: SessionTicket,
    identity: SigningIdentity,
    known_agents: KnownAgents,
    start: SessionStart,
    *,
    handshake_timeout: float = HANDSHAKE_TIMEOUT_SECONDS,
    refusal_probe: RefusalProbe | None = None,
    notices: SessionNotices | None = None,
) -> OperatorSession:
    """Meet the agent at the relay, run the handshake, send SessionStart; return the session.

    While waiting for the agent at the relay, ``refusal_probe`` (if given) is asked every
    REFUSAL_POLL_SECONDS whether the agent refused the offer, so a refusal is reported at once
    instead of after the pairing timeout; ``notices`` (if given) hears of a slow pairing and
    of a key pinned on first use. Raises AgentKeyChangedError when the agent's key differs from
    the pinned one, SessionRefused when the agent refuses, SessionError for relay and protocol
    failures.
    """
    notices = notices or SessionNotices()
    try:
        stream = await _meet_at_relay(ticket, refusal_probe, notices.slow_pairing)
    except PairingTimedOut:
        explain = notices.explain_pairing_timeout
        explanation = None if explain is None else await explain()
        if explanation is None:
            raise
        raise SessionError(explanation) from None
    try:
        with trio.fail_after(handshake_timeout):
            session = await establish_session(
                stream, ticket, identity, known_agents, start, notices.pinned_on_first_use
            )
    except trio.TooSlowError:
        await trio.aclose_forcefully(stream)
        raise SessionError(
            f"the agent did not complete the handshake within {handshake_timeout:.0f}s"
        ) from None
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    quiet_garbage_collector()
    return session


def quiet_garbage_collector() -> None:
    """Keep collector pauses off an open session's data path (keystroke echo above all).

    What the process built to get here (modules, the TLS and HTTP clients) is frozen out of
    later collections, so a full collection walks only what the session allocates since, and
    young collections run less often. No collection now: it would delay the first byte.
    """
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


async def _meet_at_relay(
    ticket: SessionTicket,
    refusal_probe: RefusalProbe | None,
    slow_pairing: Callable[[], None] | None = None,
) -> trio.abc.Stream:
    if refusal_probe is None and slow_pairing is None:
        return await _connect_relay(ticket)
    outcome: list[trio.abc.Stream | BaseException] = []

    async def connect(scope: trio.CancelScope) -> None:
        try:
            outcome.append(await _connect_relay(ticket))
        except SessionError as error:
            outcome.append(error)
        scope.cancel()

    async def watch(probe: RefusalProbe, scope: trio.CancelScope) -> None:
        while True:
            await trio.sleep(REFUSAL_POLL_SECONDS)
            reason = await probe()
            if reason is not None:
                # Refused by the agent or by the rendezvous (an operator disabled
                # meanwhile): the reason says which.
                outcome.append(SessionRefused(f"the session was refused: {reason}"))
                scope.cancel()
                return

    async def tell_slow(call: Callable[[], None]) -> None:
        await trio.sleep(SLOW_PAIRING_NOTICE_SECONDS)
        call()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(connect, nursery.cancel_scope)
        if refusal_probe is not None:
            nursery.start_soon(watch, refusal_probe, nursery.cancel_scope)
        if slow_pairing is not None:
            nursery.start_soon(tell_slow, slow_pairing)
    result = outcome[0]
    if isinstance(result, BaseException):
        raise result
    return result


async def _connect_relay(ticket: SessionTicket) -> trio.abc.Stream:
    try:
        return await connect_tcp(
            ticket.relay_host, ticket.relay_port, ticket.relay_token,
            connect_timeout=RELAY_CONNECT_TIMEOUT_SECONDS, pair_timeout=RELAY_PAIR_TIMEOUT_SECONDS,
        )
    except RelayRefusedError as error:
        raise SessionError(
            f"the relay {ticket.relay_id} refused the session ({error.reason.value})"
        ) from None
    except PairingTimeout as error:
        raise PairingTimedOut(f"relay {ticket.relay_id}: {error}") from None
    except RelayError as error:
        raise SessionError(f"relay {ticket.relay_id}: {error}") from None
    except (OSError, trio.TooSlowError):
        raise SessionError(
            f"cannot reach relay {ticket.relay_id} at {ticket.relay_host}:{ticket.relay_port}"
        ) from None


async def establish_session(
    stream: trio.abc.Stream,
    ticket: SessionTicket,
    identity: SigningIdentity,
    known_agents: KnownAgents,
    start: SessionStart,
    pinned_on_first_use: Callable[[SessionTicket, PublicIdentity], None] | None = None,
) -> OperatorSession:
    """Run the operator's handshake on an already paired ``stream``, then send SessionStart.

    The caller bounds the time; errors are those of ``open_session``.
    """
    pin = AgentKeyPin(known_agents, ticket)
    now = time.monotonic()
    handshake = OperatorHandshake(
        identity, ticket.session_id, ticket.grant, pin, now + HANDSHAKE_TIMEOUT_SECONDS
    )
    frames = StreamFrameBuffer()

    async def next_message() -> bytes:
        while True:
            message = frames.next_frame()
            if message is not None:
                return bytes(message)
            if not await receive_into(stream, frames):
                raise ConnectionLost(
                    "the agent closed the connection during the handshake (see the agent's log)"
                )

    try:
        await stream.send_all(encode_stream_frame(handshake.start(time.monotonic())))
        message_3 = handshake.receive(await next_message(), time.monotonic())
        assert message_3 is not None
        await stream.send_all(encode_stream_frame(message_3))
        handshake.receive(await next_message(), time.monotonic())
    except HandshakeRefused as refusal:
        raise SessionRefused(f"the agent refused the session: {refusal.reason}") from None
    except ProtocolError as error:
        if pin.key_changed is not None:
            raise pin.key_changed from None
        if pin.not_pinned is not None:
            raise pin.not_pinned from None
        raise SessionError(f"the handshake with the agent failed: {error}") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        raise ConnectionLost("the connection through the relay was lost") from None
    session = OperatorSession(stream, handshake.channel(time.monotonic()), frames, ticket)
    if pin.first_use and pinned_on_first_use is not None:
        pinned_on_first_use(ticket, ticket.agent_key)
        if pin.shared_name_note is not None:
            print(pin.shared_name_note, file=sys.stderr)
    await session.send_control(start)
    return session


async def receive_into(stream: trio.abc.Stream, frames: StreamFrameBuffer) -> int:
    """Receive what ``stream`` has into ``frames``' free space; 0 once the stream has ended
    (closed, reset or broken: the caller reports the loss)."""
    space = frames.writable()
    try:
        if isinstance(stream, trio.SocketStream):
            count: int = await stream.socket.recv_into(space)
        else:
            data = await stream.receive_some(len(space))
            count = len(data)
            space[:count] = data
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return 0
    frames.commit(count)
    return count
