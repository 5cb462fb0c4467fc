"""Rate limits: a token bucket (bandwidth caps, request rates) and a per-address limiter. Sans-I/O.

Time is passed in (seconds, monotonic) so the arithmetic is tested without a clock.
"""

from __future__ import annotations

from collections import OrderedDict

DEFAULT_ADDRESS_TABLE_SIZE = 65_536


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
