"""Signed timestamped payloads: what is accepted, and every way a forged or stale one is refused."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.domains import Purpose
from protocol.errors import PayloadError, ProtocolError, ReplayError, SignatureError
from protocol.identity import SigningIdentity, b64url, b64url_decode
from protocol.nonce_cache import NonceCache
from protocol.signed_payload import (
    MAX_ENVELOPE_SIZE,
    MAX_FIELD_COUNT,
    MAX_LIST_LENGTH,
    MAX_NESTING_DEPTH,
    MAX_STRING_LENGTH,
    create_signed_payload,
    unverified_fields,
    verify_signed_payload,
)

NOW = 1_800_000_000.0
SKEW = 300
SIGNER = SigningIdentity.from_seed(bytes(range(32)))
OTHER = SigningIdentity.from_seed(bytes(range(1, 33)))


def _cache() -> NonceCache:
    return NonceCache(ttl=2 * SKEW)


def _registration(signer: SigningIdentity = SIGNER, now: float = NOW) -> dict[str, Any]:
    fields = {
        "registration_key": "rk_live_" + "A" * 52,
        "public_key": b64url(signer.public.raw),
        "fingerprint": "machine-1",
        "hostname": "web-01",
    }
    return create_signed_payload(signer, Purpose.REGISTER, fields, now)


def _verify(envelope: object, now: float = NOW, cache: NonceCache | None = None,
            signer: SigningIdentity = SIGNER, purpose: Purpose = Purpose.REGISTER) -> Any:
    cache = _cache() if cache is None else cache
    return verify_signed_payload(envelope, purpose, signer.public, now, SKEW, cache)


def _resign(envelope: dict[str, Any], signer: SigningIdentity = SIGNER,
            purpose: Purpose = Purpose.REGISTER) -> dict[str, Any]:
    """Sign an arbitrary payload by hand, bypassing create_signed_payload's own checks."""
    signature = signer.sign(purpose, rfc8785.dumps(envelope["payload"]))
    return {"payload": envelope["payload"], "signature": b64url(signature)}


def test_signed_payload_round_trips() -> None:
    envelope = _registration()
    verified = _verify(envelope)
    assert verified.fields["hostname"] == "web-01"
    assert "ts" not in verified.fields and "nonce" not in verified.fields
    assert verified.timestamp == int(NOW)
    assert verified.signer == SIGNER.public


def test_envelope_is_json_ready_and_verifies_from_json_text() -> None:
    envelope = _registration()
    assert set(envelope) == {"payload", "signature"}
    assert _verify(json.dumps(envelope)).fields["fingerprint"] == "machine-1"
    assert _verify(json.dumps(envelope).encode(), cache=_cache()).timestamp == int(NOW)


def test_timestamp_is_whole_unix_seconds_and_nonce_is_fresh() -> None:
    first = _registration(now=NOW + 0.9)
    second = _registration(now=NOW + 0.9)
    assert first["payload"]["ts"] == int(NOW)
    assert first["payload"]["nonce"] != second["payload"]["nonce"]
    assert len(b64url_decode(first["payload"]["nonce"])) >= 16


def test_unverified_fields_expose_the_key_to_verify_with() -> None:
    envelope = _registration()
    fields = unverified_fields(envelope)
    assert b64url_decode(fields["public_key"]) == SIGNER.public.raw
    assert "ts" not in fields


def test_bad_signature_is_refused() -> None:
    envelope = _registration()
    signature = bytearray(b64url_decode(envelope["signature"]))
    signature[0] ^= 1
    envelope["signature"] = b64url(bytes(signature))
    with pytest.raises(SignatureError):
        _verify(envelope)


def test_signature_of_the_wrong_length_is_refused() -> None:
    envelope = _registration()
    envelope["signature"] = b64url(b"\x00" * 63)
    with pytest.raises(SignatureError, match="64 bytes"):
        _verify(envelope)


def test_payload_signed_for_another_purpose_is_refused() -> None:
    envelope = create_signed_payload(SIGNER, Purpose.OPERATOR_LOGIN, {"challenge": "c"}, NOW)
    assert _verify(envelope, purpose=Purpose.OPERATOR_LOGIN).fields == {"challenge": "c"}
    with pytest.raises(SignatureError, match=Purpose.AGENT_AUTH.value):
        _verify(envelope, purpose=Purpose.AGENT_AUTH)


