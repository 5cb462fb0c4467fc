"""The one log line a session leaves: ids, sides, byte counts, duration and close reason.

Never payload bytes, never a token or credential. With blurring on, byte counts are rounded up to
a power of two and durations up to BLUR_SECONDS, so logs do not fingerprint what was typed.
"""

from __future__ import annotations

import math

BLUR_SECONDS = 10


def blur_byte_count(count: int) -> int:
    """``count`` rounded up to the next power of two (0 stays 0)."""
    if count <= 0:
        return 0
    return 1 << (count - 1).bit_length()


def blur_duration(seconds: float) -> int:
    """``seconds`` rounded up to a multiple of BLUR_SECONDS."""
    return int(math.ceil(max(seconds, 0.0) / BLUR_SECONDS) * BLUR_SECONDS)


def session_end_line(
    *,
    transport: str,
    session_id: str,
    bytes_from_operator: int,
    bytes_from_agent: int,
    duration: float,
    reason: str,
    blur: bool,
) -> str:
    """The log line for a session that ended."""
    if blur:
        from_operator: int | str = blur_byte_count(bytes_from_operator)
        from_agent: int | str = blur_byte_count(bytes_from_agent)
        shown_duration = str(blur_duration(duration))
    else:
        from_operator, from_agent = bytes_from_operator, bytes_from_agent
        shown_duration = f"{duration:.3f}"
    return (
        f"session_closed transport={transport} sid={session_id!r} sides=operator,agent "
        f"bytes_from_operator={from_operator} bytes_from_agent={from_agent} "
        f"duration_s={shown_duration} reason={reason}"
    )
