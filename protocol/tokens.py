"""EdDSA JWTs on pyjwt: algorithm pinned, kid from a key set, typ checked, and time passed in.

Token types used across TucDesk (the ``typ`` header):
- ``ACCESS_TOKEN_TYPE``: operator access tokens issued by the rendezvous.
- ``SESSION_GRANT_TYPE``: session grants the operator presents to the agent.
- ``RELAY_TOKEN_TYPE``: relay tokens each side presents to the relay.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from protocol.errors import PayloadError, TokenError
from protocol.identity import PublicIdentity, SigningIdentity, b64url_decode

ALGORITHM = "EdDSA"
ACCESS_TOKEN_TYPE = "tucdesk-access+jwt"  # noqa: S105 (a type name, not a secret)
SESSION_GRANT_TYPE = "tucdesk-grant+jwt"
RELAY_TOKEN_TYPE = "tucdesk-relay+jwt"  # noqa: S105 (a type name, not a secret)
DEFAULT_LEEWAY_SECONDS = 30
MAX_TOKEN_SIZE = 8 * 1024
MAX_HEADER_SIZE = 1024
DEFAULT_VERIFIED_CACHE_ENTRIES = 2048
_REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat")


@dataclass(frozen=True)
class VerifiedToken:
    """A token whose signature, type and time claims checked out."""

    kid: str
    typ: str
    claims: dict[str, Any]


def issue_token(
    signer: SigningIdentity,
    *,
    typ: str,
    issuer: str,
    audience: str,
    subject: str | None,
    issued_at: int,
    lifetime_seconds: int,
    claims: Mapping[str, Any] | None = None,
    not_before: int | None = None,
) -> str:
    """Sign an EdDSA JWT with ``kid`` = the signer's key id and the given ``typ``."""
    if lifetime_seconds <= 0:
        raise TokenError("token lifetime must be positive")
    payload: dict[str, Any] = dict(claims or {})
    payload.update(
        {
            "iss": issuer,
            "aud": audience,
            "iat": int(issued_at),
            "exp": int(issued_at) + int(lifetime_seconds),
        }
    )
    if subject is not None:
        payload["sub"] = subject
    if not_before is not None:
        payload["nbf"] = int(not_before)
    headers = {"kid": signer.public.key_id, "typ": typ}
    token = jwt.encode(payload, signer.to_cryptography(), algorithm=ALGORITHM, headers=headers)
    if len(token) > MAX_TOKEN_SIZE:
        raise TokenError(f"token is larger than {MAX_TOKEN_SIZE} bytes")
    return token


def verify_token(
    token: str,
    keys: Mapping[str, PublicIdentity],
    *,
    typ: str,
    issuer: str,
    audience: str,
    now: float,
    leeway: float = DEFAULT_LEEWAY_SECONDS,
) -> VerifiedToken:
    """Verify ``token`` against the key whose id is its ``kid``; raise TokenError with a reason."""
    _check_clock(now, leeway)
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_SIZE:
        raise TokenError("token is missing or too large")
    header = _unverified_header(token)
    if header.get("alg") != ALGORITHM:
        raise TokenError(f"token algorithm must be {ALGORITHM}")
    if header.get("typ") != typ:
        raise TokenError(f"token type must be {typ}")
    kid = header.get("kid")
    if not isinstance(kid, str) or kid not in keys:
        raise TokenError("token is signed by an unknown key")
    try:
        claims = jwt.decode(
            token,
            keys[kid].to_cryptography(),
            algorithms=[ALGORITHM],
            audience=audience,
            issuer=issuer,
            options={
                "require": list(_REQUIRED_CLAIMS),
                # Time claims are checked below against the caller's clock, not pyjwt's.
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
            },
        )
    except jwt.InvalidAudienceError:
        raise TokenError("token audience is wrong") from None
    except jwt.InvalidIssuerError:
        raise TokenError("token issuer is wrong") from None
    except jwt.MissingRequiredClaimError as error:
        raise TokenError(f"token lacks the {error.claim} claim") from None
    except jwt.InvalidSignatureError:
        raise TokenError("token signature does not verify") from None
    except (jwt.PyJWTError, ValueError, RecursionError):
        raise TokenError("token is malformed") from None
    _check_times(claims, now, leeway)
    return VerifiedToken(kid=kid, typ=typ, claims=claims)