@pytest.mark.parametrize("offset", [SKEW + 1, -(SKEW + 1), 10**6, -(10**6)])
def test_timestamp_outside_the_skew_window_is_refused(offset: int) -> None:
    envelope = _registration(now=NOW + offset)
    with pytest.raises(PayloadError, match="skew window"):
        _verify(envelope)


@pytest.mark.parametrize("offset", [SKEW, -SKEW, 0])
def test_timestamp_at_the_edge_of_the_skew_window_is_accepted(offset: int) -> None:
    assert _verify(_registration(now=NOW + offset)).timestamp == int(NOW) + offset


def test_replayed_nonce_is_refused() -> None:
    cache = _cache()
    envelope = _registration()
    _verify(envelope, cache=cache)
    with pytest.raises(ReplayError, match="already used"):
        _verify(copy.deepcopy(envelope), now=NOW + 10, cache=cache)


def test_replay_late_in_the_window_of_a_future_stamped_payload_is_refused() -> None:
    # Stamped SKEW ahead, accepted now, and still fresh until NOW + 2 * SKEW.
    cache = _cache()
    envelope = _registration(now=NOW + SKEW)
    _verify(envelope, cache=cache)
    with pytest.raises(ReplayError):
        _verify(envelope, now=NOW + 2 * SKEW, cache=cache)


def test_nonce_cache_shorter_than_the_window_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="twice the skew window"):
        verify_signed_payload(
            _registration(), Purpose.REGISTER, SIGNER.public, NOW, SKEW, NonceCache(ttl=SKEW)
        )


def test_another_signers_use_of_a_nonce_does_not_block_the_first() -> None:
    cache = _cache()
    mine = _registration()
    theirs = create_signed_payload(
        OTHER, Purpose.REGISTER, {"hostname": "x"}, NOW, nonce=mine["payload"]["nonce"]
    )
    _verify(theirs, cache=cache, signer=OTHER)
    assert _verify(mine, cache=cache).fields["hostname"] == "web-01"


def test_refused_payload_does_not_burn_its_nonce() -> None:
    cache = _cache()
    envelope = _registration()
    forged = copy.deepcopy(envelope)
    forged["payload"]["hostname"] = "evil"
    with pytest.raises(SignatureError):
        _verify(forged, cache=cache)
    assert _verify(envelope, cache=cache).fields["hostname"] == "web-01"


def test_public_key_swapped_under_the_signature_is_refused() -> None:
    envelope = _registration()
    envelope["payload"]["public_key"] = b64url(OTHER.public.raw)
    with pytest.raises(SignatureError):
        _verify(envelope, signer=OTHER)


def test_verifying_with_a_key_other_than_the_signers_is_refused() -> None:
    with pytest.raises(SignatureError):
        _verify(_registration(), signer=OTHER)


@pytest.mark.parametrize(
    ("name", "value"),
    [("hostname", "web-02"), ("ts", int(NOW) + 1), ("nonce", b64url(b"\x01" * 16)),
     ("extra", "field")],
)
def test_field_edited_after_signing_is_refused(name: str, value: object) -> None:
    envelope = _registration()
    envelope["payload"][name] = value
    with pytest.raises(SignatureError):
        _verify(envelope)


def test_field_removed_after_signing_is_refused() -> None:
    envelope = _registration()
    del envelope["payload"]["hostname"]
    with pytest.raises(SignatureError):
        _verify(envelope)


def test_key_order_does_not_matter_to_the_signature() -> None:
    envelope = _registration()
    envelope["payload"] = dict(reversed(list(envelope["payload"].items())))
    assert _verify(envelope).fields["hostname"] == "web-01"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: e.pop("signature"),
        lambda e: e.update(extra=1),
        lambda e: e.update(signature=123),
        lambda e: e.update(signature="not base64!"),
        lambda e: e.update(signature=e["signature"] + "=="),
        lambda e: e.update(payload=[]),
        lambda e: e["payload"].pop("ts"),
        lambda e: e["payload"].pop("nonce"),
        lambda e: e["payload"].update(ts="1800000000"),
        lambda e: e["payload"].update(ts=True),
        lambda e: e["payload"].update(ts=2**60),
        lambda e: e["payload"].update(nonce=b64url(b"short")),
        lambda e: e["payload"].update(nonce=7),
        lambda e: e["payload"].update(nonce="x" * 500),
        lambda e: e["payload"].update(weight=1.5),
        lambda e: e["payload"].update(blob=b"bytes"),
        lambda e: e["payload"].update({"": 1}),
        lambda e: e["payload"].update({"k" * 65: 1}),
        lambda e: e["payload"].update(text="\ud800"),
    ],
)
def test_malformed_envelope_is_refused(mutate: Any) -> None:
    envelope = _registration()
    mutate(envelope)
    with pytest.raises(PayloadError):
        unverified_fields(envelope)
    with pytest.raises(ProtocolError):
        _verify(envelope)


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"null",
        b"[]",
        b"\xff\xfe",
        b'{"payload": {}, "signature": "", "signature": ""}',
        b'{"payload": {"ts": NaN}, "signature": ""}',
        b'{"payload": {"ts": 1e3}, "signature": ""}',
        b"[" * 50_000,
        b"[" * 5_000,
        b" " * (MAX_ENVELOPE_SIZE + 1),
    ],
)
def test_malformed_json_is_refused(text: bytes) -> None:
    with pytest.raises(PayloadError):
        unverified_fields(text)


