"""The relay's TCP wire format: the client hello and the one-line status replies. Sans-I/O.

A client opens a TCP connection and sends exactly one hello::

    magic "TDR1" (4 bytes) | version (1 byte, = WIRE_VERSION) | token length (u16, big-endian)
    | token (ASCII compact JWT, 1..MAX_HELLO_TOKEN_SIZE bytes)

and then sends nothing until the relay answers. The relay answers with status lines, each an
ASCII reason code from Reason followed by ``\\n``: ``waiting`` (the first side, while the other is
not there yet) and then ``paired``, after which the connection carries the session's bytes both
ways. Any other code is a refusal and the relay closes the connection after sending it.

A health check (the rendezvous's relay check) sends a probe instead: a hello whose token is
PROBE_TOKEN. The relay answers at once with one status line and closes the connection: ``ok``
when it takes new sessions, else why not: ``shutting_down`` (draining after a shutdown signal),
``too_many_sessions`` (max_sessions reached) or ``no_keys`` (no relay-token key, or a JWKS not
fetched for JWKS_STALE_INTERVALS refresh intervals; relay/keyset.py). A probe is no refusal: it is
counted in tucdesk_relay_probes_total, not logged. A relay older than the probe answers it with
a refusal (token_invalid: the probe is no token).
"""

from __future__ import annotations

import struct
from enum import StrEnum

from relay.errors import HelloError

HELLO_MAGIC = b"TDR1"
WIRE_VERSION = 1
HELLO_HEADER = struct.Struct("!4sBH")
HELLO_HEADER_SIZE = HELLO_HEADER.size
MAX_HELLO_TOKEN_SIZE = 4096
MAX_HELLO_SIZE = HELLO_HEADER_SIZE + MAX_HELLO_TOKEN_SIZE
MAX_STATUS_LINE_SIZE = 64
# The token of a probe hello: no compact JWT (it has no dots), so it can never be a real one.
PROBE_TOKEN = "probe"  # noqa: S105 (a wire constant, not a secret)


class Reason(StrEnum):
    """Every code the relay sends back or records when a connection or session ends."""

    # The token_* members are reason codes, not secrets (hence the noqa: S105).

    # Progress (sent to the client).
    WAITING = "waiting"
    PAIRED = "paired"
    # The answer to a probe hello from a relay that takes new sessions.
    OK = "ok"
    # A probe answer only: the relay has no relay-token key, or its JWKS has not been fetched
    # for over JWKS_STALE_INTERVALS refresh intervals (it may lack a rotated key).
    NO_KEYS = "no_keys"
    # Refusals (sent to the client, then the connection is closed; each one is counted).
    BAD_HELLO = "bad_hello"
    HELLO_TOO_LARGE = "hello_too_large"
    HELLO_TIMEOUT = "hello_timeout"
    TOKEN_INVALID = "token_invalid"  # noqa: S105
    TOKEN_EXPIRED = "token_expired"  # noqa: S105
    TOKEN_NOT_YET_VALID = "token_not_yet_valid"  # noqa: S105
    WRONG_RELAY = "wrong_relay"
    TOKEN_REUSED = "token_reused"  # noqa: S105
    SAME_SIDE = "same_side"
    PAIR_TIMEOUT = "pair_timeout"
    EARLY_DATA = "early_data"
    TOO_MANY_SESSIONS = "too_many_sessions"
    TOO_MANY_WAITING = "too_many_waiting"
    TOO_MANY_CONNECTIONS = "too_many_connections"
    RATE_LIMITED = "rate_limited"
    SHUTTING_DOWN = "shutting_down"
    PEER_GONE = "peer_gone"
    # UDP progress: a rebinding was accepted.
    REBOUND = "rebound"
    # Ends of a paired session (recorded and logged; the stream just closes).
    CLOSED = "closed"
    IDLE_TIMEOUT = "idle_timeout"
    RESET = "reset"
    ABANDONED = "abandoned"


