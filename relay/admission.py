"""Admission: who may talk to the relay. Rate limits, hello-phase limits, token checks, replay
refusal and pairing.

Every refusal goes through ``refuse`` so each one is counted under its reason code and logged
(rate-limited, relay/refusal_log.py). The token checks run offline against the pinned keys; a
token id is remembered only after its signature verified, so forged tokens cannot fill the replay
cache.

Sources: limits count a client by its source block (an IPv4 address, an IPv6 /64 by default;
protocol/rate_limits.source_block). TCP connections and UDP hellos have separate rate buckets:
a UDP source address can be spoofed, so UDP must never spend a TCP client's budget.

Hello phase (as sshd's MaxStartups / PerSourceMaxStartups): at most ``max_pending`` TCP
connections may be still sending their hello. A source's first ``max_pending_per_source`` of
them get the whole hello timeout, any more only OVER_SOURCE_CAP_HELLO_SECONDS (a real client
sends its hello at once, so bursts pass). When the table is full the oldest hello is dropped to
make room, so a slow flood of half-open connections cannot lock out clients whose hello arrives
at once. Dropped hellos are refused with too_many_connections before their token is read, so a
client may retry them (relay/client.py does).
"""

from __future__ import annotations

import errno
import functools
import math
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Sized
from dataclasses import dataclass
from typing import Any

import trio

from protocol.errors import ReplayError, TokenError
from protocol.nonce_cache import NonceCache
from protocol.rate_limits import AddressRateLimiter, TokenBucket, source_block
from protocol.relay_token import (
    TOKEN_ID_MEMORY_SECONDS,
    ClockSkewEstimate,
    RelayTokenClaims,
    RelayTokenExpiredError,
    RelayTokenNotYetValidError,
    RelayTokenWrongRelayError,
    verify_relay_token,
)
from relay.config import RelayConfig
from relay.keyset import TokenKeySet
from relay.metrics import (
    HELLO_ABANDONED,
    OLDEST_DROPPED,
    PER_SOURCE_CAP,
    TOO_MANY_OPEN_FILES,
    RelayMetrics,
)
from relay.pairing import PairingRegistry
from relay.refusal_log import RefusalLog, show_address
from relay.session_log import blurred_peer
from relay.wire import Reason, encode_status

MIN_TOKEN_ID_CACHE_SIZE = 100_000
# check_token refusals for tokens whose signature verified: their ids may be logged.
SIGNED_TOKEN_REFUSALS = frozenset(
    {Reason.WRONG_RELAY, Reason.TOKEN_EXPIRED, Reason.TOKEN_NOT_YET_VALID, Reason.TOKEN_REUSED}
)
# Under descriptor exhaustion, at most this many backlog connections are refused per accept
# failure (each one: close the spare, accept, answer, close, reopen the spare).
MAX_SHED_PER_ACCEPT_FAILURE = 64
DESCRIPTOR_EXHAUSTION_ERRORS = frozenset({errno.EMFILE, errno.ENFILE})
MEMORY_ERRORS = frozenset({errno.ENOMEM, errno.ENOBUFS})
ACCEPT_FAILURE_LINES_PER_SECOND = 1
# How long a hello over its source's max_pending_per_source may take (at most hello_timeout).
OVER_SOURCE_CAP_HELLO_SECONDS = 1.0


@dataclass(eq=False)
class PendingHello:
    """A TCP connection in its hello phase; ``scope`` is cancelled if it is dropped."""

    source: str
    address: Any
    scope: trio.CancelScope
    over_source_cap: bool = False  # its source had max_pending_per_source open: a short deadline
    evicted: bool = False  # dropped, the oldest, to make room for a newcomer

    @property
    def dropped(self) -> bool:
        """Whether the relay dropped this hello (evicted, or over its source's cap and not
        complete within the short deadline), so it is refused with too_many_connections."""
        return self.evicted or self.scope.cancelled_caught


