"""Signed timestamped payloads: agent registration, challenge answers and operator login.

An envelope is JSON-ready::

    {"payload": {...fields, "ts": <int Unix seconds>, "nonce": "<b64url>"}, "signature": "<b64url>"}

The signature is Ed25519 with a Purpose prefix (protocol.domains) over the RFC 8785 (JCS)
canonical encoding of ``payload``. A verifier accepts a payload only if its ``ts`` is within the
clock-skew window of its own clock and its nonce was not seen inside that window, so a captured
payload cannot be replayed, nor re-used as a signature for another purpose.

Field values are JSON without floats: str, int (within ±(2**53 - 1)), bool, None, lists and
objects with string keys. Bytes go in as base64url text (protocol.identity.b64url).
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from protocol.canonical_json import CanonicalJsonError, canonical_json
from protocol.domains import Purpose
from protocol.errors import PayloadError, ReplayError, SignatureError
from protocol.identity import SIGNATURE_SIZE, PublicIdentity, SigningIdentity, b64url, b64url_decode
from protocol.nonce_cache import NonceCache

JsonValue: TypeAlias = "str | int | bool | None | list[JsonValue] | dict[str, JsonValue]"

TIMESTAMP_FIELD = "ts"
NONCE_FIELD = "nonce"
RESERVED_FIELDS = frozenset({TIMESTAMP_FIELD, NONCE_FIELD})
ENVELOPE_KEYS = frozenset({"payload", "signature"})

DEFAULT_SKEW_SECONDS = 300  # the recommended window; pair it with NonceCache(ttl=2 * window)
NONCE_SIZE = 16
MIN_NONCE_SIZE = 16
MAX_NONCE_SIZE = 64
MAX_ENVELOPE_SIZE = 16 * 1024
MAX_FIELD_COUNT = 32
MAX_FIELD_NAME_LENGTH = 64
MAX_STRING_LENGTH = 4096
MAX_LIST_LENGTH = 64
MAX_NESTING_DEPTH = 4
MAX_SAFE_INTEGER = 2**53 - 1


@dataclass(frozen=True)
class VerifiedPayload:
    """A payload whose shape, signature, timestamp and nonce all checked out."""

    fields: dict[str, Any]  # JSON values within this module's limits; check their types on use
    timestamp: int
    nonce: str
    signer: PublicIdentity


def create_signed_payload(
    signer: SigningIdentity,
    purpose: Purpose,
    fields: Mapping[str, JsonValue],
    now: float,
    nonce: str | None = None,
) -> dict[str, Any]:
    """Sign ``fields`` plus ``ts`` (whole seconds of ``now``) and a fresh nonce for ``purpose``.

    Returns the JSON-ready envelope. Raises PayloadError if the fields break a limit.
    """
    if not isinstance(fields, Mapping):
        raise PayloadError("payload fields must be a mapping")
    reserved = RESERVED_FIELDS.intersection(fields)
    if reserved:
        raise PayloadError(f"payload fields must not include the reserved {sorted(reserved)}")
    if not math.isfinite(now):
        raise ValueError("now must be a finite number of seconds")
    payload: dict[str, Any] = dict(fields)
    payload[TIMESTAMP_FIELD] = math.floor(now)
    payload[NONCE_FIELD] = b64url(secrets.token_bytes(NONCE_SIZE)) if nonce is None else nonce
    _check_payload(payload)
    canonical = _canonical(payload)
    envelope = {"payload": payload, "signature": b64url(signer.sign(purpose, canonical))}
    if len(_canonical(envelope)) > MAX_ENVELOPE_SIZE:
        raise PayloadError(f"signed payload is larger than {MAX_ENVELOPE_SIZE} bytes")
    return envelope


def unverified_fields(envelope: object) -> dict[str, Any]:
    """The payload fields (without ts and nonce), unverified: for finding the key to verify with.

    Nothing returned here may be trusted until verify_signed_payload accepts the envelope.
    """
    payload, _ = _parse_envelope(envelope)
    return {name: value for name, value in payload.items() if name not in RESERVED_FIELDS}


def verify_signed_payload(
    envelope: object,
    purpose: Purpose,
    public_key: PublicIdentity,
    now: float,
    skew_seconds: float,
    nonce_cache: NonceCache,
) -> VerifiedPayload:
    """Accept ``envelope`` only if ``public_key`` signed it for ``purpose``, fresh and not replayed.

    ``envelope`` is the parsed JSON object, or its raw JSON text as str or bytes. The nonce cache
    must remember nonces for at least twice the skew window: a payload stamped ``skew_seconds``
    ahead stays acceptable that long. Raises PayloadError, ReplayError or SignatureError.
    """
    if not math.isfinite(now) or not math.isfinite(skew_seconds) or skew_seconds < 0:
        raise ValueError("now and skew_seconds must be finite, skew_seconds not negative")
    if nonce_cache.ttl < 2 * skew_seconds:
        raise ValueError(
            f"the nonce cache TTL ({nonce_cache.ttl}s) must be at least twice the skew window "
            f"({skew_seconds}s), or a replay late in the window would be accepted"
        )
    payload, signature = _parse_envelope(envelope)
    timestamp = payload[TIMESTAMP_FIELD]
    if abs(timestamp - now) > skew_seconds:
        direction = "ahead of" if timestamp > now else "behind"
        raise PayloadError(
            f"{purpose.value}: payload timestamp is {abs(timestamp - now):.0f}s {direction} this "
            f"clock, beyond the {skew_seconds:.0f}s skew window; check the sender's clock"
        )
    public_key.verify(purpose, _canonical(payload), signature)
    nonce = payload[NONCE_FIELD]
    try:
        nonce_cache.check_and_remember(_replay_key(purpose, public_key, nonce), now)
    except ReplayError:
        raise ReplayError(f"{purpose.value}: payload nonce was already used (a replay)") from None
    fields = {name: value for name, value in payload.items() if name not in RESERVED_FIELDS}
    return VerifiedPayload(fields=fields, timestamp=timestamp, nonce=nonce, signer=public_key)


def _replay_key(purpose: Purpose, public_key: PublicIdentity, nonce: str) -> bytes:
    # Scoped by signer and purpose so nobody can burn another sender's nonce with their own key.
    scope = purpose.value.encode("ascii") + b"\x00" + public_key.raw + nonce.encode("ascii")
    return hashlib.sha256(scope).digest()


def _parse_envelope(envelope: object) -> tuple[dict[str, Any], bytes]:
    if isinstance(envelope, str | bytes | bytearray):
        envelope = _parse_json(envelope)
    if not isinstance(envelope, dict):
        raise PayloadError("signed payload must be a JSON object")
    if set(envelope) != ENVELOPE_KEYS:
        raise PayloadError(f"signed payload must have exactly the keys {sorted(ENVELOPE_KEYS)}")
    payload = envelope["payload"]
    signature_text = envelope["signature"]
    if not isinstance(signature_text, str):
        raise PayloadError("signature must be base64url text")
    signature = b64url_decode(signature_text, max_size=SIGNATURE_SIZE)
    if len(signature) != SIGNATURE_SIZE:
        raise SignatureError(f"signature must be {SIGNATURE_SIZE} bytes")
    _check_payload(payload)
    if len(_canonical(envelope)) > MAX_ENVELOPE_SIZE:
        raise PayloadError(f"signed payload is larger than {MAX_ENVELOPE_SIZE} bytes")
    return payload, signature


def _parse_json(data: str | bytes | bytearray) -> object:
    if len(data) > MAX_ENVELOPE_SIZE:
        raise PayloadError(f"signed payload is larger than {MAX_ENVELOPE_SIZE} bytes")
    try:
        return json.loads(
            data,
            object_pairs_hook=_object_without_duplicates,
            parse_float=_refuse_float,
            parse_constant=_refuse_float,
        )
    except PayloadError:
        raise
    except (ValueError, RecursionError):
        raise PayloadError("signed payload is not valid JSON") from None


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise PayloadError("signed payload has a duplicate key")
    return result


def _refuse_float(text: str) -> object:
    raise PayloadError("signed payload values must not be floating-point numbers")


def _check_payload(payload: object) -> None:
    if not isinstance(payload, dict):
        raise PayloadError("payload must be a JSON object")
    _check_value(payload, depth=1, budget=[MAX_ENVELOPE_SIZE])
    for name in RESERVED_FIELDS:
        if name not in payload:
            raise PayloadError(f"payload lacks the {name!r} field")
    timestamp = payload[TIMESTAMP_FIELD]
    if type(timestamp) is not int:
        raise PayloadError("payload ts must be an integer number of Unix seconds")
    nonce = payload[NONCE_FIELD]
    if not isinstance(nonce, str):
        raise PayloadError("payload nonce must be base64url text")
    if len(b64url_decode(nonce, max_size=MAX_NONCE_SIZE)) < MIN_NONCE_SIZE:
        raise PayloadError(f"payload nonce must be at least {MIN_NONCE_SIZE} random bytes")


def _check_value(value: object, depth: int, budget: list[int]) -> None:
    """Check the type, size and depth limits of one JSON value, spending from a size budget.

    The budget approximates the encoded size, so a huge in-memory object is refused before it is
    walked in full or encoded. The payload object itself is level 1 of the nesting depth.
    """
    if isinstance(value, list | dict) and depth > MAX_NESTING_DEPTH:
        raise PayloadError(f"payload nests lists and objects over {MAX_NESTING_DEPTH} levels deep")
    budget[0] -= 1
    if value is None or isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
            raise PayloadError("payload integers must be within ±(2**53 - 1)")
    elif isinstance(value, str):
        if len(value) > MAX_STRING_LENGTH:
            raise PayloadError(f"payload strings must be at most {MAX_STRING_LENGTH} characters")
        _check_text(value)
        budget[0] -= len(value)
    elif isinstance(value, list):
        if len(value) > MAX_LIST_LENGTH:
            raise PayloadError(f"payload lists must have at most {MAX_LIST_LENGTH} items")
        for item in value:
            _check_value(item, depth + 1, budget)
    elif isinstance(value, dict):
        if len(value) > MAX_FIELD_COUNT:
            raise PayloadError(f"payload objects must have at most {MAX_FIELD_COUNT} fields")
        for name, item in value.items():
            if not isinstance(name, str) or not 0 < len(name) <= MAX_FIELD_NAME_LENGTH:
                raise PayloadError(
                    f"payload field names must be text of 1..{MAX_FIELD_NAME_LENGTH} characters"
                )
            _check_text(name)
            budget[0] -= len(name)
            _check_value(item, depth + 1, budget)
    else:
        raise PayloadError(
            f"payload values must be JSON text, integers, booleans, null, lists or objects, "
            f"not {type(value).__name__}"
        )
    if budget[0] < 0:
        raise PayloadError(f"signed payload is larger than {MAX_ENVELOPE_SIZE} bytes")


def _check_text(text: str) -> None:
    # Lone surrogates have no UTF-8 encoding, so they cannot be canonicalized or signed.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError("payload text must be valid Unicode") from None


def _canonical(value: Any) -> bytes:
    try:
        return canonical_json(value)
    except CanonicalJsonError:
        raise PayloadError("payload cannot be canonically encoded") from None
