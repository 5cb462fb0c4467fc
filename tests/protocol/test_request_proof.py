"""Request proofs (DPoP pattern): a proof binds one request to the key its token is bound to."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import PayloadError
from protocol.identity import SigningIdentity
from protocol.request_proof import create_proof, verify_proof

NOW = 1_800_000_000
SIGNER = SigningIdentity.from_seed(bytes(range(32)))
TOKEN = "header.payload.signature"
REQUEST = {"method": "POST", "target": "/v1/registration-keys?x=1", "body": b'{"tags":[]}'}


def _proof(**changes: object) -> str:
    arguments = {**REQUEST, "access_token": TOKEN, "now": NOW, **changes}
    signer = arguments.pop("signer", SIGNER)
    return create_proof(signer, **arguments)  # type: ignore[arg-type]


def _verify(proof: str, **changes: object):
    arguments = {
        **REQUEST,
        "access_token": TOKEN,
        "expected_key_id": SIGNER.public.key_id,
        "now": NOW,
        **changes,
    }
    return verify_proof(proof, **arguments)  # type: ignore[arg-type]


def test_proof_verifies_for_the_request_it_was_made_for() -> None:
    verified = _verify(_proof(proof_id="id-1"))
    assert verified.proof_id == "id-1"
    assert verified.key == SIGNER.public


def test_fresh_proofs_carry_distinct_ids() -> None:
    assert _verify(_proof()).proof_id != _verify(_proof()).proof_id


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("method", "DELETE"),
        ("target", "/v1/registration-keys"),
        ("body", b'{"tags":["x"]}'),
        ("access_token", "another.token.value"),
        ("expected_key_id", SigningIdentity.from_seed(b"\x01" * 32).public.key_id),
        ("now", NOW + 61),
        ("now", NOW - 61),
    ],
)
def test_proof_is_refused_when_the_request_differs(field: str, value: object) -> None:
    with pytest.raises(PayloadError):
        _verify(_proof(), **{field: value})


def test_proof_signed_by_another_key_is_refused() -> None:
    other = SigningIdentity.from_seed(b"\x02" * 32)
    with pytest.raises(PayloadError, match="not bound"):
        _verify(_proof(signer=other))


def test_proof_with_key_swapped_under_the_signature_is_refused() -> None:
    import base64
    import json

    claims_part, signature = _proof().split(".")
    claims = json.loads(base64.urlsafe_b64decode(claims_part + "=="))
    other = SigningIdentity.from_seed(b"\x03" * 32)
    claims["jwk"] = base64.urlsafe_b64encode(other.public.raw).decode().rstrip("=")
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    with pytest.raises(PayloadError):
        _verify(forged + "." + signature, expected_key_id=other.public.key_id)


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), replacement=st.characters(codec="ascii"))
def test_any_changed_character_makes_the_proof_fail(position: int, replacement: str) -> None:
    proof = _proof()
    index = position % len(proof)
    if proof[index] == replacement:
        return
    tampered = proof[:index] + replacement + proof[index + 1 :]
    with pytest.raises(PayloadError):
        _verify(tampered)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=3000))
def test_arbitrary_text_is_refused_with_a_payload_error(text: str) -> None:
    with pytest.raises(PayloadError):
        _verify(text)


@pytest.mark.parametrize(
    "change",
    [{"iat": 2**60}, {"htu": "/v1/\ud800"}],  # no RFC 8785 encoding, yet signed by the holder
    ids=["integer past 2**53", "lone surrogate"],
)
def test_signed_claims_without_a_canonical_form_are_refused_as_a_payload_error(
    change: dict[str, object],
) -> None:
    import base64
    import json

    from protocol.domains import Purpose
    from protocol.identity import b64url

    claims_part, _ = _proof().split(".")
    claims = json.loads(base64.urlsafe_b64decode(claims_part + "=="))
    claims.update(change)
    encoded = json.dumps(claims).encode()  # ASCII escapes: a lone surrogate survives as \ud800
    signature = SIGNER.sign(Purpose.REQUEST_PROOF, encoded)
    with pytest.raises(PayloadError, match="canonical"):
        _verify(b64url(encoded) + "." + b64url(signature))