def _unverified_header(token: str) -> dict[str, Any]:
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("token is not a compact JWS")
    try:
        header = json.loads(b64url_decode(parts[0], max_size=MAX_HEADER_SIZE))
    except (ValueError, PayloadError, RecursionError):
        raise TokenError("token header is malformed") from None
    if not isinstance(header, dict):
        raise TokenError("token header is malformed")
    return header


def _check_clock(now: float, leeway: float) -> None:
    if not math.isfinite(now) or not math.isfinite(leeway) or leeway < 0:
        # A NaN clock would make every time comparison false and let an expired token through.
        raise ValueError("now and leeway must be finite, leeway not negative")


def _check_times(claims: Mapping[str, Any], now: float, leeway: float) -> None:
    for name in ("exp", "iat", "nbf"):
        value = claims.get(name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise TokenError(f"token {name} must be an integer")
    if now > claims["exp"] + leeway:
        raise TokenError("token has expired")
    if claims["iat"] > now + leeway:
        raise TokenError("token was issued in the future")
    nbf = claims.get("nbf")
    if nbf is not None and nbf > now + leeway:
        raise TokenError("token is not valid yet")


class VerifiedTokenCache:
    """``verify_token`` that remembers tokens whose signature already checked out.

    A service sees the same bearer token on every request until it expires; checking its
    signature again each time is most of the cost of authenticating a read. Only successful
    verifications are kept, keyed by the exact token text and the type, issuer and audience asked
    for, together with the key that verified them: a cached entry is used only while that same
    key is still in the key set passed in. Time claims are checked again on every call, so an
    entry never outlives its token. At most ``max_entries`` are kept (least recently used go
    first). Revocation is not this cache's concern: callers still check it on every request.
    """

    def __init__(self, max_entries: int = DEFAULT_VERIFIED_CACHE_ENTRIES) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str, str, str], tuple[bytes, VerifiedToken]] = (
            OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._entries)

    def holds(self, token: str) -> bool:
        """True if a verification of this exact token text is kept (for any type or audience)."""
        return any(cached == token for cached, _, _, _ in self._entries)

    def verify(
        self,
        token: str,
        keys: Mapping[str, PublicIdentity],
        *,
        typ: str,
        issuer: str,
        audience: str,
        now: float,
        leeway: float = DEFAULT_LEEWAY_SECONDS,
    ) -> VerifiedToken:
        """Like ``verify_token``; a token verified before by the same key skips the signature."""
        _check_clock(now, leeway)
        cache_key = (token, typ, issuer, audience)
        entry = self._entries.get(cache_key)
        if entry is not None:
            key_raw, verified = entry
            current = keys.get(verified.kid)
            if current is not None and current.raw == key_raw:
                try:
                    _check_times(verified.claims, now, leeway)
                except TokenError:
                    del self._entries[cache_key]
                    raise
                self._entries.move_to_end(cache_key)
                return _copy(verified)
            del self._entries[cache_key]
        verified = verify_token(
            token, keys, typ=typ, issuer=issuer, audience=audience, now=now, leeway=leeway
        )
        self._entries[cache_key] = (keys[verified.kid].raw, _copy(verified))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return verified


def _copy(verified: VerifiedToken) -> VerifiedToken:
    # Callers get their own claims, so nothing they do to them can change the cached entry.
    return VerifiedToken(kid=verified.kid, typ=verified.typ, claims=_copy_json(verified.claims))


def _copy_json(value: Any) -> Any:
    if isinstance(value, dict):
        return {name: _copy_json(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_copy_json(item) for item in value]
    return value  # str, int, float, bool, None: immutable
