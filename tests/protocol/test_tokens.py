"""EdDSA JWTs: the round trip, and each way a token is refused, one test per refusal."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import TokenError
from protocol.identity import SigningIdentity, b64url
from protocol.tokens import (
    ACCESS_TOKEN_TYPE,
    DEFAULT_LEEWAY_SECONDS,
    MAX_TOKEN_SIZE,
    RELAY_TOKEN_TYPE,
    SESSION_GRANT_TYPE,
    VerifiedToken,
    issue_token,
    verify_token,
)

NOW = 1_800_000_000
ISSUER = "https://rendezvous.test"
AUDIENCE = "tucdesk-operator"
LIFETIME = 300
SIGNER = SigningIdentity.from_seed(bytes(range(32)))
INTRUDER = SigningIdentity.from_seed(bytes(range(100, 132)))
KEYS = {SIGNER.public.key_id: SIGNER.public}


def _issue(**changes: Any) -> str:
    arguments: dict[str, Any] = {
        "typ": ACCESS_TOKEN_TYPE,
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "subject": "operator-1",
        "issued_at": NOW,
        "lifetime_seconds": LIFETIME,
        "claims": {"team_id": "team-1", "role": "admin", "jti": "token-1"},
    }
    arguments.update(changes)
    return issue_token(SIGNER, **arguments)


def _verify(
    token: str, now: float = NOW, typ: str = ACCESS_TOKEN_TYPE, **changes: Any
) -> VerifiedToken:
    arguments: dict[str, Any] = {"typ": typ, "issuer": ISSUER, "audience": AUDIENCE, "now": now}
    arguments.update(changes)
    return verify_token(token, KEYS, **arguments)


def _sign_claims(claims: dict[str, Any], signer: SigningIdentity = SIGNER,
                 headers: dict[str, Any] | None = None) -> str:
    """A correctly signed EdDSA token with exactly ``claims``, bypassing issue_token's checks."""
    header = {"kid": SIGNER.public.key_id, "typ": ACCESS_TOKEN_TYPE}
    header.update(headers or {})
    return jwt.encode(claims, signer.to_cryptography(), algorithm="EdDSA", headers=header)


def _b64json(value: object) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def _valid_claims() -> dict[str, Any]:
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": "operator-1", "iat": NOW,
            "exp": NOW + LIFETIME}


def test_token_round_trips_with_claims_kid_and_type() -> None:
    verified = _verify(_issue())
    assert verified.kid == SIGNER.public.key_id
    assert verified.typ == ACCESS_TOKEN_TYPE
    assert verified.claims["sub"] == "operator-1"
    assert verified.claims["team_id"] == "team-1"
    assert verified.claims["exp"] == NOW + LIFETIME


def test_token_header_names_algorithm_kid_and_type() -> None:
    header = jwt.get_unverified_header(_issue())
    assert header == {"alg": "EdDSA", "kid": SIGNER.public.key_id, "typ": ACCESS_TOKEN_TYPE}


@pytest.mark.parametrize("typ", [ACCESS_TOKEN_TYPE, SESSION_GRANT_TYPE, RELAY_TOKEN_TYPE])
def test_each_token_type_round_trips(typ: str) -> None:
    assert _verify(_issue(typ=typ), typ=typ).typ == typ


def test_alg_none_token_is_refused() -> None:
    header = {"alg": "none", "typ": ACCESS_TOKEN_TYPE, "kid": SIGNER.public.key_id}
    token = f"{_b64json(header)}.{_b64json(_valid_claims())}."
    with pytest.raises(TokenError, match="algorithm must be EdDSA"):
        _verify(token)


@pytest.mark.parametrize("key", [SIGNER.public.raw, SIGNER.public.to_pem()])
def test_hs256_token_keyed_with_the_public_key_is_refused(key: bytes) -> None:
    # The classic algorithm-confusion forgery: HMAC "signed" with the verifier's public key.
    header = {"alg": "HS256", "typ": ACCESS_TOKEN_TYPE, "kid": SIGNER.public.key_id}
    signing_input = f"{_b64json(header)}.{_b64json(_valid_claims())}"
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    with pytest.raises(TokenError, match="algorithm must be EdDSA"):
        _verify(f"{signing_input}.{b64url(mac)}")


def test_unknown_kid_is_refused() -> None:
    token = _sign_claims(_valid_claims(), INTRUDER, {"kid": INTRUDER.public.key_id})
    with pytest.raises(TokenError, match="unknown key"):
        _verify(token)


def test_missing_kid_is_refused() -> None:
    token = jwt.encode(_valid_claims(), SIGNER.to_cryptography(), algorithm="EdDSA",
                       headers={"typ": ACCESS_TOKEN_TYPE})
    with pytest.raises(TokenError, match="unknown key"):
        _verify(token)


def test_wrong_type_is_refused() -> None:
    with pytest.raises(TokenError, match="type must be"):
        _verify(_issue(typ=SESSION_GRANT_TYPE))


def test_signature_by_another_key_under_a_known_kid_is_refused() -> None:
    token = _sign_claims(_valid_claims(), INTRUDER)
    with pytest.raises(TokenError, match="signature does not verify"):
        _verify(token)