def test_duplicate_keys_in_json_are_refused() -> None:
    text = json.dumps(_registration())
    forged = text.replace('"hostname": "web-01"', '"hostname": "web-01", "hostname": "evil"')
    assert forged != text
    with pytest.raises(PayloadError, match="duplicate"):
        _verify(forged)


@pytest.mark.parametrize(
    "fields",
    [
        {f"f{i}": i for i in range(MAX_FIELD_COUNT + 1)},
        {"list": list(range(MAX_LIST_LENGTH + 1))},
        {"text": "x" * (MAX_STRING_LENGTH + 1)},
        {"deep": {"a": {"b": {"c": {"d": 1}}}}},
        {f"f{i}": "x" * MAX_STRING_LENGTH for i in range(5)},
        {"number": 2**53},
        {"ts": 5},
        {"nonce": "x"},
    ],
)
def test_oversized_or_reserved_fields_are_refused_at_creation(fields: dict[str, Any]) -> None:
    with pytest.raises(PayloadError):
        create_signed_payload(SIGNER, Purpose.REGISTER, fields, NOW)


def test_oversized_payload_signed_by_hand_is_refused() -> None:
    envelope = _registration()
    envelope["payload"].update({f"f{i}": "x" * MAX_STRING_LENGTH for i in range(5)})
    with pytest.raises(PayloadError, match="larger than"):
        _verify(_resign(envelope))


def test_payload_at_the_nesting_limit_round_trips() -> None:
    fields: dict[str, Any] = {"a": {"b": {"c": [None, True, -(2**53) + 1, "x"]}}}
    assert MAX_NESTING_DEPTH == 4
    envelope = create_signed_payload(SIGNER, Purpose.REGISTER, fields, NOW)
    assert _verify(envelope).fields == fields


def test_caller_supplied_nonce_is_used() -> None:
    nonce = b64url(b"\x07" * 16)
    envelope = create_signed_payload(SIGNER, Purpose.REGISTER, {}, NOW, nonce=nonce)
    assert _verify(envelope).nonce == nonce


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=25,
)


@settings(max_examples=300)
@given(json_values)
def test_arbitrary_json_values_raise_only_protocol_errors(value: object) -> None:
    for candidate in (value, {"payload": value, "signature": "A" * 86}):
        with pytest.raises(ProtocolError):
            _verify(candidate)


@settings(max_examples=300)
@given(
    st.dictionaries(st.sampled_from(["ts", "nonce", "hostname", "x"]), json_values, max_size=4),
    st.text(max_size=100),
)
def test_arbitrary_payload_fields_raise_only_protocol_errors(
    payload: dict[str, Any], signature: str
) -> None:
    with pytest.raises(ProtocolError):
        _verify({"payload": payload, "signature": signature})


@settings(max_examples=300)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_arbitrary_bytes_raise_only_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        _verify(data)


def _nested(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return children | st.lists(children, max_size=3) | st.dictionaries(
        st.text(min_size=1, max_size=5), children, max_size=3
    )


scalars = st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=20)


@settings(max_examples=100)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=20).filter(lambda name: name not in ("ts", "nonce")),
        # The payload object is level 1, so field values may nest three more levels.
        _nested(_nested(_nested(scalars))),
        max_size=8,
    )
)
def test_any_payload_within_limits_round_trips(fields: dict[str, Any]) -> None:
    envelope = create_signed_payload(SIGNER, Purpose.AGENT_AUTH, fields, NOW)
    assert _verify(json.dumps(envelope), purpose=Purpose.AGENT_AUTH).fields == fields
