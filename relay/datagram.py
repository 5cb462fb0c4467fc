"""The relay's UDP datagram format. Sans-I/O.

Every datagram starts with a kind byte:

- ``HELLO``  (client → relay) ``0x01 | token length u16 | token``: join a session. Resent by the
  client until it gets a status; a resend from the same address with the same token is not a
  reuse.
- ``DATA``   (both ways) ``0x02 | payload``: forwarded unchanged to the paired side's address.
- ``REBIND`` (client → relay) ``0x03 | credential proof``: "this new address is me".
- ``CLOSE``  (client → relay) ``0x04 | credential proof``: end the session now.
- ``STATUS`` (relay → client) ``0x81 | reason code (ASCII)``.

A credential proof is ``sid length u8 | sid | side u8 (0 operator, 1 agent) | counter u64 |
MAC`` where the MAC (protocol.relay_token.credential_mac) is keyed by the side's UDP credential
from its relay token and covers the kind, session id, side and counter. Counters must strictly
increase, so a captured proof cannot be replayed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from protocol.relay_token import (
    CREDENTIAL_MAC_SIZE,
    MAX_SESSION_ID_SIZE,
    Side,
    credential_mac,
)
from relay.errors import HelloError
from relay.wire import MAX_HELLO_TOKEN_SIZE, Reason, parse_hello_token

HELLO = 0x01
DATA = 0x02
REBIND = 0x03
CLOSE = 0x04
STATUS = 0x81
MAX_DATAGRAM_SIZE = 65_507
MAX_UDP_HELLO_SIZE = 3 + MAX_HELLO_TOKEN_SIZE
_TOKEN_LENGTH = struct.Struct("!H")
_COUNTER = struct.Struct("!Q")
_SIDE_CODES = {Side.OPERATOR: 0, Side.AGENT: 1}
_SIDES_BY_CODE = {code: side for side, code in _SIDE_CODES.items()}


@dataclass(frozen=True)
class CredentialProof:
    """A parsed REBIND or CLOSE: who claims to be sending it, and the MAC that must prove it."""

    kind: int
    session_id: str
    side: Side
    counter: int
    mac: bytes


def encode_udp_hello(token: str) -> bytes:
    """A HELLO datagram carrying ``token``."""
    body = token.encode("ascii")
    if not 0 < len(body) <= MAX_HELLO_TOKEN_SIZE:
        raise HelloError(Reason.HELLO_TOO_LARGE, f"token must be 1..{MAX_HELLO_TOKEN_SIZE} bytes")
    return bytes([HELLO]) + _TOKEN_LENGTH.pack(len(body)) + body


def parse_udp_hello(datagram: bytes) -> str:
    """The token inside a HELLO datagram."""
    if len(datagram) > MAX_UDP_HELLO_SIZE:
        raise HelloError(Reason.HELLO_TOO_LARGE, "hello datagram is larger than allowed")
    if len(datagram) < 3 or datagram[0] != HELLO:
        raise HelloError(Reason.BAD_HELLO, "not a hello datagram")
    (length,) = _TOKEN_LENGTH.unpack_from(datagram, 1)
    if length != len(datagram) - 3:
        raise HelloError(Reason.BAD_HELLO, "hello length does not match its token")
    return parse_hello_token(datagram[3:])


def encode_data(payload: bytes) -> bytes:
    """A DATA datagram carrying ``payload``."""
    if len(payload) > MAX_DATAGRAM_SIZE - 1:
        raise HelloError(Reason.BAD_HELLO, "payload does not fit in one datagram")
    return bytes([DATA]) + payload


def encode_status_datagram(reason: Reason) -> bytes:
    """A STATUS datagram for ``reason``."""
    return bytes([STATUS]) + reason.value.encode("ascii")


def parse_status_datagram(datagram: bytes) -> Reason:
    """The reason in a STATUS datagram."""
    if len(datagram) < 2 or datagram[0] != STATUS or len(datagram) > 64:
        raise HelloError(Reason.BAD_HELLO, "not a status datagram")
    try:
        return Reason(datagram[1:].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise HelloError(Reason.BAD_HELLO, "relay sent an unknown status") from None


def encode_credential_proof(
    kind: int, credential: bytes, *, session_id: str, side: Side, counter: int
) -> bytes:
    """A REBIND or CLOSE datagram proving possession of ``side``'s UDP credential."""
    if kind not in (REBIND, CLOSE):
        raise ValueError("credential proofs are REBIND or CLOSE datagrams")
    sid = session_id.encode("utf-8")
    if not 0 < len(sid) <= MAX_SESSION_ID_SIZE:
        raise ValueError("session id is out of range")
    mac = credential_mac(credential, session_id=session_id, side=side, kind=kind, counter=counter)
    return b"".join(
        (bytes([kind, len(sid)]), sid, bytes([_SIDE_CODES[side]]), _COUNTER.pack(counter), mac)
    )


def parse_credential_proof(datagram: bytes) -> CredentialProof:
    """Parse a REBIND or CLOSE datagram (the MAC is checked by the caller, who has the key)."""
    if len(datagram) < 2 or datagram[0] not in (REBIND, CLOSE):
        raise HelloError(Reason.BAD_HELLO, "not a credential proof")
    sid_length = datagram[1]
    expected = 2 + sid_length + 1 + _COUNTER.size + CREDENTIAL_MAC_SIZE
    if sid_length == 0 or len(datagram) != expected:
        raise HelloError(Reason.BAD_HELLO, "credential proof has the wrong length")
    try:
        session_id = datagram[2 : 2 + sid_length].decode("utf-8")
    except UnicodeDecodeError:
        raise HelloError(Reason.BAD_HELLO, "session id is not UTF-8") from None
    offset = 2 + sid_length
    side = _SIDES_BY_CODE.get(datagram[offset])
    if side is None:
        raise HelloError(Reason.BAD_HELLO, "unknown side")
    (counter,) = _COUNTER.unpack_from(datagram, offset + 1)
    mac = datagram[offset + 1 + _COUNTER.size :]
    return CredentialProof(datagram[0], session_id, side, counter, mac)
