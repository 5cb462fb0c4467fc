"""The UDP front end: datagram sessions paired by token and forwarded between learned addresses.

A side's address is learned from its HELLO. After pairing, DATA from a learned address goes to
the other side's address. An address changes (NAT rebinding, roaming) only through a REBIND
whose MAC proves the side's UDP credential; DATA from an unknown address is dropped, never used
to learn anything.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from protocol.rate_limits import TokenBucket
from protocol.relay_token import RelayTokenClaims, Side, credential_mac_is_valid
from relay.admission import Admission
from relay.datagram import (
    CLOSE,
    DATA,
    HELLO,
    MAX_DATAGRAM_SIZE,
    REBIND,
    encode_status_datagram,
    parse_credential_proof,
    parse_udp_hello,
)
from relay.errors import HelloError
from relay.fair_share import FairShare
from relay.refusal_log import show_address
from relay.session_log import session_end_line, session_paired_line
from relay.wire import Reason

TRANSPORT = "udp"
MAX_DATAGRAMS_WITHOUT_YIELD = 256
SOCKET_BUFFER_SIZE = 4 * 1024 * 1024

log = logging.getLogger("tucdesk.relay")
Address = Any  # what socket.recvfrom returns: (host, port) or (host, port, flow, scope)


@dataclass(eq=False)
class UdpSide:
    """One side of a UDP session: where it is and how it proves itself."""

    side: Side
    address: Address
    credential: bytes = field(repr=False)
    hello_digest: bytes = field(repr=False)
    last_counter: int = -1
    bytes_sent: int = 0
    peer: UdpSide | None = None  # set once paired: where this side's datagrams go
    claims: RelayTokenClaims | None = field(default=None, repr=False)  # for refusal log lines


@dataclass(eq=False)
class UdpSession:
    """A UDP session, waiting for its second side or paired."""

    session_id: str
    arrived_at: float
    sides: dict[Side, UdpSide] = field(default_factory=dict)
    paired: bool = False
    started: float = 0.0
    last_activity: float = 0.0
    bucket: TokenBucket | None = None
    fair_share: FairShare = field(default_factory=FairShare)  # both directions together

    def bytes_from(self, side: Side) -> int:
        """Bytes forwarded from ``side`` so far."""
        member = self.sides.get(side)
        return member.bytes_sent if member is not None else 0


class UdpFrontEnd:
    """Receives every datagram on the relay's UDP socket and acts on it."""

    def __init__(
        self,
        admission: Admission,
        sock: socket.socket,
        on_activity_ended: Callable[[], None] = lambda: None,
    ) -> None:
        self.admission = admission
        self.on_activity_ended = on_activity_ended
        self.config = admission.config
        self.metrics = admission.metrics
        self.sock = sock
        self.by_address: dict[Address, tuple[UdpSession, UdpSide]] = {}
        self.by_session: dict[str, UdpSession] = {}
        self._forwarded_datagrams = 0
        self._forwarded_bytes = 0

    @property
    def busy(self) -> bool:
        """Whether any UDP session is waiting or paired."""
        return bool(self.by_session)

    async def receive_loop(self) -> None:
        """Receive and handle datagrams until cancelled."""
        buffer = bytearray(MAX_DATAGRAM_SIZE + 1)
        view = memoryview(buffer)
        sock, by_address, total = self.sock, self.by_address, self.admission.total_bandwidth
        send_failures = self.metrics.datagrams_dropped.labels("send_failed")
        handled = 0
        # The hot path is inlined: one dict lookup and one sendto per forwarded datagram. The
        # activity clock is read once per batch; a batch is at most a few milliseconds.
        now = trio.current_time()
        try:
            while True:
                try:
                    size, address = sock.recvfrom_into(buffer)
                except BlockingIOError:
                    self._flush_counters()
                    handled = 0
                    await trio.lowlevel.wait_readable(sock)
                    now = trio.current_time()
                    continue
                except OSError:
                    continue  # e.g. an ICMP error from an earlier send; nothing to do
                handled += 1
                if handled >= MAX_DATAGRAMS_WITHOUT_YIELD:
                    handled = 0
                    self._flush_counters()
                    await trio.lowlevel.checkpoint()
                    now = trio.current_time()
                if size and buffer[0] == DATA:
                    entry = by_address.get(address)
                    peer = entry[1].peer if entry is not None else None
                    if entry is not None and peer is not None:
                        session, sender = entry
                        if session.bucket is not None or total is not None:
                            self._forward_capped(session, sender, view[:size], size, now)
                            continue
                        try:
                            sock.sendto(view[:size], peer.address)
                        except OSError:
                            send_failures.inc()
                            continue
                        session.last_activity = now
                        sender.bytes_sent += size
                        self._forwarded_datagrams += 1
                        self._forwarded_bytes += size
                        continue
                self._on_control(bytes(view[:size]), address)
        finally:
            self._flush_counters()

    def _forward_capped(
        self, session: UdpSession, sender: UdpSide, datagram: memoryview, size: int, now: float
    ) -> None:
        admission = self.admission
        bucket, total = session.bucket, admission.total_bandwidth
        if bucket is not None and bucket.balance(now) < 0:
            self.metrics.datagrams_dropped.labels("bandwidth").inc()
            return
        if total is not None:
            # Only a session above its fair share loses datagrams to the total's debt; every
            # forwarded byte still counts against the total (relay/fair_share.py).
            sharing = len(admission.tcp_sessions) + admission.udp_sessions_paired
            within = session.fair_share.within(size, now, total.rate / (sharing or 1))
            if not within and total.balance(now) < 0:
                self.metrics.datagrams_dropped.labels("bandwidth").inc()
                return
            total.charge(size, now)
        if bucket is not None:
            bucket.charge(size, now)
        assert sender.peer is not None
        try:
            self.sock.sendto(datagram, sender.peer.address)
        except OSError:
            self.metrics.datagrams_dropped.labels("send_failed").inc()
            return
        session.last_activity = now
        sender.bytes_sent += size
        self._forwarded_datagrams += 1
        self._forwarded_bytes += size

    def _flush_counters(self) -> None:
        if self._forwarded_datagrams:
            self.metrics.datagrams_forwarded.inc(self._forwarded_datagrams)
            self.metrics.bytes_forwarded.labels(TRANSPORT).inc(self._forwarded_bytes)
            self._forwarded_datagrams = self._forwarded_bytes = 0

    def _reply(self, address: Address, reason: Reason, request_size: int | None = None) -> None:
        message = encode_status_datagram(reason)
        # Never answer with more bytes than were sent: the relay must not amplify spoofed floods.
        if request_size is not None and request_size < len(message):
            return
        try:
            self.sock.sendto(message, address)
        except OSError:
            self.metrics.datagrams_dropped.labels("send_failed").inc()

    def _refuse(
        self,
        address: Address,
        reason: Reason,
        request_size: int | None,
        *,
        claims: RelayTokenClaims | None = None,
        token: str | None = None,
    ) -> None:
        self.admission.refuse(
            TRANSPORT, reason, peer=functools.partial(show_address, address),
            claims=claims, token=token,
        )
        self._reply(address, reason, request_size)

    def _on_control(self, datagram: bytes, address: Address) -> None:
        kind = datagram[0] if datagram else -1
        if kind == HELLO:
            self._on_hello(datagram, address)
        elif kind == DATA:
            self._on_early_or_stray_data(datagram, address)
        elif kind in (REBIND, CLOSE):
            self._on_credential_proof(datagram, address)
        else:
            self.metrics.datagrams_dropped.labels("malformed").inc()

    def _on_hello(self, datagram: bytes, address: Address) -> None:
        digest = hashlib.sha256(datagram).digest()
        known = self.by_address.get(address)
        if known is not None and known[1].hello_digest == digest:
            # A resent hello (the status reply was lost): answer again, it is not a reuse.
            self._reply(address, Reason.PAIRED if known[0].paired else Reason.WAITING)
            return
        if not self.admission.udp_hello_allowed(str(address[0]), trio.current_time()):
            self._refuse(address, Reason.RATE_LIMITED, len(datagram))
            return
        try:
            token = parse_udp_hello(datagram)
        except HelloError as error:
            self._refuse(address, error.reason, len(datagram))
            return
        if known is not None:
            self._refuse(address, Reason.BAD_HELLO, len(datagram))  # one address, one side
            return
        checked = self.admission.check_token(token, time.time())
        if isinstance(checked, Reason):
            self._refuse(address, checked, len(datagram), token=token)
            return
        claims = checked
        if self.admission.shutting_down:
            self._refuse(address, Reason.SHUTTING_DOWN, len(datagram), claims=claims)
            return
        now = trio.current_time()
        key = (TRANSPORT, claims.session_id)
        fresh = UdpSession(claims.session_id, now)
        arrival = self.admission.registry.arrive(key, claims.side, fresh, now)
        if arrival.refused:
            self._refuse(address, arrival.reason, len(datagram), claims=claims)
            return
        side = UdpSide(claims.side, address, claims.udp_credential, digest, claims=claims)
        if arrival.peer is None:
            fresh.sides[claims.side] = side
            self.by_session[claims.session_id] = fresh
            self.by_address[address] = (fresh, side)
            self.metrics.sessions_waiting.labels(TRANSPORT).inc()
            self._reply(address, Reason.WAITING)
            return
        session = arrival.peer.endpoint
        assert isinstance(session, UdpSession)
        session.sides[claims.side] = side
        self.by_address[address] = (session, side)
        peer_side = session.sides[claims.side.other]
        side.peer, peer_side.peer = peer_side, side
        session.paired = True
        self.admission.udp_sessions_paired += 1
        session.started = session.last_activity = now
        session.fair_share = FairShare(now)
        session.bucket = self.admission.session_bucket(now)
        self.metrics.sessions_waiting.labels(TRANSPORT).dec()
        self.metrics.sessions_active.labels(TRANSPORT).inc()
        self.metrics.sessions_paired.labels(TRANSPORT).inc()
        self.metrics.pairing_latency.labels(TRANSPORT).observe(now - session.arrived_at)
        log.info(session_paired_line(transport=TRANSPORT, session_id=session.session_id,
                                     peers=_peers(session), blur=self.config.blur_logs))
        for member in session.sides.values():
            self._reply(member.address, Reason.PAIRED)

    def _on_early_or_stray_data(self, datagram: bytes, address: Address) -> None:
        known = self.by_address.get(address)
        if known is None:
            self.metrics.datagrams_dropped.labels("unknown_source").inc()
            return
        # Only a waiting side can get here: data before "paired" ends its wait.
        session = known[0]
        self._refuse(address, Reason.EARLY_DATA, None, claims=known[1].claims)
        self._forget_waiting(session)

    def _on_credential_proof(self, datagram: bytes, address: Address) -> None:
        try:
            proof = parse_credential_proof(datagram)
        except HelloError:
            self.metrics.datagrams_dropped.labels("malformed").inc()
            return
        session = self.by_session.get(proof.session_id)
        side = session.sides.get(proof.side) if session is not None else None
        if session is None or side is None:
            self.metrics.datagrams_dropped.labels("unknown_source").inc()
            return
        if not credential_mac_is_valid(
            side.credential, proof.mac, session_id=proof.session_id, side=proof.side,
            kind=proof.kind, counter=proof.counter,
        ):
            self.metrics.datagrams_dropped.labels("bad_credential").inc()
            return
        if proof.counter <= side.last_counter:
            self.metrics.datagrams_dropped.labels("stale_counter").inc()
            return
        side.last_counter = proof.counter
        if proof.kind == CLOSE:
            if session.paired:
                self._end_session(session, Reason.CLOSED)
            else:
                self._forget_waiting(session)
            return
        if address != side.address:
            if address in self.by_address:
                self.metrics.datagrams_dropped.labels("unknown_source").inc()
                return
            del self.by_address[side.address]
            side.address = address
            self.by_address[address] = (session, side)
            log.info("udp_rebound sid=%r side=%s", session.session_id, side.side.value)
        session.last_activity = trio.current_time()
        self._reply(address, Reason.REBOUND)

    def _forget_waiting(self, session: UdpSession) -> None:
        for member in session.sides.values():
            self.by_address.pop(member.address, None)
        self.by_session.pop(session.session_id, None)
        self.admission.registry.withdraw((TRANSPORT, session.session_id), session)
        self.metrics.sessions_waiting.labels(TRANSPORT).dec()
        self.on_activity_ended()

    def _end_session(self, session: UdpSession, reason: Reason) -> None:
        for member in session.sides.values():
            self.by_address.pop(member.address, None)
            self._reply(member.address, reason)
        self.by_session.pop(session.session_id, None)
        self.admission.registry.end((TRANSPORT, session.session_id))
        self.admission.udp_sessions_paired -= 1
        self.metrics.sessions_active.labels(TRANSPORT).dec()
        self.metrics.sessions_closed.labels(TRANSPORT, reason.value).inc()
        self.on_activity_ended()
        log.info(
            session_end_line(
                transport=TRANSPORT,
                session_id=session.session_id,
                bytes_from_operator=session.bytes_from(Side.OPERATOR),
                bytes_from_agent=session.bytes_from(Side.AGENT),
                duration=trio.current_time() - session.started,
                reason=reason.value,
                blur=self.config.blur_logs,
                peers=_peers(session),
            )
        )

    def sweep(self, now: float) -> None:
        """Refuse sides that waited too long; close sessions idle for too long."""
        for session in list(self.by_session.values()):
            if session.paired:
                if now - session.last_activity >= self.config.idle_timeout:
                    self._end_session(session, Reason.IDLE_TIMEOUT)
            elif now - session.arrived_at >= self.config.pair_timeout:
                self._refuse_waiting(session, Reason.PAIR_TIMEOUT)

    def refuse_waiting_for_shutdown(self) -> None:
        """Refuse every waiting side with shutting_down."""
        for session in list(self.by_session.values()):
            if not session.paired:
                self._refuse_waiting(session, Reason.SHUTTING_DOWN)

    def _refuse_waiting(self, session: UdpSession, reason: Reason) -> None:
        # A waiting session has one side; the refusal is counted once per session.
        members = list(session.sides.values())
        first = members[0] if members else None
        self.admission.refuse(
            TRANSPORT, reason,
            peer="unknown" if first is None else show_address(first.address),
            claims=None if first is None else first.claims,
        )
        for member in members:
            self._reply(member.address, reason)
        self._forget_waiting(session)

    def close_all_sessions(self, reason: Reason) -> None:
        """End every paired session now (after the shutdown grace period)."""
        for session in list(self.by_session.values()):
            if session.paired:
                self._end_session(session, reason)


def _peers(session: UdpSession) -> dict[str, Address]:
    """Each side's current address by side name, for the session log lines."""
    return {member.side.value: member.address for member in session.sides.values()}


def open_udp_socket(host: str, port: int) -> socket.socket:
    """A non-blocking UDP socket bound to host:port, with large kernel buffers."""
    info = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_DGRAM)
    try:
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_SIZE)
            except OSError:
                pass
        sock.bind(info[4])
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
