"""Token buckets and the per-address rate limiter, with time passed in."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.rate_limits import AddressRateLimiter, TokenBucket


@settings(max_examples=200)
@given(
    rate=st.floats(min_value=1, max_value=1e6),
    burst=st.floats(min_value=1, max_value=1e6),
    charges=st.lists(
        st.tuples(st.floats(min_value=0, max_value=2), st.integers(min_value=1, max_value=10**6)),
        max_size=50,
    ),
)
def test_a_caller_that_waits_as_told_never_exceeds_burst_plus_rate_times_time(rate, burst, charges):
    bucket = TokenBucket(rate, burst, now=0.0)
    now = 0.0
    spent = 0
    largest = 0
    for gap, amount in charges:
        now += gap
        spent += amount
        largest = max(largest, amount)
        now += bucket.charge(amount, now)  # the caller sleeps for the delay it is given
    assert spent <= burst + rate * now + largest * 1e-9 + 1e-6 * spent


def test_a_bucket_in_debt_asks_for_the_time_the_debt_takes_to_repay():
    bucket = TokenBucket(rate=100, burst=100, now=0)
    assert bucket.charge(100, 0) == 0
    assert bucket.charge(50, 0) == 0.5
    assert bucket.balance(0.5) == 0


def test_rate_limiter_allows_a_burst_then_the_rate_per_address():
    limiter = AddressRateLimiter(rate=1, burst=3)
    assert [limiter.allow("10.0.0.1", 0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("10.0.0.2", 0)
    assert limiter.allow("10.0.0.1", 1.0)
    assert not limiter.allow("10.0.0.1", 1.0)


def test_rate_limiter_memory_is_bounded():
    limiter = AddressRateLimiter(rate=1, burst=1, capacity=10)
    for index in range(100):
        limiter.allow(f"10.0.{index}.1", 0)
    assert len(limiter) == 10
