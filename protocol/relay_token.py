"""Relay tokens: what each side of a session presents to the relay, and the UDP credential MAC.

A relay token is an EdDSA JWT (``typ`` = RELAY_TOKEN_TYPE) signed by the rendezvous relay-token
key. Claims:

- ``sid``  session id; the relay pairs the two sides by it.
- ``side`` ``"operator"`` or ``"agent"``.
- ``aud``  the relay id: a relay accepts only tokens minted for itself.
- ``iss``  the rendezvous issuer name.
- ``iat``/``exp`` seconds; the lifetime is short and at most MAX_RELAY_TOKEN_LIFETIME_SECONDS.
- ``jti``  a random token id; the relay refuses one it has already seen.
- ``udpk`` base64url of UDP_CREDENTIAL_SIZE random bytes: this side's UDP credential. Only this
  side and the relay see it. It keys the MAC that lets a side prove who it is when its address
  changes (NAT rebinding, roaming). It is a secret: the relay must never log it, and
  RelayTokenClaims keeps it out of ``repr``.

The relay holds no key that can read session traffic; the UDP credential only authenticates
datagrams to the relay.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from protocol.domains import Purpose, framed_message
from protocol.errors import PayloadError, TokenError
from protocol.identity import PublicIdentity, SigningIdentity, b64url, b64url_decode

# protocol.tokens (and with it pyjwt) is imported inside the functions that issue or verify:
# a client that only presents its token and MACs UDP datagrams, such as every `tucdesk exec`,
# starts faster without it.

DEFAULT_RELAY_TOKEN_ISSUER = "tucdesk-rendezvous"  # noqa: S105 (an issuer name, not a secret)
DEFAULT_RELAY_TOKEN_LIFETIME_SECONDS = 60
MAX_RELAY_TOKEN_LIFETIME_SECONDS = 300
RELAY_TOKEN_LEEWAY_SECONDS = 5
UDP_CREDENTIAL_SIZE = 32
TOKEN_ID_SIZE = 16
MAX_SESSION_ID_SIZE = 128
MAX_RELAY_ID_SIZE = 128
MAX_TOKEN_ID_SIZE = 64
CREDENTIAL_MAC_SIZE = 16
# A relay's replay cache must remember a token id at least as long as the token can be valid.
TOKEN_ID_MEMORY_SECONDS = MAX_RELAY_TOKEN_LIFETIME_SECONDS + 2 * RELAY_TOKEN_LEEWAY_SECONDS
_COUNTER = struct.Struct("!Q")
# verify_token checks time claims too; relay tokens get their own, tighter check after it.
_TIME_CHECKED_HERE_LEEWAY = 1e15
MAX_TOKEN_HEADER_SIZE = 1024
MAX_KEY_ID_SIZE = 256
# ClockSkewEstimate: this many distinct tokens refused for time within the window, whose ages
# (relay time - iat) agree within the spread, point at the clocks rather than at the clients.
CLOCK_SKEW_SAMPLES = 3
CLOCK_SKEW_WINDOW_SECONDS = 300.0
CLOCK_SKEW_SPREAD_SECONDS = 2.0
# ... and that were issued at least this far apart: tokens issued together and presented late
# together (a fan-out from a laptop that then slept) say nothing about the relay's clock.
CLOCK_SKEW_MIN_ISSUE_SPAN_SECONDS = 30.0


class Side(StrEnum):
    """Which end of a session a relay token belongs to."""

    OPERATOR = "operator"
    AGENT = "agent"

    @property
    def other(self) -> Side:
        """The side this one is paired with."""
        return Side.AGENT if self is Side.OPERATOR else Side.OPERATOR


class RelayTokenTimeError(TokenError):
    """The relay token's signature is good but the relay's clock puts it outside its lifetime."""


class RelayTokenExpiredError(RelayTokenTimeError):
    """The relay token's signature is good but it has expired."""


class RelayTokenNotYetValidError(RelayTokenTimeError):
    """The relay token's signature is good but it was issued (or is valid from) in the future."""


