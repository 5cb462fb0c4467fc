"""Sliding anti-replay window for datagram counters (RFC 6479: a ring of bitmap blocks).

A counter is acceptable when it was never accepted before and is greater than
``highest - window_size``, where ``highest`` is the largest counter accepted so far. Callers ask
``is_acceptable`` before verifying a frame and ``accept`` only after its tag verified, so a forged
frame can never mark a counter as seen or move the window.
"""

from __future__ import annotations

from protocol.errors import ReplayError

BLOCK_BITS = 64
DEFAULT_RING_BLOCKS = 32  # 2048 bits of bitmap, a window of 1984 counters
MAX_COUNTER = 2**64 - 1
_BLOCK_SHIFT = 6  # log2(BLOCK_BITS)
_BIT_MASK = BLOCK_BITS - 1


class ReplayWindow:
    """RFC 6479 replay window: O(1) per counter, one bitmap word per 64 counters."""

    __slots__ = ("_blocks", "_highest", "_ring_mask", "window_size")

    def __init__(self, ring_blocks: int = DEFAULT_RING_BLOCKS) -> None:
        if ring_blocks < 2 or ring_blocks & (ring_blocks - 1):
            raise ValueError("ring_blocks must be a power of two, at least 2")
        self._blocks = [0] * ring_blocks
        self._ring_mask = ring_blocks - 1
        # One block is always being filled, so only the others count as guaranteed history.
        self.window_size = (ring_blocks - 1) * BLOCK_BITS
        self._highest = -1

    @property
    def highest(self) -> int | None:
        """The largest counter accepted so far, or None before the first."""
        return None if self._highest < 0 else self._highest

    def is_acceptable(self, counter: int) -> bool:
        """Whether ``counter`` is new and inside the window (does not change the window)."""
        if counter < 0 or counter > MAX_COUNTER:
            return False
        if counter > self._highest:
            return True
        if counter <= self._highest - self.window_size:
            return False
        block = self._blocks[(counter >> _BLOCK_SHIFT) & self._ring_mask]
        return not (block >> (counter & _BIT_MASK)) & 1

    def accept(self, counter: int) -> None:
        """Mark ``counter`` seen, only once its frame verified; ReplayError if not acceptable."""
        highest = self._highest
        if counter > highest:
            if counter > MAX_COUNTER:
                raise ReplayError(f"counter {counter} does not fit in 64 bits")
            if counter >> _BLOCK_SHIFT == highest >> _BLOCK_SHIFT:
                self._highest = counter  # same block: nothing to clear (the usual case)
            else:
                self._advance_to(counter)
        elif not self.is_acceptable(counter):
            raise ReplayError(f"counter {counter} was already seen or is older than the window")
        index = (counter >> _BLOCK_SHIFT) & self._ring_mask
        self._blocks[index] |= 1 << (counter & _BIT_MASK)

    def _advance_to(self, counter: int) -> None:
        old_block = self._highest >> _BLOCK_SHIFT if self._highest >= 0 else -1
        new_block = counter >> _BLOCK_SHIFT
        # Blocks between the old top and the new top hold counters nobody has seen: clear them.
        for step in range(min(new_block - old_block, len(self._blocks))):
            self._blocks[(new_block - step) & self._ring_mask] = 0
        self._highest = counter
