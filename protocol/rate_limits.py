"""Rate limits: a token bucket (bandwidth caps, request rates), a per-address limiter, and the
network block a client address is counted under. Sans-I/O.

Time is passed in (seconds, monotonic) so the arithmetic is tested without a clock.
"""

from __future__ import annotations

import socket
from collections import OrderedDict

DEFAULT_ADDRESS_TABLE_SIZE = 65_536
# One IPv4 address, one IPv6 /64: a host is usually given a whole /64 (SLAAC, privacy
# addresses), so counting each IPv6 address alone would let one host have 2^64 budgets
# (sshd's PerSourceNetBlockSize does the same grouping).
DEFAULT_IPV4_SOURCE_PREFIX = 32
DEFAULT_IPV6_SOURCE_PREFIX = 64
_IPV4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def source_block(
    host: str,
    ipv4_prefix: int = DEFAULT_IPV4_SOURCE_PREFIX,
    ipv6_prefix: int = DEFAULT_IPV6_SOURCE_PREFIX,
) -> str:
    """The network block ``host`` is counted under: ``"192.0.2.7"`` or ``"2001:db8:1:2::/64"``.

    An IPv4-mapped IPv6 address (a dual-stack listener) counts as its IPv4 address. Text that is
    not an IP address is its own block.
    """
    if ":" not in host and ipv4_prefix >= 32:
        return host  # the common case, without parsing
    # inet_pton and an integer mask: a few times cheaper than ipaddress.ip_network, once per
    # connection.
    try:
        if ":" in host:
            packed = socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])
            if packed[:12] != _IPV4_MAPPED_PREFIX:
                return _masked(socket.AF_INET6, packed, ipv6_prefix)
            packed = packed[12:]
        else:
            packed = socket.inet_pton(socket.AF_INET, host)
    except OSError:
        return host
    if ipv4_prefix >= 32:
        return socket.inet_ntop(socket.AF_INET, packed)
    return _masked(socket.AF_INET, packed, ipv4_prefix)


def _masked(family: int, packed: bytes, prefix: int) -> str:
    bits = len(packed) * 8
    if prefix >= bits:
        return socket.inet_ntop(family, packed)
    value = int.from_bytes(packed, "big") >> (bits - prefix) << (bits - prefix)
    return f"{socket.inet_ntop(family, value.to_bytes(len(packed), 'big'))}/{prefix}"


class TokenBucket:
    """A token bucket that may go into debt: charge first, then wait out the debt.

    Bandwidth is charged after bytes move (a splice or datagram cannot be partly undone), so the
    bucket lets the balance go negative and tells the caller how long to pause. Over time the
    average rate never exceeds ``rate``; a single burst never exceeds ``burst`` plus one chunk.
    """

    __slots__ = ("burst", "rate", "_balance", "_updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = float(rate)
        self.burst = float(burst)
        self._balance = float(burst)
        self._updated = now

    def _refill(self, now: float) -> None:
        if now > self._updated:
            self._balance = min(self.burst, self._balance + (now - self._updated) * self.rate)
            self._updated = now

    def balance(self, now: float) -> float:
        """Tokens available at ``now`` (negative while in debt)."""
        self._refill(now)
        return self._balance

    def charge(self, amount: float, now: float) -> float:
        """Spend ``amount`` tokens; return the seconds to wait until the balance is not negative."""
        self._refill(now)
        self._balance -= amount
        return 0.0 if self._balance >= 0 else -self._balance / self.rate

    def try_take(self, amount: float, now: float) -> bool:
        """Spend ``amount`` tokens if that many are available; return whether it did."""
        self._refill(now)
        if self._balance < amount:
            return False
        self._balance -= amount
        return True


class AddressRateLimiter:
    """At most ``rate`` new connections per second (``burst`` at once) from one address.

    Buckets live in a bounded LRU table, so a flood of distinct addresses costs bounded memory;
    an address evicted from the table starts again with a full bucket.
    """

    def __init__(
        self, rate: float, burst: float, capacity: int = DEFAULT_ADDRESS_TABLE_SIZE
    ) -> None:
        if rate <= 0 or burst < 1 or capacity <= 0:
            raise ValueError("rate must be positive, burst at least 1, capacity positive")
        self.rate = rate
        self.burst = burst
        self.capacity = capacity
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, address: str, now: float) -> bool:
        """Whether a new connection from ``address`` at ``now`` is within its rate."""
        bucket = self._buckets.get(address)
        if bucket is None:
            while len(self._buckets) >= self.capacity:
                self._buckets.popitem(last=False)
            bucket = self._buckets[address] = TokenBucket(self.rate, self.burst, now)
        else:
            self._buckets.move_to_end(address)
        return bucket.try_take(1, now)
