"""The RFC 6479 replay window against a plain reference model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import ReplayError
from protocol.replay_window import MAX_COUNTER, ReplayWindow


class ReferenceWindow:
    """The rule, written the obvious way: a set of every counter seen and the window size."""

    def __init__(self, window_size: int) -> None:
        self.window_size = window_size
        self.seen: set[int] = set()

    def is_acceptable(self, counter: int) -> bool:
        if not 0 <= counter <= MAX_COUNTER or counter in self.seen:
            return False
        return not self.seen or counter > max(self.seen) - self.window_size

    def accept(self, counter: int) -> None:
        self.seen.add(counter)


# Mostly counters near each other (so the window fills and slides), with occasional long jumps.
counters = st.one_of(
    st.integers(0, 600),
    st.integers(0, 5000),
    st.integers(MAX_COUNTER - 300, MAX_COUNTER + 1),
    st.integers(-2, -1),
)


@settings(max_examples=300, deadline=None)
@given(
    ring_blocks=st.sampled_from([2, 4, 32]),
    steps=st.lists(st.tuples(counters, st.booleans()), max_size=120),
)
def test_window_accepts_exactly_what_the_reference_model_accepts(
    ring_blocks: int, steps: list[tuple[int, bool]]
) -> None:
    """``verified`` False models a frame whose tag failed: checked, never accepted."""
    window = ReplayWindow(ring_blocks)
    model = ReferenceWindow(window.window_size)
    for counter, verified in steps:
        acceptable = model.is_acceptable(counter)
        assert window.is_acceptable(counter) == acceptable, counter
        if verified and acceptable:
            window.accept(counter)
            model.accept(counter)


@settings(max_examples=300, deadline=None)
@given(ring_blocks=st.sampled_from([2, 4]), data=st.data())
def test_window_matches_the_model_around_its_edges(ring_blocks: int, data: st.DataObject) -> None:
    """Counters drawn relative to the highest seen: just inside, just outside, just ahead."""
    window = ReplayWindow(ring_blocks)
    model = ReferenceWindow(window.window_size)
    size = window.window_size
    for _ in range(data.draw(st.integers(1, 150), label="steps")):
        highest = max(model.seen, default=0)
        counter = data.draw(
            st.integers(max(0, highest - size - 70), highest + 140), label="counter"
        )
        acceptable = model.is_acceptable(counter)
        assert window.is_acceptable(counter) == acceptable, (counter, highest)
        if acceptable and data.draw(st.booleans(), label="verified"):
            window.accept(counter)
            model.accept(counter)


def test_repeated_counter_is_refused() -> None:
    window = ReplayWindow()
    window.accept(7)
    assert not window.is_acceptable(7)
    with pytest.raises(ReplayError):
        window.accept(7)


def test_counter_older_than_the_window_is_refused_and_newer_ones_inside_are_not() -> None:
    window = ReplayWindow()
    window.accept(10_000)
    assert not window.is_acceptable(10_000 - window.window_size)
    assert window.is_acceptable(10_000 - window.window_size + 1)
    assert window.highest == 10_000


def test_counters_outside_64_bits_are_refused() -> None:
    window = ReplayWindow()
    assert not window.is_acceptable(-1)
    assert not window.is_acceptable(MAX_COUNTER + 1)
    window.accept(MAX_COUNTER)
    assert not window.is_acceptable(MAX_COUNTER)


@pytest.mark.parametrize("ring_blocks", [0, 1, 3, 24])
def test_ring_size_must_be_a_power_of_two(ring_blocks: int) -> None:
    with pytest.raises(ValueError):
        ReplayWindow(ring_blocks)
