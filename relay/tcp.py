"""The TCP front end: accept, read the hello, admit, pair, then forward both ways.

Each accepted connection gets one task. A first side's task waits for its peer; the second
side's task hands its socket over and ends, and the first side's task runs the session.
"""

from __future__ import annotations

import functools
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from protocol.rate_limits import TokenBucket
from protocol.relay_token import RelayTokenClaims, Side
from relay.admission import Admission, PendingHello
from relay.errors import HelloError
from relay.fair_share import FairShare
from relay.forwarding import MAX_CHUNK_SIZE, SPLICE_AVAILABLE, bulk_low_water, pump
from relay.refusal_log import peer_address, peer_of, show_address
from relay.session_log import session_end_line, session_paired_line
from relay.sockio import (
    CONNECTION_LOST_ERRORS,
    close_socket,
    peek_state,
    recv_exactly,
    send_all,
    send_now,
)
from relay.wire import (
    HELLO_HEADER_SIZE,
    PROBE_TOKEN,
    Reason,
    encode_probe,
    encode_status,
    parse_hello_header,
    parse_hello_token,
)

TRANSPORT = "tcp"
RMEM_MAX_PATH = "/proc/sys/net/core/rmem_max"
WMEM_MAX_PATH = "/proc/sys/net/core/wmem_max"
STATUS_SEND_TIMEOUT_SECONDS = 5.0
ACCEPT_ERROR_BACKOFF_SECONDS = 0.1
MAX_ACCEPTS_WITHOUT_YIELD = 64
# While draining, how long a newcomer's first bytes are awaited to tell a probe (answered, not
# refused) from a client (refused shutting_down); a client sends its hello at once.
DRAIN_PROBE_WAIT_SECONDS = 0.5
# At most this many newcomers wait so while draining (their descriptors come out of the
# max_pending budget: no new hello slot opens while draining); more are refused at once.
MAX_DRAINING_CHECKS = 64
LISTEN_BACKLOG = 4096
# Dead-peer detection (detect_dead_peers): probe after half the timeout of silence, then this
# many probes spread over the other half.
DEAD_PEER_IDLE_FRACTION = 2
DEAD_PEER_PROBES = 3
# How often, per dead_peer_timeout, the sweep asks each session's sockets (unanswered_for).
DEAD_PEER_CHECKS_PER_TIMEOUT = 4
# struct tcp_info (linux/tcp.h): u32 tcpi_unacked at byte 24, u32 tcpi_last_ack_recv (ms) at 56.
_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_TCP_INFO_BYTES = 60
_TCP_INFO_UNACKED = struct.Struct("=24xI")
_TCP_INFO_LAST_ACK_RECV = struct.Struct("=56xI")

_PROBE_HELLO = encode_probe()

log = logging.getLogger("tucdesk.relay")


@dataclass(eq=False)
class WaitingConnection:
    """A first side waiting for its peer; the peer's task fills ``partner`` and wakes it."""

    sock: socket.socket
    claims: RelayTokenClaims
    arrived_at: float
    wake: trio.CancelScope = field(default_factory=trio.CancelScope)
    partner: tuple[socket.socket, RelayTokenClaims] | None = None
    shutting_down: bool = False


@dataclass(eq=False)
class TcpSession:
    """A paired TCP session: two sockets, their byte counts and how it ended."""

    session_id: str
    sockets: dict[Side, socket.socket]
    started: float
    last_activity: float
    bucket: TokenBucket | None
    fair_share: FairShare = field(default_factory=FairShare)  # both directions together
    bytes_from: dict[Side, int] = field(default_factory=lambda: {Side.OPERATOR: 0, Side.AGENT: 0})
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    close_reason: Reason | None = None
    reported: int = 0  # of the bytes forwarded, how many bytes_forwarded already counts

    def unreported_bytes(self) -> int:
        """Bytes forwarded since the metric was last told, now marked as told."""
        total = self.bytes_from[Side.OPERATOR] + self.bytes_from[Side.AGENT]
        unreported, self.reported = total - self.reported, total
        return unreported

    def close(self, reason: Reason) -> None:
        """End the session now for ``reason`` (the first reason given is the one recorded)."""
        if self.close_reason is None:
            self.close_reason = reason
        self.scope.cancel()


