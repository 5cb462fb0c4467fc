"""Fair sharing of the relay-wide bandwidth cap (--total-bandwidth) among sessions, TCP and UDP.

Every paired session, of either transport, counts in the share's denominator (total cap /
sessions). A TCP session above its share waits out the relay-wide bucket's debt; a UDP one has
its datagrams dropped while the bucket is in debt. One within its share does neither.
"""

from __future__ import annotations

# A session's allowance holds this many seconds of its share, and never less than
# MIN_FAIR_SHARE_BURST (a screenful, a command's output).
FAIR_SHARE_BURST_SECONDS = 0.5
MIN_FAIR_SHARE_BURST = 64 * 1024


class FairShare:
    """A session's use of its fair share (total cap / sessions) of the relay-wide bandwidth.

    A session within its share never waits out the relay-wide bucket's debt; only sessions
    above it do, so bulk transfers that saturate the cap slow each other down, not a shell or
    an ``exec`` beside them. Every byte is still charged to the relay-wide bucket, so the total
    stays at the cap. The allowance is a token bucket refilled at the share's current rate; its
    debt is bounded by one burst, so a session that was busy is treated as light soon after it
    calms down.
    """

    __slots__ = ("_balance", "_updated")

    def __init__(self, now: float = 0.0) -> None:
        self._balance = float(MIN_FAIR_SHARE_BURST)
        self._updated = now

    def within(self, moved: int, now: float, share: float) -> bool:
        """Charge ``moved`` bytes at ``now``; whether the session is still within ``share``
        bytes/s (with its burst)."""
        burst = max(share * FAIR_SHARE_BURST_SECONDS, MIN_FAIR_SHARE_BURST)
        balance = min(burst, self._balance + (now - self._updated) * share) - moved
        self._updated = now
        self._balance = max(balance, -burst)
        return balance >= 0