class RelayTokenWrongRelayError(TokenError):
    """The relay token's signature is good but it was minted for another relay."""


@dataclass(frozen=True)
class RelayTokenClaims:
    """The verified content of a relay token."""

    session_id: str
    side: Side
    relay_id: str
    issuer: str
    token_id: str
    issued_at: int
    expires_at: int
    udp_credential: bytes = field(repr=False)


def issue_relay_token(
    signer: SigningIdentity,
    *,
    session_id: str,
    side: Side | str,
    relay_id: str,
    now: float,
    issuer: str = DEFAULT_RELAY_TOKEN_ISSUER,
    lifetime: int = DEFAULT_RELAY_TOKEN_LIFETIME_SECONDS,
    token_id: str | None = None,
    udp_credential: bytes | None = None,
) -> str:
    """Mint a relay token for one side of a session (the rendezvous mints two per session)."""
    side = Side(side)
    _check_text("session id", session_id, MAX_SESSION_ID_SIZE)
    _check_text("relay id", relay_id, MAX_RELAY_ID_SIZE)
    if not 0 < lifetime <= MAX_RELAY_TOKEN_LIFETIME_SECONDS:
        raise TokenError(f"relay token lifetime must be 1..{MAX_RELAY_TOKEN_LIFETIME_SECONDS} s")
    token_id = token_id if token_id is not None else b64url(secrets.token_bytes(TOKEN_ID_SIZE))
    _check_text("token id", token_id, MAX_TOKEN_ID_SIZE)
    if udp_credential is None:
        udp_credential = secrets.token_bytes(UDP_CREDENTIAL_SIZE)
    if len(udp_credential) != UDP_CREDENTIAL_SIZE:
        raise TokenError(f"a UDP credential is {UDP_CREDENTIAL_SIZE} bytes")
    from protocol.tokens import RELAY_TOKEN_TYPE, issue_token

    return issue_token(
        signer,
        typ=RELAY_TOKEN_TYPE,
        issuer=issuer,
        audience=relay_id,
        subject=None,
        issued_at=int(now),
        lifetime_seconds=lifetime,
        claims={
            "sid": session_id,
            "side": side.value,
            "jti": token_id,
            "udpk": b64url(udp_credential),
        },
    )


def verify_relay_token(
    token: str,
    keys: Mapping[str, PublicIdentity],
    *,
    relay_id: str,
    issuer: str,
    now: float,
    leeway: float = RELAY_TOKEN_LEEWAY_SECONDS,
) -> RelayTokenClaims:
    """Verify a relay token offline; raise TokenError (or a subclass naming the reason) if not good.

    RelayTokenWrongRelayError and the RelayTokenTimeError kinds (expired, not yet valid) are
    raised only for tokens whose signature verified, so a forged token is always reported as
    plainly invalid.
    """
    if not math.isfinite(now):
        raise ValueError("now must be finite")
    from protocol.tokens import RELAY_TOKEN_TYPE, verify_token

    try:
        # Time is checked below with the relay's own (short) leeway.
        verified = verify_token(
            token, keys, typ=RELAY_TOKEN_TYPE, issuer=issuer, audience=relay_id,
            now=now, leeway=_TIME_CHECKED_HERE_LEEWAY,
        )
    except TokenError:
        if _is_genuine_for_another_relay(token, keys, issuer=issuer, relay_id=relay_id):
            raise RelayTokenWrongRelayError("relay token was minted for another relay") from None
        raise
    claims = verified.claims
    issued_at, expires_at = claims["iat"], claims["exp"]
    if expires_at - issued_at > MAX_RELAY_TOKEN_LIFETIME_SECONDS:
        raise TokenError("relay token lifetime is longer than a relay accepts")
    if issued_at > now + leeway or claims.get("nbf", issued_at) > now + leeway:
        raise RelayTokenNotYetValidError("relay token is not valid yet")
    if now > expires_at + leeway:
        raise RelayTokenExpiredError("relay token has expired")
    session_id = _claim_text(claims, "sid", MAX_SESSION_ID_SIZE)
    token_id = _claim_text(claims, "jti", MAX_TOKEN_ID_SIZE)
    try:
        side = Side(str(claims.get("side")))
    except ValueError:
        raise TokenError("relay token side must be operator or agent") from None
    try:
        credential = b64url_decode(_claim_text(claims, "udpk", 64), max_size=UDP_CREDENTIAL_SIZE)
    except PayloadError:
        raise TokenError("relay token UDP credential is malformed") from None
    if len(credential) != UDP_CREDENTIAL_SIZE:
        raise TokenError("relay token UDP credential is malformed")
    return RelayTokenClaims(
        session_id=session_id,
        side=side,
        relay_id=relay_id,
        issuer=issuer,
        token_id=token_id,
        issued_at=issued_at,
        expires_at=expires_at,
        udp_credential=credential,
    )


