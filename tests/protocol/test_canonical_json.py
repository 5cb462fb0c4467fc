"""canonical_json writes exactly what the reference RFC 8785 encoder writes, or refuses alike."""

from __future__ import annotations

from typing import Any

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.canonical_json import MAX_SAFE_INTEGER, CanonicalJsonError, canonical_json

# Text with the characters where encoders differ if any: controls, quotes, backslash, DEL,
# U+2028/2029, non-BMP, and (sometimes) lone surrogates, which have no UTF-8 encoding.
TEXT = st.text(
    alphabet=st.one_of(
        st.characters(codec="utf-8"),
        st.sampled_from('\x00\x01\x08\t\n\x0b\x0c\r\x1f"\\/\x7f\u2028\u2029\ue000\uffff😀'),
        st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
    ),
    max_size=20,
)
KEYS = st.one_of(st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=8), TEXT)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-MAX_SAFE_INTEGER, max_value=MAX_SAFE_INTEGER),
    st.integers(),  # beyond the safe range: the reference encoder refuses these
    TEXT,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(KEYS, inner, max_size=5)
    ),
    max_leaves=30,
)


def nested(depth: int) -> Any:
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


DEEP = nested(40)  # deeper than the fast path goes


def reference(value: Any) -> bytes | None:
    try:
        return rfc8785.dumps(value)
    except Exception:  # noqa: BLE001 - any refusal counts as "no encoding"
        return None


def ours(value: Any) -> bytes | None:
    try:
        return canonical_json(value)
    except CanonicalJsonError:
        return None


@settings(max_examples=1500, deadline=None)
@given(VALUES)
def test_agrees_with_the_reference_encoder(value: Any) -> None:
    assert ours(value) == reference(value)


@pytest.mark.parametrize(
    "value",
    [
        {"é": 1, "z": 2, "a": 3},  # non-ASCII keys: sorted by UTF-16 code units
        {"\ue000": 1, "😀": 2},  # where code point and UTF-16 orders disagree
        {"n": 2**53},  # past the safe integer range
        {"f": 1.5},
        [1, (2, 3)],  # a tuple: not a type the fast path knows
        {"deep": DEEP},
    ],
)
def test_values_outside_the_fast_path_still_agree(value: Any) -> None:
    assert ours(value) == reference(value)


def test_what_has_no_encoding_is_refused() -> None:
    for value in ["\ud800", {"k": float("nan")}, {"k": object()}, {1: "non-string key"}]:
        with pytest.raises(CanonicalJsonError):
            canonical_json(value)


def test_code_point_and_utf16_key_orders_differ_and_the_utf16_order_wins() -> None:
    encoded = canonical_json({"\ue000": 1, "😀": 2})
    # UTF-16: U+1F600 is D83D DE00, which sorts before E000; code point order says otherwise.
    assert encoded == '{"😀":2,"\ue000":1}'.encode()