class TcpFrontEnd:
    """Accepts TCP clients for one relay and runs their sessions."""

    def __init__(
        self,
        admission: Admission,
        listener: socket.socket,
        on_activity_ended: Callable[[], None] = lambda: None,
        *,
        socket_buffer: int = 0,
    ) -> None:
        """``socket_buffer``: the fixed buffer size ``listener`` was opened with (0: autotuned)."""
        self.admission = admission
        self.on_activity_ended = on_activity_ended
        self.config = admission.config
        self.metrics = admission.metrics
        self.listener = listener
        self.pending = 0
        self._draining_checks = 0  # newcomers _refuse_while_draining is looking at
        self.waiting: set[WaitingConnection] = set()
        self.sessions: set[TcpSession] = set()
        admission.tcp_sessions = self.sessions
        self._dead_peer_cursor = 0
        self.use_splice = self.config.forwarding == "splice" and SPLICE_AVAILABLE
        self.low_water = bulk_low_water(socket_buffer)
        self._bytes_metric = self.metrics.bytes_forwarded.labels(TRANSPORT)
        # The data path only counts per session; the metric is brought up to date when it is
        # scraped and when a session ends (a locked metric update per message was 4 of the
        # relay's ~75 Python calls per forwarded message, ~3 % of its profiled time).
        self.metrics.before_collect.append(self.report_forwarded_bytes)

    def report_forwarded_bytes(self) -> None:
        """Add the bytes every live session forwarded since the last report to the metric."""
        for session in self.sessions:
            self._report(session)

    def _report(self, session: TcpSession) -> None:
        unreported = session.unreported_bytes()
        if unreported:
            self._bytes_metric.inc(unreported)

    @property
    def busy(self) -> bool:
        """Whether any connection is still mid-hello, waiting or in a session."""
        return bool(self.pending or self.waiting or self.sessions)

    async def accept_loop(self, nursery: trio.Nursery) -> None:
        """Accept connections until cancelled; each admitted one is handled in ``nursery``."""
        accepted = 0
        while True:
            try:
                sock, address = self.listener.accept()
            except BlockingIOError:
                accepted = 0
                await trio.lowlevel.wait_readable(self.listener)
                continue
            except OSError as error:
                # Out of descriptors or memory: counted and logged (rate-limited); out of
                # descriptors, the backlog is refused through a spare one; then a short pause.
                self.admission.accept_failed(self.listener, error)
                await trio.sleep(ACCEPT_ERROR_BACKOFF_SECONDS)
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            slot = self.admission.admit_connection(address, trio.current_time())
            if slot is Reason.SHUTTING_DOWN and self._draining_checks < MAX_DRAINING_CHECKS:
                self._draining_checks += 1
                nursery.start_soon(self._refuse_while_draining, sock, address)
            elif isinstance(slot, Reason):
                self._refuse(sock, slot, peer=show_address(address))
            else:
                self.pending += 1
                self.metrics.connections_pending.inc()
                nursery.start_soon(self._handle, sock, slot)
            accepted += 1
            if accepted >= MAX_ACCEPTS_WITHOUT_YIELD:
                accepted = 0
                await trio.lowlevel.checkpoint()

    def _refuse(
        self,
        sock: socket.socket,
        reason: Reason,
        *,
        peer: str | None = None,
        claims: RelayTokenClaims | None = None,
        token: str | None = None,
    ) -> None:
        self.admission.refuse(
            TRANSPORT, reason, peer=peer or functools.partial(peer_of, sock),
            claims=claims, token=token,
        )
        send_now(sock, encode_status(reason))
        close_socket(sock)

    async def _read_hello(self, sock: socket.socket) -> str | Reason | None:
        try:
            with trio.fail_after(self.config.hello_timeout):
                token_length = parse_hello_header(await recv_exactly(sock, HELLO_HEADER_SIZE))
                return parse_hello_token(await recv_exactly(sock, token_length))
        except trio.TooSlowError:
            return Reason.HELLO_TIMEOUT
        except HelloError as error:
            return error.reason
        except (EOFError, OSError):
            return None

    async def _handle(self, sock: socket.socket, slot: PendingHello) -> None:
        owned = True
        try:
            hello: str | Reason | None = None
            checked: RelayTokenClaims | Reason | None = None
            try:
                with slot.scope:  # cancelled if dropped (admission.PendingHellos)
                    deadline = trio.current_time() + self.config.hello_timeout
                    hello = await self._read_hello(sock)
                    # A hello read without a checkpoint (already buffered) may belong to a slot
                    # evicted meanwhile: its token is not checked, so not spent, and the
                    # client's retry of too_many_connections can still use it.
                    if isinstance(hello, str) and hello != PROBE_TOKEN and not slot.evicted:
                        # Still a pending hello while it may wait for a JWKS refetch: in
                        # max_pending (and so the descriptor budget), in connections_pending,
                        # droppable, and done by the end of its hello_timeout.
                        checked = await self._check_token(hello, deadline)
            finally:
                self.pending -= 1
                self.metrics.connections_pending.dec()
                self.admission.hello_finished(slot)
            if slot.dropped and not isinstance(checked, RelayTokenClaims):
                # Its token was not accepted (not remembered): too_many_connections is
                # retryable. A slot dropped after its token was accepted, and so remembered,
                # goes on: refused, its retry would only be told token_reused.
                hello = Reason.TOO_MANY_CONNECTIONS
            if hello is None:
                self.admission.hello_abandoned(slot)
                return
            if isinstance(hello, Reason):
                self._refuse(sock, hello)
                owned = False
                return
            del slot  # its cancel scope is done with: not held for the session's life
            if checked is None:  # a probe
                self._answer_probe(sock)
                owned = False
                return
            owned = await self._admit(sock, hello, checked)
        finally:
            if owned:
                close_socket(sock)
            self.on_activity_ended()

    async def _refuse_while_draining(self, sock: socket.socket, address: object) -> None:
        """Refuse a newcomer with shutting_down, or answer it as a probe if its first bytes,
        awaited DRAIN_PROBE_WAIT_SECONDS at most, are a probe hello (a health check's drain
        answer is no refusal). Not a pending hello: it does not hold up the drain."""
        try:
            with trio.move_on_after(DRAIN_PROBE_WAIT_SECONDS):
                await trio.lowlevel.wait_readable(sock)
        except OSError:
            pass
        except BaseException:  # the grace period ended (cancelled): just close it
            close_socket(sock)
            raise
        finally:
            self._draining_checks -= 1
        if is_probe_waiting(sock):
            self._answer_probe(sock)
        else:
            self._refuse(sock, Reason.SHUTTING_DOWN, peer=show_address(address))

    def _answer_probe(self, sock: socket.socket) -> None:
        """Answer a health check's probe with the relay's state; counted, never logged."""
        answer = self.admission.probe_answer(trio.current_time())
        self.metrics.probes.labels(answer.value).inc()
        send_now(sock, encode_status(answer))
        close_socket(sock)

    async def _check_token(self, token: str, deadline: float) -> RelayTokenClaims | Reason:
        """check_token, waiting until ``deadline`` at most for a JWKS refetch when the token
        names a key id the relay does not know yet."""
        checked = self.admission.check_token(token, time.time())
        if checked is Reason.TOKEN_INVALID and await self.admission.key_set.wait_for_unknown_key(
            token, deadline
        ):
            # Signed with a key the JWKS refetch its unknown key id waited for just brought.
            checked = self.admission.check_token(token, time.time())
        return checked

    async def _admit(
        self, sock: socket.socket, token: str, checked: RelayTokenClaims | Reason
    ) -> bool:
        """Admit a connection with its checked token; return whether this task still owns the
        socket."""
        if isinstance(checked, Reason):
            self._refuse(sock, checked, token=token)
            return False
        claims = checked
        if self.admission.shutting_down:
            self._refuse(sock, Reason.SHUTTING_DOWN, claims=claims)
            return False
        if peek_state(sock) == "data":
            self._refuse(sock, Reason.EARLY_DATA, claims=claims)
            return False
        now = trio.current_time()
        waiter = WaitingConnection(sock, claims, now)
        arrival = self.admission.registry.arrive(
            (TRANSPORT, claims.session_id), claims.side, waiter, now
        )
        if arrival.refused:
            self._refuse(sock, arrival.reason, claims=claims)
            return False
        if arrival.peer is not None:
            first = arrival.peer.endpoint
            assert isinstance(first, WaitingConnection)
            first.partner = (sock, claims)
            first.wake.cancel()
            return False  # the first side's task owns this socket now
        await self._wait_for_peer(waiter)
        return False

    async def _wait_for_peer(self, waiter: WaitingConnection) -> None:
        """Wait, bounded, for the peer; refuse early data; run the session once paired."""
        key = (TRANSPORT, waiter.claims.session_id)
        self.waiting.add(waiter)
        self.metrics.sessions_waiting.labels(TRANSPORT).inc()
        outcome = Reason.PAIR_TIMEOUT
        try:
            with trio.move_on_after(STATUS_SEND_TIMEOUT_SECONDS):
                await send_all(waiter.sock, encode_status(Reason.WAITING))
            with trio.move_on_after(self.config.pair_timeout), waiter.wake:
                while True:
                    await trio.lowlevel.wait_readable(waiter.sock)
                    state = peek_state(waiter.sock)
                    if state != "empty":
                        outcome = Reason.EARLY_DATA if state == "data" else Reason.ABANDONED
                        break
        except OSError:
            outcome = Reason.ABANDONED
        finally:
            self.waiting.discard(waiter)
            self.metrics.sessions_waiting.labels(TRANSPORT).dec()
        if waiter.partner is None:
            self.admission.registry.withdraw(key, waiter)
            if waiter.shutting_down:
                outcome = Reason.SHUTTING_DOWN
            if outcome == Reason.ABANDONED:
                close_socket(waiter.sock)
            else:
                self._refuse(waiter.sock, outcome, claims=waiter.claims)
            return
        await self._start_session(waiter, *waiter.partner)

    async def _start_session(
        self, waiter: WaitingConnection, partner: socket.socket, partner_claims: RelayTokenClaims
    ) -> None:
        key = (TRANSPORT, waiter.claims.session_id)
        sockets = {waiter.claims.side: waiter.sock, partner_claims.side: partner}
        offenders = [s for s in sockets.values() if peek_state(s) == "data"]
        if offenders:
            self.admission.registry.end(key)
            for claims in (waiter.claims, partner_claims):
                sock = sockets[claims.side]
                reason = Reason.EARLY_DATA if sock in offenders else Reason.PEER_GONE
                self._refuse(sock, reason, claims=claims)
            return
        now = trio.current_time()
        self.metrics.pairing_latency.labels(TRANSPORT).observe(now - waiter.arrived_at)
        self.metrics.sessions_paired.labels(TRANSPORT).inc()
        peers = {claims.side.value: peer_address(sockets[claims.side])
                 for claims in (waiter.claims, partner_claims)}
        log.info(session_paired_line(transport=TRANSPORT, session_id=waiter.claims.session_id,
                                     peers=peers, blur=self.config.blur_logs))
        session = TcpSession(
            session_id=waiter.claims.session_id,
            sockets=sockets,
            started=now,
            last_activity=now,
            bucket=self.admission.session_bucket(now),
        )
        self.sessions.add(session)
        self.metrics.sessions_active.labels(TRANSPORT).inc()
        try:
            with trio.move_on_after(STATUS_SEND_TIMEOUT_SECONDS) as status_scope:
                for sock in sockets.values():
                    await send_all(sock, encode_status(Reason.PAIRED))
            if status_scope.cancelled_caught:
                session.close(Reason.RESET)
            else:
                await self._run_session(session)
        except CONNECTION_LOST_ERRORS:
            session.close(Reason.RESET)
        finally:
            for sock in sockets.values():
                close_socket(sock)
            self.sessions.discard(session)
            self._report(session)
            self.metrics.sessions_active.labels(TRANSPORT).dec()
            self.admission.registry.end(key)
            reason = session.close_reason or Reason.CLOSED
            self.metrics.sessions_closed.labels(TRANSPORT, reason.value).inc()
            log.info(
                session_end_line(
                    transport=TRANSPORT,
                    session_id=session.session_id,
                    bytes_from_operator=session.bytes_from[Side.OPERATOR],
                    bytes_from_agent=session.bytes_from[Side.AGENT],
                    duration=trio.current_time() - session.started,
                    reason=reason.value,
                    blur=self.config.blur_logs,
                    peers=peers,
                )
            )

    async def _run_session(self, session: TcpSession) -> None:
        operator, agent = session.sockets[Side.OPERATOR], session.sockets[Side.AGENT]
        with session.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump_direction, session, operator, agent, Side.OPERATOR)
                await self._pump_direction(session, agent, operator, Side.AGENT)

    async def _pump_direction(
        self, session: TcpSession, source: socket.socket, destination: socket.socket, side: Side
    ) -> None:
        admission = self.admission
        total = admission.total_bandwidth
        bucket = session.bucket
        counts = session.bytes_from
        sessions = self.sessions
        fair_share = session.fair_share
        # The run's clock itself (what trio.current_time reads), without two wrapper calls.
        current_time = trio.lowlevel.current_clock().current_time

        def record(moved: int) -> float:
            now = current_time()
            session.last_activity = now
            counts[side] += moved
            delay = bucket.charge(moved, now) if bucket is not None else 0.0
            if total is not None:
                # Every byte counts against the total; only a session above its fair share
                # waits out the total's debt (FairShare).
                total_delay = total.charge(moved, now)
                share = total.rate / ((len(sessions) + admission.udp_sessions_paired) or 1)
                if not fair_share.within(moved, now, share) and total_delay > delay:
                    delay = total_delay
            return delay

        def record_uncapped(moved: int) -> float:
            session.last_activity = current_time()
            counts[side] += moved
            return 0.0

        chunk_limit = MAX_CHUNK_SIZE
        caps = [b.burst for b in (bucket, total) if b is not None]
        if caps:
            chunk_limit = max(1024, int(min(caps + [MAX_CHUNK_SIZE])))
        try:
            recorder = record if bucket is not None or total is not None else record_uncapped
            await pump(source, destination, recorder, use_splice=self.use_splice,
                       chunk_limit=chunk_limit, low_water=self.low_water)
        except OSError:
            session.close(Reason.RESET)

    def sweep_idle(self, now: float, interval: float = 1.0) -> None:
        """Close sessions that have had no traffic for the idle timeout, and those with a side
        that has left data unanswered for dead_peer_timeout (called every ``interval`` s)."""
        sessions = list(self.sessions)
        for session in sessions:
            if now - session.last_activity >= self.config.idle_timeout:
                session.close(Reason.IDLE_TIMEOUT)
        timeout = self.config.dead_peer_timeout
        if timeout <= 0 or not sessions:
            return
        # Each session is looked at every timeout / DEAD_PEER_CHECKS_PER_TIMEOUT seconds, a
        # slice per sweep, so that many sessions do not stall the loop at once.
        sweeps_per_round = max(1, int(timeout / DEAD_PEER_CHECKS_PER_TIMEOUT / interval))
        per_sweep = -(-len(sessions) // sweeps_per_round)
        start = self._dead_peer_cursor % len(sessions)
        self._dead_peer_cursor = start + per_sweep
        for session in sessions[start : start + per_sweep]:
            if any(unanswered_for(sock) >= timeout for sock in session.sockets.values()):
                session.close(Reason.RESET)

    def refuse_waiting_for_shutdown(self) -> None:
        """Wake every waiting side so it is refused with shutting_down."""
        for waiter in list(self.waiting):
            if waiter.partner is None:
                waiter.shutting_down = True
                waiter.wake.cancel()

    def close_all_sessions(self, reason: Reason) -> None:
        """End every session now (after the shutdown grace period)."""
        for session in list(self.sessions):
            session.close(reason)


def is_probe_waiting(sock: socket.socket) -> bool:
    """Whether a probe hello has already arrived on ``sock`` (peeked, left unread).

    While draining, newcomers are refused before their hello is read; one whose first bytes are
    a probe is still answered as a probe.
    """
    try:
        return sock.recv(len(_PROBE_HELLO), socket.MSG_PEEK | socket.MSG_DONTWAIT) == _PROBE_HELLO
    except OSError:
        return False


def unanswered_for(sock: socket.socket) -> float:
    """Seconds ``sock`` has had data in flight with no acknowledgement from the peer (0 when
    nothing is unacknowledged, or where TCP_INFO cannot tell).

    Keepalive probes are only sent while nothing is in flight, so a peer that died while data
    was on its way to it (an agent's heartbeat to an operator whose host is gone) is caught
    here, not by keepalive: the kernel would retransmit for about 15 minutes. A live peer that
    merely stopped reading answers the window probes, so its last acknowledgement stays fresh.
    """
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_BYTES)
    except OSError:
        return 0.0
    if len(info) < _TCP_INFO_BYTES:
        return 0.0
    unacked = _TCP_INFO_UNACKED.unpack_from(info)[0]
    last_ack_received_ms = _TCP_INFO_LAST_ACK_RECV.unpack_from(info)[0]
    return last_ack_received_ms / 1000 if unacked else 0.0


