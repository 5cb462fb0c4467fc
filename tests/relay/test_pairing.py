"""The pairing state machine: random arrivals, departures and ends never break its invariants."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from protocol.relay_token import Side
from relay.pairing import PairingRegistry
from relay.wire import Reason

SESSIONS = [("tcp", f"s{i}") for i in range(5)]


def test_second_side_pairs_with_the_first_and_the_same_side_is_refused():
    registry: PairingRegistry[str] = PairingRegistry(max_sessions=10, max_waiting=10)
    assert registry.arrive(("tcp", "a"), Side.AGENT, "agent-1", 0).reason == Reason.WAITING
    assert registry.arrive(("tcp", "a"), Side.AGENT, "agent-2", 0).reason == Reason.SAME_SIDE
    paired = registry.arrive(("tcp", "a"), Side.OPERATOR, "operator-1", 1)
    assert paired.reason == Reason.PAIRED and paired.peer.endpoint == "agent-1"
    assert registry.arrive(("tcp", "a"), Side.OPERATOR, "operator-2", 1).reason == Reason.SAME_SIDE
    assert registry.arrive(("udp", "a"), Side.OPERATOR, "udp", 1).reason == Reason.WAITING


class PairingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.registry: PairingRegistry[object] = PairingRegistry(max_sessions=3, max_waiting=2)
        self.waiting: dict[tuple[str, str], tuple[Side, object]] = {}
        self.paired: set[tuple[str, str]] = set()

    @rule(key=st.sampled_from(SESSIONS), side=st.sampled_from(list(Side)))
    def arrive(self, key, side):
        endpoint = object()
        arrival = self.registry.arrive(key, side, endpoint, 0.0)
        if key in self.paired:
            assert arrival.reason == Reason.SAME_SIDE
        elif key in self.waiting:
            waiting_side, waiting_endpoint = self.waiting[key]
            if waiting_side == side:
                assert arrival.reason == Reason.SAME_SIDE
            else:
                assert arrival.reason == Reason.PAIRED
                assert arrival.peer.endpoint is waiting_endpoint
                del self.waiting[key]
                self.paired.add(key)
        elif len(self.waiting) + len(self.paired) >= 3:
            assert arrival.reason == Reason.TOO_MANY_SESSIONS
        elif len(self.waiting) >= 2:
            assert arrival.reason == Reason.TOO_MANY_WAITING
        else:
            assert arrival.reason == Reason.WAITING
            self.waiting[key] = (side, endpoint)

    @rule(key=st.sampled_from(SESSIONS))
    def withdraw(self, key):
        entry = self.waiting.pop(key, None)
        assert self.registry.withdraw(key, entry[1] if entry else object()) == (entry is not None)

    @rule(key=st.sampled_from(SESSIONS))
    def end(self, key):
        self.paired.discard(key)
        self.registry.end(key)

    @invariant()
    def counts_match_and_stay_within_limits(self):
        assert self.registry.waiting_count == len(self.waiting) <= 2
        assert self.registry.paired_count == len(self.paired)
        assert self.registry.waiting_count + self.registry.paired_count <= 3


PairingMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30)
TestPairingMachine = PairingMachine.TestCase