PROGRESS_REASONS = frozenset({Reason.WAITING, Reason.PAIRED, Reason.REBOUND})
REFUSAL_REASONS = frozenset(
    {
        Reason.BAD_HELLO,
        Reason.HELLO_TOO_LARGE,
        Reason.HELLO_TIMEOUT,
        Reason.TOKEN_INVALID,
        Reason.TOKEN_EXPIRED,
        Reason.TOKEN_NOT_YET_VALID,
        Reason.WRONG_RELAY,
        Reason.TOKEN_REUSED,
        Reason.SAME_SIDE,
        Reason.PAIR_TIMEOUT,
        Reason.EARLY_DATA,
        Reason.TOO_MANY_SESSIONS,
        Reason.TOO_MANY_WAITING,
        Reason.TOO_MANY_CONNECTIONS,
        Reason.RATE_LIMITED,
        Reason.SHUTTING_DOWN,
        Reason.PEER_GONE,
    }
)
# What a probe may be answered.
PROBE_ANSWERS = frozenset(
    {Reason.OK, Reason.SHUTTING_DOWN, Reason.TOO_MANY_SESSIONS, Reason.NO_KEYS}
)
SESSION_END_REASONS = frozenset(
    {Reason.CLOSED, Reason.IDLE_TIMEOUT, Reason.RESET, Reason.SHUTTING_DOWN}
)


def encode_hello(token: str) -> bytes:
    """The hello a client sends first: magic, version, token length and the token."""
    body = token.encode("ascii")
    if not 0 < len(body) <= MAX_HELLO_TOKEN_SIZE:
        raise HelloError(Reason.HELLO_TOO_LARGE, f"token must be 1..{MAX_HELLO_TOKEN_SIZE} bytes")
    return HELLO_HEADER.pack(HELLO_MAGIC, WIRE_VERSION, len(body)) + body


def encode_probe() -> bytes:
    """The probe hello a health check sends: the relay answers ``ok`` or why it takes no new
    session (PROBE_ANSWERS)."""
    return encode_hello(PROBE_TOKEN)


def parse_hello_header(header: bytes) -> int:
    """Check the fixed hello header and return the token length that follows it."""
    if len(header) != HELLO_HEADER_SIZE:
        raise HelloError(Reason.BAD_HELLO, "hello header is truncated")
    magic, version, token_length = HELLO_HEADER.unpack(header)
    if magic != HELLO_MAGIC or version != WIRE_VERSION:
        raise HelloError(Reason.BAD_HELLO, "not a TucDesk relay hello of a known version")
    if token_length == 0:
        raise HelloError(Reason.BAD_HELLO, "hello carries no token")
    if token_length > MAX_HELLO_TOKEN_SIZE:
        raise HelloError(Reason.HELLO_TOO_LARGE, "hello token is larger than the relay accepts")
    return int(token_length)


def parse_hello_token(body: bytes) -> str:
    """Decode the hello's token bytes (printable ASCII) into the token string."""
    if not body or len(body) > MAX_HELLO_TOKEN_SIZE:
        raise HelloError(Reason.HELLO_TOO_LARGE, "hello token size is out of range")
    if not all(0x21 <= byte <= 0x7E for byte in body):
        raise HelloError(Reason.BAD_HELLO, "hello token is not printable ASCII")
    return body.decode("ascii")


def parse_hello(data: bytes) -> str:
    """Parse one complete hello (header and token, nothing after it)."""
    token_length = parse_hello_header(data[:HELLO_HEADER_SIZE])
    body = data[HELLO_HEADER_SIZE:]
    if len(body) != token_length:
        raise HelloError(Reason.BAD_HELLO, "hello length does not match its token")
    return parse_hello_token(body)


def encode_status(reason: Reason) -> bytes:
    """The status line for ``reason``."""
    return reason.value.encode("ascii") + b"\n"


def parse_status(line: bytes) -> Reason:
    """Parse one status line (with its ``\\n``) into a Reason; unknown codes are a HelloError."""
    if len(line) > MAX_STATUS_LINE_SIZE or not line.endswith(b"\n"):
        raise HelloError(Reason.BAD_HELLO, "relay status line is malformed")
    try:
        return Reason(line[:-1].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise HelloError(Reason.BAD_HELLO, "relay sent an unknown status") from None