def detect_dead_peers(listener: socket.socket, timeout: float) -> None:
    """Have connections accepted from ``listener`` give up a peer that stops answering at the
    TCP level within about ``timeout`` seconds (0: never, the kernel's defaults).

    A host that dies or a cut network sends no FIN, so without this a session's other side
    waits for the relay's idle timeout (minutes) before it learns. Keepalive probes find a
    silent peer. TCP_USER_TIMEOUT is deliberately not set: Linux also applies it while a live
    peer advertises a zero window, so it would reset a side that merely stopped reading for a
    while (output piped into a paused pager, a suspended CLI, a command not reading its stdin).
    A dead peer with data still unacknowledged is left to the kernel's retransmission limit
    and to the operator's end-to-end keepalive. Accepted sockets inherit these options from the
    listener, so this costs nothing per connection.
    """
    if timeout <= 0 or not hasattr(socket, "TCP_KEEPIDLE"):
        return
    idle = max(1, int(timeout / DEAD_PEER_IDLE_FRACTION))
    interval = max(1, int((timeout - idle) / DEAD_PEER_PROBES))
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, DEAD_PEER_PROBES)


def open_tcp_listener(host: str, port: int, socket_buffer: int = 0) -> socket.socket:
    """A non-blocking listening socket on host:port (IPv4 or IPv6).

    A non-zero ``socket_buffer`` is set as the listener's receive and send buffer, so accepted
    connections inherit both and their window scale is negotiated for it.
    """
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    listener = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if socket_buffer:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, socket_buffer)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, socket_buffer)
        listener.bind(info[4])
        listener.listen(LISTEN_BACKLOG)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


def usable_socket_buffer(requested: int, kernel_maxima: tuple[int | None, int | None]) -> int:
    """``requested`` if the kernel lets a socket have all of it both ways, else 0 (autotuning).

    Linux silently clamps SO_RCVBUF/SO_SNDBUF to net.core.rmem_max/wmem_max and turns
    autotuning off for that socket, which would leave long-distance sessions a small window.
    """
    if requested <= 0:
        return 0
    for maximum in kernel_maxima:
        if maximum is None or maximum < requested:
            return 0
    return requested


def kernel_socket_buffer_maxima(
    paths: tuple[str, str] = (RMEM_MAX_PATH, WMEM_MAX_PATH),
) -> tuple[int | None, int | None]:
    """(net.core.rmem_max, net.core.wmem_max); None where one cannot be read (no /proc)."""
    return _read_sysctl(paths[0]), _read_sysctl(paths[1])


def _read_sysctl(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as handle:
            return int(handle.read(32).strip())
    except (OSError, ValueError):
        return None