class PendingHellos:
    """The connections still sending their hello, oldest first, at most ``capacity``.

    A source's first ``per_source`` open hellos get the whole hello timeout; any more must be
    complete within ``over_cap_seconds`` (a real client sends its hello with the connection's
    first packet, so a burst from one address is not refused, but a source cannot hold more
    than its share of slots for long). When the table is full the oldest hello is dropped.
    """

    def __init__(self, capacity: int, per_source: int, over_cap_seconds: float) -> None:
        self.capacity = capacity
        self.per_source = per_source
        self.over_cap_seconds = over_cap_seconds
        self._open: OrderedDict[PendingHello, None] = OrderedDict()
        self._by_source: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._open)

    def from_source(self, source: str) -> int:
        """How many hellos ``source`` has open."""
        return self._by_source.get(source, 0)

    def open(
        self, source: str, address: Any, now: float
    ) -> tuple[PendingHello, PendingHello | None]:
        """Open a hello slot for a connection from ``source`` at ``now``: (the slot, the
        oldest slot dropped to make room or None)."""
        over_cap = self._by_source.get(source, 0) >= self.per_source
        deadline = now + self.over_cap_seconds if over_cap else math.inf
        dropped = None
        if len(self._open) >= self.capacity:
            dropped, _ = self._open.popitem(last=False)
            self._forget(dropped.source)
            dropped.evicted = True
            dropped.scope.cancel()
        slot = PendingHello(source, address, trio.CancelScope(deadline=deadline), over_cap)
        self._open[slot] = None
        self._by_source[source] = self._by_source.get(source, 0) + 1
        return slot, dropped

    def close(self, slot: PendingHello) -> None:
        """The hello phase of ``slot`` is over (read, refused, or the client left)."""
        if slot in self._open:
            del self._open[slot]
            self._forget(slot.source)

    def _forget(self, source: str) -> None:
        left = self._by_source[source] - 1
        if left:
            self._by_source[source] = left
        else:
            del self._by_source[source]


class SpareDescriptor:
    """One open file held back so that a listener can still accept (and answer or refuse) a
    connection when the process has run out of descriptors: close it, accept, then reopen it."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self.reopen()

    @property
    def held(self) -> bool:
        """Whether the spare descriptor is held now."""
        return self._fd is not None

    def reopen(self) -> None:
        """Take the spare descriptor again if it is not held (no-op if that fails)."""
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._fd = None

    def accept_instead(self, listener: socket.socket) -> socket.socket | None:
        """Release the spare and accept one connection in its place (None if none is waiting
        or it cannot be done); the caller closes that connection, then calls ``reopen``."""
        if self._fd is None:
            return None
        os.close(self._fd)
        self._fd = None
        try:
            sock, _ = listener.accept()
        except OSError:
            self.reopen()
            return None
        return sock

    def close(self) -> None:
        """Give the spare descriptor back for good."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def accept_failure_reason(error: OSError) -> str:
    """The metric label for a failed accept()."""
    if error.errno in DESCRIPTOR_EXHAUSTION_ERRORS:
        return TOO_MANY_OPEN_FILES
    if error.errno in MEMORY_ERRORS:
        return "out_of_memory"
    return "other"


