"""Who is waiting for whom: the pairing state machine shared by the TCP and UDP paths. Sans-I/O.

A session is keyed by (transport, session id). The first side to arrive waits; the other side
arriving pairs the session; a side arriving for a session that already has that side (waiting
or paired) is refused. Limits on waiting sides and on sessions are checked here, so every
decision and its reason come from one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from protocol.relay_token import Side
from relay.wire import Reason

Endpoint = TypeVar("Endpoint")
SessionKey = tuple[str, str]


@dataclass
class WaitingSide(Generic[Endpoint]):
    """A side that arrived first and waits for its peer."""

    key: SessionKey
    side: Side
    endpoint: Endpoint
    arrived_at: float


@dataclass(frozen=True)
class Arrival(Generic[Endpoint]):
    """What happens to a side that arrived: wait, pair with ``peer``, or refusal for ``reason``."""

    reason: Reason
    peer: WaitingSide[Endpoint] | None = None

    @property
    def refused(self) -> bool:
        """Whether the side was refused."""
        return self.reason not in (Reason.WAITING, Reason.PAIRED)


class PairingRegistry(Generic[Endpoint]):
    """Waiting sides and paired sessions, with the concurrency limits the relay enforces."""

    def __init__(self, *, max_sessions: int, max_waiting: int) -> None:
        if max_sessions <= 0 or max_waiting <= 0:
            raise ValueError("session limits must be positive")
        self.max_sessions = max_sessions
        self.max_waiting = max_waiting
        self._waiting: dict[SessionKey, WaitingSide[Endpoint]] = {}
        self._paired: set[SessionKey] = set()

    @property
    def waiting_count(self) -> int:
        """Sides waiting for their peer."""
        return len(self._waiting)

    @property
    def paired_count(self) -> int:
        """Sessions with both sides present."""
        return len(self._paired)

    @property
    def full(self) -> bool:
        """Whether a new session would be refused too_many_sessions."""
        return len(self._waiting) + len(self._paired) >= self.max_sessions

    def is_paired(self, key: SessionKey) -> bool:
        """Whether ``key`` names a paired session."""
        return key in self._paired

    def arrive(
        self, key: SessionKey, side: Side, endpoint: Endpoint, now: float
    ) -> Arrival[Endpoint]:
        """Decide what happens to ``side`` of session ``key`` arriving at ``now``."""
        if key in self._paired:
            return Arrival(Reason.SAME_SIDE)
        waiting = self._waiting.get(key)
        if waiting is not None:
            if waiting.side == side:
                return Arrival(Reason.SAME_SIDE)
            del self._waiting[key]
            self._paired.add(key)
            return Arrival(Reason.PAIRED, waiting)
        if self.full:
            return Arrival(Reason.TOO_MANY_SESSIONS)
        if len(self._waiting) >= self.max_waiting:
            return Arrival(Reason.TOO_MANY_WAITING)
        self._waiting[key] = WaitingSide(key, side, endpoint, now)
        return Arrival(Reason.WAITING)

    def withdraw(self, key: SessionKey, endpoint: Endpoint) -> bool:
        """Remove a waiting side that gave up; return False if it is no longer waiting."""
        waiting = self._waiting.get(key)
        if waiting is None or waiting.endpoint is not endpoint:
            return False
        del self._waiting[key]
        return True

    def end(self, key: SessionKey) -> None:
        """Forget a paired session that has ended."""
        self._paired.discard(key)

    def expired_waiting(self, now: float, pair_timeout: float) -> list[WaitingSide[Endpoint]]:
        """Waiting sides that have waited longer than ``pair_timeout`` (they stay registered)."""
        return [w for w in self._waiting.values() if now - w.arrived_at >= pair_timeout]
