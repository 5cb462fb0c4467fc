"""The log lines a session leaves: ``session_paired`` (ids and both sides' addresses) and
``session_closed`` (the same, byte counts, duration and close reason).

Never payload bytes, never a token or credential. With blurring on, byte counts are rounded up to
a power of two and durations up to BLUR_SECONDS, so logs do not fingerprint what was typed, and
peer addresses are cut to their network (IPv4 /24, IPv6 /48, no port).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from protocol.rate_limits import source_block
from relay.refusal_log import show_address

BLUR_SECONDS = 10
BLUR_IPV4_PREFIX = 24
BLUR_IPV6_PREFIX = 48


def blur_byte_count(count: int) -> int:
    """``count`` rounded up to the next power of two (0 stays 0)."""
    if count <= 0:
        return 0
    return 1 << (count - 1).bit_length()


def blur_duration(seconds: float) -> int:
    """``seconds`` rounded up to a multiple of BLUR_SECONDS."""
    return int(math.ceil(max(seconds, 0.0) / BLUR_SECONDS) * BLUR_SECONDS)


def shown_peer(address: object, blur: bool) -> str:
    """A peer's socket address for a log line: ``host:port``, or with ``blur`` only its network
    (``192.0.2.0/24``, ``2001:db8:1::/48``); ``unknown`` when there is none."""
    if not isinstance(address, tuple) or len(address) < 2:
        return "unknown"
    if not blur:
        return show_address(address)
    return _network(str(address[0]).split("%", 1)[0])


def blurred_peer(peer: Callable[[], str] | str) -> str:
    """A refusal line's ``host:port`` (``[v6]:port``) cut to its network as ``shown_peer`` does
    with blurring on; ``peer`` may be a function giving it."""
    text = peer if isinstance(peer, str) else peer()
    host, separator, _ = text.rpartition(":")
    if not separator:
        return "unknown"
    return _network(host.removeprefix("[").removesuffix("]").split("%", 1)[0])


def _network(host: str) -> str:
    """``host``'s network as protocol/rate_limits.source_block groups addresses (an IPv4-mapped
    address as IPv4); ``unknown`` for text that is not an IP address."""
    block = source_block(host, BLUR_IPV4_PREFIX, BLUR_IPV6_PREFIX)
    return block if "/" in block else "unknown"


def _peers(peers: Mapping[str, object] | None, blur: bool) -> str:
    if not peers:
        return ""
    return "".join(
        f" {side}_peer={shown_peer(peers.get(side), blur)}" for side in ("operator", "agent")
    )


def session_paired_line(
    *, transport: str, session_id: str, peers: Mapping[str, object], blur: bool
) -> str:
    """The log line for two sides just paired: the session id and both sides' addresses."""
    return f"session_paired transport={transport} sid={session_id!r}{_peers(peers, blur)}"


def session_end_line(
    *,
    transport: str,
    session_id: str,
    bytes_from_operator: int,
    bytes_from_agent: int,
    duration: float,
    reason: str,
    blur: bool,
    peers: Mapping[str, object] | None = None,
) -> str:
    """The log line for a session that ended; ``peers``: each side's socket address by side
    name (operator, agent), as recorded at pairing."""
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
        f"duration_s={shown_duration} reason={reason}{_peers(peers, blur)}"
    )
