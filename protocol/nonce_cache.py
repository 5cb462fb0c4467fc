"""Bounded replay cache: remembers nonces (or token ids) for a TTL, evicting the oldest if full."""

from __future__ import annotations

import math
from collections import OrderedDict

from protocol.errors import ReplayError

DEFAULT_NONCE_CACHE_CAPACITY = 100_000
MAX_NONCE_SIZE = 128


class NonceCache:
    """LRU + TTL set of seen nonces. ``check_and_remember`` raises ReplayError on a repeat.

    A nonce is remembered from ``now`` through ``now + ttl`` inclusive. When the cache is full the
    oldest entry is evicted. Callers must pair this with a validity
    window no longer than ``ttl`` so an evicted nonce is one whose payload has expired anyway;
    ``evictions_before_expiry`` counts the cases where that did not hold (capacity too small).
    """

    def __init__(self, ttl: float, capacity: int = DEFAULT_NONCE_CACHE_CAPACITY) -> None:
        if not math.isfinite(ttl) or ttl <= 0 or capacity <= 0:
            raise ValueError("ttl and capacity must be positive (and ttl finite)")
        self.ttl = ttl
        self.capacity = capacity
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self.evictions_before_expiry = 0

    def __len__(self) -> int:
        return len(self._seen)

    def __bool__(self) -> bool:
        # An empty cache is still a cache: without this, ``cache or NonceCache(...)`` would
        # silently swap a shared, empty cache for a private one and let replays through.
        return True

    def check_and_remember(self, nonce: bytes | str, now: float) -> None:
        """Remember ``nonce`` at time ``now``; raise ReplayError if it is still remembered."""
        if not math.isfinite(now):
            # A NaN clock would expire every entry at once and let every replay through.
            raise ValueError("now must be a finite number of seconds")
        if isinstance(nonce, str):
            key = nonce.encode("utf-8", errors="surrogatepass")
        elif isinstance(nonce, bytes | bytearray | memoryview):
            key = bytes(nonce)
        else:
            raise ReplayError("nonce must be bytes or text")
        if not key or len(key) > MAX_NONCE_SIZE:
            raise ReplayError(f"nonce must be 1..{MAX_NONCE_SIZE} bytes")
        self._expire(now)
        if key in self._seen:
            raise ReplayError("nonce was already used")
        while len(self._seen) >= self.capacity:
            _, seen_at = self._seen.popitem(last=False)
            if seen_at + self.ttl >= now:
                self.evictions_before_expiry += 1
        self._seen[key] = now

    def _expire(self, now: float) -> None:
        # Insertion order is time order as long as callers pass non-decreasing times;
        # an entry is kept through now == seen_at + ttl inclusive, matching validity windows
        # whose edges are inclusive too.
        while self._seen:
            key, seen_at = next(iter(self._seen.items()))
            if seen_at + self.ttl >= now:
                break
            del self._seen[key]
