"""protocol.tokens.VerifiedTokenCache: skips only the signature check, and stays bounded."""

from __future__ import annotations

import pytest

from protocol.errors import TokenError
from protocol.identity import PublicIdentity, SigningIdentity
from protocol.tokens import (
    ACCESS_TOKEN_TYPE,
    SESSION_GRANT_TYPE,
    VerifiedToken,
    VerifiedTokenCache,
    issue_token,
)

ISSUER = "https://rendezvous.test"
AUDIENCE = "tucdesk"
NOW = 1_700_000_000
LIFETIME = 600


def _token(signer: SigningIdentity, subject: str = "op_1", typ: str = ACCESS_TOKEN_TYPE) -> str:
    return issue_token(
        signer,
        typ=typ,
        issuer=ISSUER,
        audience=AUDIENCE,
        subject=subject,
        issued_at=NOW,
        lifetime_seconds=LIFETIME,
        claims={"jti": subject},
    )


def _verify(
    cache: VerifiedTokenCache,
    token: str,
    signer: SigningIdentity,
    *,
    keys: dict[str, PublicIdentity] | None = None,
    typ: str = ACCESS_TOKEN_TYPE,
    audience: str = AUDIENCE,
    now: float = NOW + 1,
) -> VerifiedToken:
    keys = {signer.public.key_id: signer.public} if keys is None else keys
    return cache.verify(token, keys, typ=typ, issuer=ISSUER, audience=audience, now=now)


def test_second_verification_of_the_same_token_is_served_from_the_cache() -> None:
    signer = SigningIdentity.generate()
    cache = VerifiedTokenCache()
    token = _token(signer)
    first = _verify(cache, token, signer)
    assert cache.holds(token)
    again = _verify(cache, token, signer)
    assert again.claims == first.claims and again.kid == first.kid


def test_cached_token_is_refused_once_expired() -> None:
    signer = SigningIdentity.generate()
    cache = VerifiedTokenCache()
    token = _token(signer)
    _verify(cache, token, signer)
    with pytest.raises(TokenError, match="expired"):
        _verify(cache, token, signer, now=NOW + LIFETIME + 3600)
    assert not cache.holds(token)


def test_cached_token_is_refused_once_its_key_leaves_the_key_set() -> None:
    signer = SigningIdentity.generate()
    cache = VerifiedTokenCache()
    token = _token(signer)
    _verify(cache, token, signer)
    other = SigningIdentity.generate()
    with pytest.raises(TokenError, match="unknown key"):
        _verify(cache, token, signer, keys={other.public.key_id: other.public})
    assert not cache.holds(token)


def test_cached_token_is_not_served_for_another_type_or_audience() -> None:
    signer = SigningIdentity.generate()
    cache = VerifiedTokenCache()
    token = _token(signer)
    _verify(cache, token, signer)
    with pytest.raises(TokenError, match="type"):
        _verify(cache, token, signer, typ=SESSION_GRANT_TYPE)
    with pytest.raises(TokenError, match="audience"):
        _verify(cache, token, signer, audience="another")


def test_tampered_copy_of_a_cached_token_is_refused() -> None:
    signer = SigningIdentity.generate()
    cache = VerifiedTokenCache()
    token = _token(signer)
    _verify(cache, token, signer)
    header, payload, signature = token.split(".")
    flipped = "AA" if signature[-2:] != "AA" else "BB"
    tampered = ".".join((header, payload, signature[:-2] + flipped))
    with pytest.raises(TokenError):
        _verify(cache, tampered, signer)
    assert not cache.holds(tampered)


def test_refused_tokens_are_not_kept() -> None:
    signer = SigningIdentity.generate()
    cache = VerifiedTokenCache()
    forged = _token(SigningIdentity.generate())
    with pytest.raises(TokenError):
        _verify(cache, forged, signer)
    assert len(cache) == 0


def test_cache_keeps_at_most_max_entries_dropping_the_least_recently_used() -> None:
    signer = SigningIdentity.generate()
    cache = VerifiedTokenCache(max_entries=3)
    tokens = [_token(signer, subject=f"op_{index}") for index in range(5)]
    for token in tokens[:3]:
        _verify(cache, token, signer)
    _verify(cache, tokens[0], signer)  # now the most recently used
    for token in tokens[3:]:
        _verify(cache, token, signer)
    assert len(cache) == 3
    assert cache.holds(tokens[0]) and cache.holds(tokens[3]) and cache.holds(tokens[4])
    assert not cache.holds(tokens[1]) and not cache.holds(tokens[2])


def test_changing_the_returned_claims_does_not_change_the_cached_entry() -> None:
    signer = SigningIdentity.generate()
    cache = VerifiedTokenCache()
    token = _token(signer)
    _verify(cache, token, signer).claims["sub"] = "op_admin"
    assert _verify(cache, token, signer).claims["sub"] == "op_1"