def relay_token_key_id(token: str) -> str | None:
    """The ``kid`` in a token's header, unverified (None when it has none or is malformed).

    For deciding whether the relay lacks the signing key; never a reason to trust the token.
    """
    try:
        header = json.loads(b64url_decode(token.split(".", 1)[0], max_size=MAX_TOKEN_HEADER_SIZE))
    except (ValueError, PayloadError, RecursionError):
        return None
    key_id = header.get("kid") if isinstance(header, dict) else None
    if not isinstance(key_id, str) or not 0 < len(key_id) <= MAX_KEY_ID_SIZE:
        return None
    return key_id


class ClockSkewEstimate:
    """Tells whether tokens refused for time point at the relay's clock rather than the clients.

    A relay token is presented moments after the rendezvous issues it, so the relay's time minus
    its ``iat`` is about how far the two clocks differ. One late or early token proves little (a
    slow client, a replayed token); CLOCK_SKEW_SAMPLES distinct ones within
    CLOCK_SKEW_WINDOW_SECONDS that agree within CLOCK_SKEW_SPREAD_SECONDS and were issued at
    least CLOCK_SKEW_MIN_ISSUE_SPAN_SECONDS apart do.
    """

    def __init__(self) -> None:
        self._samples: deque[tuple[float, str, float]] = deque(maxlen=CLOCK_SKEW_SAMPLES)

    def describe_refusal(self, token: str, *, not_yet_valid: bool, now: float) -> str | None:
        """Words for the log line of a token refused for time (expired or not yet valid): how
        far off it was and, once refusals agree (see the class), that the relay's clock may be.

        Reads the token unverified: call it only for a token whose signature verified.
        """
        try:
            payload = json.loads(b64url_decode(token.split(".")[1], max_size=8 * 1024))
            token_id, issued_at = str(payload["jti"]), float(payload["iat"])
        except (IndexError, KeyError, ValueError, TypeError, PayloadError, RecursionError):
            return None
        if not math.isfinite(issued_at):
            return None
        age = now - issued_at
        skew = self.observe(token_id, age, now)
        if not_yet_valid:
            words = f"token issued {-age:.0f} s ahead of the relay's clock"
        else:
            words = f"token issued {age:.0f} s before the relay's clock"
        if skew is not None:
            direction = "behind" if skew < 0 else "ahead of"
            words += (f"; the relay's clock may be off by about {abs(skew):.0f} s "
                      f"({direction} the rendezvous's): check NTP")
        return words

    def observe(self, token_id: str, issued_age: float, now: float) -> float | None:
        """Note a token refused for time; return the clocks' likely difference (relay minus
        rendezvous, in seconds) once the refusals agree on one, else None."""
        if all(seen != token_id for _, seen, _ in self._samples):
            self._samples.append((now, token_id, issued_age))
        recent = [(when, age) for when, _, age in self._samples
                  if now - when <= CLOCK_SKEW_WINDOW_SECONDS]  # fmt: skip
        ages = [age for _, age in recent]
        if len(ages) < CLOCK_SKEW_SAMPLES or max(ages) - min(ages) > CLOCK_SKEW_SPREAD_SECONDS:
            return None
        issued = [when - age for when, age in recent]
        if max(issued) - min(issued) < CLOCK_SKEW_MIN_ISSUE_SPAN_SECONDS:
            return None  # issued together, late together: the clients', not the clock
        return sorted(ages)[len(ages) // 2]


def credential_mac(
    credential: bytes, *, session_id: str, side: Side, kind: int, counter: int
) -> bytes:
    """The MAC proving a UDP datagram of ``kind``/``counter`` comes from the holder of ``side``."""
    if not 0 <= counter < 2**64:
        raise PayloadError("credential counter must fit in 64 bits")
    if not 0 <= kind < 256:
        raise PayloadError("datagram kind must fit in a byte")
    sid = session_id.encode("utf-8")
    message = b"".join(
        (bytes([len(sid)]), sid, side.value.encode("ascii"), bytes([kind]), _COUNTER.pack(counter))
    )
    digest = hmac.new(
        credential, framed_message(Purpose.RELAY_UDP_CREDENTIAL, message), hashlib.sha256
    ).digest()
    return digest[:CREDENTIAL_MAC_SIZE]


def credential_mac_is_valid(
    credential: bytes, mac: bytes, *, session_id: str, side: Side, kind: int, counter: int
) -> bool:
    """Whether ``mac`` is the credential MAC for these fields (compared in constant time)."""
    expected = credential_mac(
        credential, session_id=session_id, side=side, kind=kind, counter=counter
    )
    return hmac.compare_digest(expected, mac)


def _is_genuine_for_another_relay(
    token: str, keys: Mapping[str, PublicIdentity], *, issuer: str, relay_id: str
) -> bool:
    # Only after a signature check under the token's own audience do we call it "another relay's".
    try:
        payload = token.split(".")[1]
        audience = json.loads(b64url_decode(payload, max_size=8 * 1024)).get("aud")
    except (IndexError, ValueError, PayloadError, AttributeError, RecursionError):
        return False
    if not isinstance(audience, str) or audience == relay_id:
        return False
    from protocol.tokens import RELAY_TOKEN_TYPE, verify_token

    try:
        verify_token(
            token, keys, typ=RELAY_TOKEN_TYPE, issuer=issuer, audience=audience,
            now=0, leeway=_TIME_CHECKED_HERE_LEEWAY,
        )
    except TokenError:
        return False
    return True


def _check_text(name: str, value: str, max_size: int) -> None:
    if not isinstance(value, str) or not value or len(value.encode("utf-8")) > max_size:
        raise TokenError(f"{name} must be 1..{max_size} bytes of text")


def _claim_text(claims: Mapping[str, object], name: str, max_size: int) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value or len(value.encode("utf-8")) > max_size:
        raise TokenError(f"relay token {name} claim must be 1..{max_size} bytes of text")
    return value


@dataclass(frozen=True)
class OwnRelayToken:
    """What a client reads from its own relay token to use UDP: session, side and credential."""

    session_id: str
    side: Side
    udp_credential: bytes = field(repr=False)


def read_own_relay_token(token: str) -> OwnRelayToken:
    """Read a relay token the caller was handed, without verifying it (the relay verifies it).

    For the token's holder only: it needs its session id, side and UDP credential to prove
    itself to the relay after its address changes.
    """
    try:
        payload = json.loads(b64url_decode(token.split(".")[1], max_size=8 * 1024))
        side = Side(str(payload["side"]))
        session_id = _claim_text(payload, "sid", MAX_SESSION_ID_SIZE)
        credential = b64url_decode(str(payload["udpk"]), max_size=UDP_CREDENTIAL_SIZE)
    except (IndexError, KeyError, ValueError, TypeError, AttributeError, PayloadError):
        raise TokenError("relay token is malformed") from None
    if len(credential) != UDP_CREDENTIAL_SIZE:
        raise TokenError("relay token UDP credential is malformed")
    return OwnRelayToken(session_id, side, credential)
