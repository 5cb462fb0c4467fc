"""NonceCache: replays inside the TTL refused, memory bounded, behaviour equal to a plain model."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ReplayError
from protocol.nonce_cache import MAX_NONCE_SIZE, NonceCache


def test_replay_inside_ttl_is_refused() -> None:
    cache = NonceCache(ttl=60)
    cache.check_and_remember(b"nonce-1", now=100.0)
    with pytest.raises(ReplayError, match="already used"):
        cache.check_and_remember(b"nonce-1", now=130.0)


def test_replay_at_the_end_of_the_ttl_is_still_refused() -> None:
    cache = NonceCache(ttl=60)
    cache.check_and_remember(b"nonce-1", now=100.0)
    with pytest.raises(ReplayError):
        cache.check_and_remember(b"nonce-1", now=160.0)


def test_nonce_is_accepted_again_after_ttl() -> None:
    cache = NonceCache(ttl=60)
    cache.check_and_remember(b"nonce-1", now=100.0)
    cache.check_and_remember(b"nonce-1", now=160.001)
    assert len(cache) == 1


def test_text_and_bytes_nonces_share_one_namespace() -> None:
    cache = NonceCache(ttl=60)
    cache.check_and_remember("abc", now=0.0)
    with pytest.raises(ReplayError):
        cache.check_and_remember(b"abc", now=1.0)


def test_expired_entries_are_dropped() -> None:
    cache = NonceCache(ttl=10)
    for index in range(50):
        cache.check_and_remember(f"n{index}", now=float(index))
    assert len(cache) <= 11


def test_capacity_bounds_memory_and_evicts_the_oldest() -> None:
    cache = NonceCache(ttl=1_000, capacity=3)
    for nonce in (b"a", b"b", b"c", b"d"):
        cache.check_and_remember(nonce, now=1.0)
    assert len(cache) == 3
    assert cache.evictions_before_expiry == 1
    cache.check_and_remember(b"a", now=2.0)  # the oldest was evicted, so it is accepted again
    with pytest.raises(ReplayError):
        cache.check_and_remember(b"d", now=2.0)


def test_capacity_holds_under_a_flood() -> None:
    cache = NonceCache(ttl=1_000, capacity=100)
    for index in range(10_000):
        cache.check_and_remember(index.to_bytes(4, "big"), now=5.0)
    assert len(cache) == 100
    assert cache.evictions_before_expiry == 9_900


@pytest.mark.parametrize("nonce", [b"", "", b"x" * (MAX_NONCE_SIZE + 1)])
def test_empty_or_oversized_nonce_is_refused(nonce: bytes | str) -> None:
    with pytest.raises(ReplayError, match="nonce must be"):
        NonceCache(ttl=1).check_and_remember(nonce, now=0.0)


@pytest.mark.parametrize("nonce", [5, None, ["a"]])
def test_nonce_of_the_wrong_type_is_refused(nonce: object) -> None:
    with pytest.raises(ReplayError):
        NonceCache(ttl=1).check_and_remember(nonce, now=0.0)  # type: ignore[arg-type]


def test_non_finite_clock_is_a_caller_error_and_does_not_flush_the_cache() -> None:
    cache = NonceCache(ttl=60)
    cache.check_and_remember(b"n", now=0.0)
    with pytest.raises(ValueError):
        cache.check_and_remember(b"m", now=math.nan)
    with pytest.raises(ReplayError):
        cache.check_and_remember(b"n", now=1.0)


@pytest.mark.parametrize(
    ("ttl", "capacity"), [(0, 1), (-1, 1), (1, 0), (math.inf, 1), (math.nan, 1)]
)
def test_invalid_configuration_is_refused(ttl: float, capacity: int) -> None:
    with pytest.raises(ValueError):
        NonceCache(ttl=ttl, capacity=capacity)


def test_an_empty_cache_is_truthy() -> None:
    assert NonceCache(ttl=1)


class _ReferenceCache:
    """The obvious model: a dict of nonce -> time seen, expiring on TTL, evicting the oldest."""

    def __init__(self, ttl: float, capacity: int) -> None:
        self.ttl = ttl
        self.capacity = capacity
        self.seen: dict[bytes, float] = {}

    def check_and_remember(self, nonce: bytes, now: float) -> bool:
        self.seen = {key: at for key, at in self.seen.items() if at + self.ttl >= now}
        if nonce in self.seen:
            return False
        while len(self.seen) >= self.capacity:
            oldest = min(self.seen, key=lambda key: self.seen[key])
            del self.seen[oldest]
        self.seen[nonce] = now
        return True


@settings(max_examples=300)
@given(
    ttl=st.integers(min_value=1, max_value=20),
    capacity=st.integers(min_value=1, max_value=8),
    steps=st.lists(
        st.tuples(st.sampled_from([b"a", b"b", b"c", b"d", b"e", b"f", b"g", b"h", b"i", b"j"]),
                  st.integers(min_value=0, max_value=6)),
        max_size=60,
    ),
)
def test_cache_behaves_like_the_reference_model(
    ttl: int, capacity: int, steps: list[tuple[bytes, int]]
) -> None:
    cache = NonceCache(ttl=ttl, capacity=capacity)
    model = _ReferenceCache(ttl, capacity)
    now = 0
    for nonce, advance in steps:
        now += advance  # time never goes backwards, as the cache documents
        expected = model.check_and_remember(nonce, float(now))
        try:
            cache.check_and_remember(nonce, float(now))
            accepted = True
        except ReplayError:
            accepted = False
        assert accepted == expected
        assert len(cache) == len(model.seen) <= capacity
