"""A bounded replay cache: remembers nonces (or token ids) for a TTL, evicting the oldest when full."""

from __future__ import annotations

from collections import OrderedDict

from protocol.errors import ReplayError

DEFAULT_NONCE_CACHE_CAPACITY = 100_000
MAX_NONCE_SIZE = 128


class NonceCache:
    """LRU + TTL set of seen nonces. ``check_and_remember`` raises ReplayError on a repeat.

    When the cache is full the oldest entry is evicted. Callers must pair this with a validity
    window no longer than ``ttl`` so an evicted nonce is one whose payload has expired anyway;
    ``evictions_before_expiry`` counts the cases where that did not hold (capacity too small).
    """

    def __init__(self, ttl: float, capacity: int = DEFAULT_NONCE_CACHE_CAPACITY) -> None:
        if ttl <= 0 or capacity <= 0:
            raise ValueError("ttl and capacity must be positive")
        self.ttl = ttl
        self.capacity = capacity
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self.evictions_before_expiry = 0

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_remember(self, nonce: bytes | str, now: float) -> None:
        """Remember ``nonce`` at time ``now``; raise ReplayError if it is still remembered."""
        key = nonce.encode("utf-8") if isinstance(nonce, str) else bytes(nonce)
        if not key or len(key) > MAX_NONCE_SIZE:
            raise ReplayError(f"nonce must be 1..{MAX_NONCE_SIZE} bytes")
        self._expire(now)
        if key in self._seen:
            raise ReplayError("nonce was already used")
        while len(self._seen) >= self.capacity:
            _, seen_at = self._seen.popitem(last=False)
            if seen_at + self.ttl > now:
                self.evictions_before_expiry += 1
        self._seen[key] = now

    def _expire(self, now: float) -> None:
        # Insertion order is time order as long as callers pass non-decreasing times;
        # an entry is kept if it was seen later than now - ttl.
        while self._seen:
            key, seen_at = next(iter(self._seen.items()))
            if seen_at + self.ttl > now:
                break
            del self._seen[key]