class Admission:
    """Shared admission state for the TCP and UDP front ends of one relay."""

    def __init__(
        self, config: RelayConfig, key_set: TokenKeySet, metrics: RelayMetrics, now: float
    ) -> None:
        self.config = config
        self.key_set = key_set
        self.metrics = metrics
        self.shutting_down = False
        self.refusal_log = RefusalLog()
        # accept() fails every ACCEPT_ERROR_BACKOFF_SECONDS while descriptors are out: one line
        # a second, the rest summed (flushed by the relay's sweep with the refusal log).
        self.accept_failure_log = RefusalLog(lines_per_second=ACCEPT_FAILURE_LINES_PER_SECOND)
        self.clock_skew = ClockSkewEstimate()
        # Separate buckets: UDP source addresses can be spoofed, TCP ones cannot.
        self.connection_limiter = AddressRateLimiter(config.rate_limit, config.rate_burst)
        self.udp_hello_limiter = AddressRateLimiter(config.rate_limit, config.rate_burst)
        self.pending = PendingHellos(
            config.max_pending, config.max_pending_per_source,
            min(config.hello_timeout, OVER_SOURCE_CAP_HELLO_SECONDS),
        )
        self.spare = SpareDescriptor()
        self.token_ids = NonceCache(
            ttl=TOKEN_ID_MEMORY_SECONDS,
            capacity=max(MIN_TOKEN_ID_CACHE_SIZE, 4 * config.max_sessions),
        )
        self.registry: PairingRegistry[object] = PairingRegistry(
            max_sessions=config.max_sessions, max_waiting=config.max_waiting
        )
        # The paired sessions sharing total_bandwidth fairly (relay/fair_share.py): the TCP
        # front end's set of sessions, and the UDP front end's count.
        self.tcp_sessions: Sized = ()
        self.udp_sessions_paired = 0
        self.total_bandwidth: TokenBucket | None = (
            TokenBucket(config.total_bandwidth, max(config.total_bandwidth, 65536), now)
            if config.total_bandwidth > 0
            else None
        )

    def refuse(
        self,
        transport: str,
        reason: Reason,
        *,
        peer: Callable[[], str] | str = "unknown",
        claims: RelayTokenClaims | None = None,
        token: str | None = None,
    ) -> Reason:
        """Count a refusal under its reason code, log it (rate-limited) and return the reason.

        ``peer`` may be a function, called only if the line is written. ``token``: the token a
        check_token refusal was for; its ids are logged only if its signature verified.
        """
        self.metrics.refusals.labels(transport, reason.value).inc()
        detail = self._token_detail(reason, token) if token is not None else None
        if reason not in SIGNED_TOKEN_REFUSALS:
            token = None
        self.refusal_log.refused(
            trio.current_time(), transport, reason.value,
            peer=self._shown_peer(peer), claims=claims, token=token, detail=detail,
        )
        return reason

    def _shown_peer(self, peer: Callable[[], str] | str) -> Callable[[], str] | str:
        # With --blur-logs refusal lines show a peer's network only, as session lines do.
        return functools.partial(blurred_peer, peer) if self.config.blur_logs else peer

    def _token_detail(self, reason: Reason, token: str) -> str | None:
        # Why a token was refused, where the reason code alone does not tell the operator.
        if reason is Reason.TOKEN_INVALID:
            return self.key_set.refusal_detail(token)
        if reason in (Reason.TOKEN_EXPIRED, Reason.TOKEN_NOT_YET_VALID):
            return self.clock_skew.describe_refusal(
                token, not_yet_valid=reason is Reason.TOKEN_NOT_YET_VALID, now=time.time()
            )
        return None

    def source_of(self, host: str) -> str:
        """The source block ``host`` is counted under (configured prefix lengths)."""
        return source_block(host, self.config.source_ipv4_prefix, self.config.source_ipv6_prefix)

    def udp_hello_allowed(self, host: str, now: float) -> bool:
        """Whether a UDP hello from ``host`` is within its source's UDP rate (never the TCP one)."""
        return self.udp_hello_limiter.allow(self.source_of(host), now)

    def admit_connection(self, address: Any, now: float) -> PendingHello | Reason:
        """Let a just-accepted TCP connection start its hello, or say why not (shutting_down,
        rate_limited: before its token is read). Counts it."""
        self.metrics.connections_accepted.inc()
        if self.shutting_down:
            return Reason.SHUTTING_DOWN
        source = self.source_of(str(address[0]))
        if not self.connection_limiter.allow(source, now):
            return Reason.RATE_LIMITED
        slot, dropped = self.pending.open(source, address, now)
        if dropped is not None:
            self.metrics.pending_dropped.labels(OLDEST_DROPPED).inc()
        return slot

    def hello_finished(self, slot: PendingHello) -> None:
        """The hello phase of ``slot`` is over; free its place (and count it if it was over
        its source's cap and too slow)."""
        self.pending.close(slot)
        if slot.over_source_cap and slot.scope.cancelled_caught and not slot.evicted:
            self.metrics.pending_dropped.labels(PER_SOURCE_CAP).inc()

    def hello_abandoned(self, slot: PendingHello) -> None:
        """Count and log (rate-limited) a client that left before sending its whole hello."""
        self.metrics.refusals.labels("tcp", HELLO_ABANDONED).inc()
        self.refusal_log.refused(
            trio.current_time(), "tcp", HELLO_ABANDONED,
            peer=self._shown_peer(lambda: show_address(slot.address)),
        )

    def accept_failed(self, listener: socket.socket, error: OSError) -> None:
        """Count and log (rate-limited) a failed accept() on the relay's listener; when out of
        descriptors, refuse waiting connections with too_many_connections through the spare
        descriptor rather than leave them hanging in the backlog."""
        reason = accept_failure_reason(error)
        self.metrics.accept_failures.labels("relay", reason).inc()
        shed = 0
        if reason == TOO_MANY_OPEN_FILES:
            shed = shed_backlog(self.spare, listener, MAX_SHED_PER_ACCEPT_FAILURE)
            self.metrics.connections_accepted.inc(shed)
            if shed:
                self.metrics.refusals.labels("tcp", Reason.TOO_MANY_CONNECTIONS.value).inc(shed)
        self.accept_failure_log.event(
            trio.current_time(), "accept_failed",
            "accept_failed error=%s refused_from_backlog=%d", error.strerror or error, shed,
        )

    def probe_answer(self, now: float) -> Reason:
        """What a health probe is told at ``now`` (trio time): ok only when a new session with
        a token the rendezvous signs now would be taken; else why not (shutting_down,
        too_many_sessions, no_keys: no key, or a JWKS fetched too long ago)."""
        if self.shutting_down:
            return Reason.SHUTTING_DOWN
        if self.registry.full:
            return Reason.TOO_MANY_SESSIONS
        if not self.key_set.serving(now):
            return Reason.NO_KEYS
        return Reason.OK

    def check_token(self, token: str, now_wall: float) -> RelayTokenClaims | Reason:
        """Verify a relay token and refuse a reused one; return its claims or the refusal reason."""
        try:
            claims = verify_relay_token(
                token,
                self.key_set.keys,
                relay_id=self.config.relay_id,
                issuer=self.config.issuer,
                now=now_wall,
            )
        except RelayTokenExpiredError:
            return Reason.TOKEN_EXPIRED
        except RelayTokenNotYetValidError:
            return Reason.TOKEN_NOT_YET_VALID
        except RelayTokenWrongRelayError:
            return Reason.WRONG_RELAY
        except TokenError:
            # A key id the relay does not know: the rendezvous may have rotated its key.
            self.key_set.ask_for_unknown_key(token)
            return Reason.TOKEN_INVALID
        try:
            self.token_ids.check_and_remember(claims.token_id, now_wall)
        except ReplayError:
            return Reason.TOKEN_REUSED
        return claims

    def close(self) -> None:
        """Release what admission holds open (the spare descriptor)."""
        self.spare.close()

    def session_bucket(self, now: float) -> TokenBucket | None:
        """A fresh per-session bandwidth bucket, or None when sessions are not capped."""
        rate = self.config.session_bandwidth
        if rate <= 0:
            return None
        return TokenBucket(rate, max(rate / 4, 16384), now)


def shed_backlog(spare: SpareDescriptor, listener: socket.socket, most: int) -> int:
    """Accept up to ``most`` waiting connections through ``spare`` and refuse each one with
    too_many_connections; return how many. The spare is held again afterwards."""
    # The spare may have been lost (a reopen failed: another thread took the freed slot).
    spare.reopen()
    shed = 0
    refusal = encode_status(Reason.TOO_MANY_CONNECTIONS)
    while shed < most:
        sock = spare.accept_instead(listener)
        if sock is None:
            break
        try:
            sock.setblocking(False)
            sock.send(refusal)
        except OSError:
            pass
        finally:
            sock.close()
            spare.reopen()
        shed += 1
    return shed