def test_claims_edited_after_signing_are_refused() -> None:
    header, _, signature = _issue().split(".")
    claims = _valid_claims() | {"role": "admin", "sub": "someone-else"}
    with pytest.raises(TokenError, match="signature does not verify"):
        _verify(f"{header}.{_b64json(claims)}.{signature}")


def test_expired_token_is_refused() -> None:
    with pytest.raises(TokenError, match="expired"):
        _verify(_issue(), now=NOW + LIFETIME + DEFAULT_LEEWAY_SECONDS + 1)


def test_expiry_at_the_leeway_boundary_is_accepted() -> None:
    assert _verify(_issue(), now=NOW + LIFETIME + DEFAULT_LEEWAY_SECONDS).claims["sub"]


def test_expiry_just_past_the_leeway_boundary_is_refused() -> None:
    with pytest.raises(TokenError, match="expired"):
        _verify(_issue(), now=NOW + LIFETIME + DEFAULT_LEEWAY_SECONDS + 0.001)


def test_leeway_is_configurable() -> None:
    with pytest.raises(TokenError, match="expired"):
        _verify(_issue(), now=NOW + LIFETIME + 1, leeway=0)


def test_token_issued_in_the_future_is_refused() -> None:
    with pytest.raises(TokenError, match="issued in the future"):
        _verify(_issue(issued_at=NOW + DEFAULT_LEEWAY_SECONDS + 1))


def test_token_issued_within_leeway_of_now_is_accepted() -> None:
    assert _verify(_issue(issued_at=NOW + DEFAULT_LEEWAY_SECONDS)).claims["iat"] > NOW


def test_token_not_valid_yet_is_refused() -> None:
    with pytest.raises(TokenError, match="not valid yet"):
        _verify(_issue(not_before=NOW + DEFAULT_LEEWAY_SECONDS + 1))


def test_wrong_audience_is_refused() -> None:
    with pytest.raises(TokenError, match="audience"):
        _verify(_issue(audience="tucdesk-relay"))


def test_wrong_issuer_is_refused() -> None:
    with pytest.raises(TokenError, match="issuer"):
        _verify(_issue(issuer="https://evil.test"))


@pytest.mark.parametrize("claim", ["iss", "aud", "exp", "iat"])
def test_missing_required_claim_is_refused(claim: str) -> None:
    claims = _valid_claims()
    del claims[claim]
    with pytest.raises(TokenError, match=f"lacks the {claim} claim"):
        _verify(_sign_claims(claims))


@pytest.mark.parametrize(
    ("claim", "value"),
    [("exp", "never"), ("exp", float(NOW + 60)), ("iat", True), ("nbf", "now"), ("exp", None)],
)
def test_time_claim_that_is_not_an_integer_is_refused(claim: str, value: object) -> None:
    with pytest.raises(TokenError):
        _verify(_sign_claims(_valid_claims() | {claim: value}))


@pytest.mark.parametrize(("now", "leeway"), [(float("nan"), 30), (NOW, float("nan")), (NOW, -1)])
def test_non_finite_clock_or_leeway_is_a_caller_error(now: float, leeway: float) -> None:
    with pytest.raises(ValueError):
        _verify(_issue(), now=now, leeway=leeway)


def test_non_positive_lifetime_cannot_be_issued() -> None:
    with pytest.raises(TokenError):
        _issue(lifetime_seconds=0)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "...",
        "!!!.???.###",
        "eyJhbGciOiJFZERTQSJ9.e30.",
        _b64json([1, 2]) + ".e30.AA",
        _b64json("EdDSA") + ".e30.AA",
        b64url(b"\xff\xfe") + ".e30.AA",
        b64url(b"[" * 1500) + ".e30.AA",
        "x" * (MAX_TOKEN_SIZE + 1),
    ],
)
def test_malformed_token_is_refused(token: str) -> None:
    with pytest.raises(TokenError):
        _verify(token)


def test_valid_header_with_garbage_payload_or_signature_is_refused() -> None:
    header, claims, signature = _issue().split(".")
    for token in (f"{header}.{claims}.", f"{header}.!!.{signature}", f"{header}.{claims}.@@",
                  f"{header}.{b64url(b'[' * 3000)}.{signature}"):
        with pytest.raises(TokenError):
            _verify(token)


@pytest.mark.parametrize("token", [None, b"a.b.c", 42])
def test_token_that_is_not_text_is_refused(token: object) -> None:
    with pytest.raises(TokenError):
        _verify(token)  # type: ignore[arg-type]


@settings(max_examples=300)
@given(st.text(max_size=300))
def test_arbitrary_text_raises_only_token_error(token: str) -> None:
    with pytest.raises(TokenError):
        _verify(token)


@settings(max_examples=200)
@given(
    st.dictionaries(st.text(max_size=5), st.none() | st.integers() | st.text(max_size=5),
                    max_size=4),
    st.binary(max_size=80),
)
def test_arbitrary_headers_and_signatures_raise_only_token_error(
    header: dict[str, Any], signature: bytes
) -> None:
    token = f"{_b64json(header)}.{_b64json(_valid_claims())}.{b64url(signature)}"
    with pytest.raises(TokenError):
        _verify(token)

