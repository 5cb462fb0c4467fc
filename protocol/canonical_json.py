"""RFC 8785 (JCS) canonical JSON, fast where the standard library provably agrees.

Signed payloads and audit records are signed over their RFC 8785 encoding, and every audit
append and every verified export line encodes at least once. The reference encoder (the
``rfc8785`` package) is pure Python; ``json``'s C encoder with sorted keys, no whitespace and
``ensure_ascii=False`` writes the very same bytes for the values these formats carry:

* strings: both escape only ``"``, ``\\`` and U+0000–U+001F, using ``\\b \\t \\n \\f \\r`` and
  otherwise ``\\u00hh`` in lower-case hex, and write everything else as is (UTF-8);
* integers within ±(2**53 - 1), ``true``, ``false`` and ``null``: written alike;
* object keys: JCS sorts by UTF-16 code units, ``json`` by code points; the two orders agree
  whenever every key is ASCII.

So a value made only of ``dict`` (ASCII keys), ``list``, ``str``, ``int`` in that range, ``bool``
and ``None`` takes the fast path; anything else (floats, large integers, non-ASCII keys, other
types, deep nesting) goes to the reference encoder. tests/protocol/test_canonical_json.py checks
the two against each other on generated values.
"""

from __future__ import annotations

import json
from typing import Any

import rfc8785

MAX_SAFE_INTEGER = 2**53 - 1
# Deeper values take the reference encoder (which refuses what it cannot encode).
MAX_FAST_DEPTH = 32

_encode_fast = json.JSONEncoder(
    ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
).encode


class CanonicalJsonError(ValueError):
    """The value has no RFC 8785 encoding (a float NaN, a lone surrogate, an unknown type…)."""


def canonical_json(value: Any) -> bytes:
    """The RFC 8785 encoding of ``value``; CanonicalJsonError if it has none."""
    if _fast_path_agrees(value):
        try:
            return _encode_fast(value).encode("utf-8")
        except UnicodeEncodeError:
            raise CanonicalJsonError("text with no UTF-8 encoding (a lone surrogate)") from None
    try:
        encoded: bytes = rfc8785.dumps(value)
    except (rfc8785.CanonicalizationError, ValueError, TypeError, UnicodeError, RecursionError):
        raise CanonicalJsonError("value has no RFC 8785 encoding") from None
    return encoded


def _fast_path_agrees(value: Any) -> bool:
    """Whether the standard library encodes ``value`` exactly as RFC 8785 does."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        kind = type(item)
        if kind is str or kind is bool or item is None:
            continue
        if kind is int:
            if not -MAX_SAFE_INTEGER <= item <= MAX_SAFE_INTEGER:
                return False
            continue
        if depth >= MAX_FAST_DEPTH:
            return False
        if kind is dict:
            for key, child in item.items():
                if type(key) is not str or not key.isascii():
                    return False
                pending.append((child, depth + 1))
        elif kind is list:
            pending.extend([(child, depth + 1) for child in item])
        else:
            return False
    return True
