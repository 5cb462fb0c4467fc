"""Request proofs (the RFC 9449 DPoP pattern): a request signed by the key its token is bound to.

A proof is ``base64url(canonical JSON claims) "." base64url(signature)``; the signature covers the
canonical claims with the ``Purpose.REQUEST_PROOF`` prefix. Claims:

- ``htm``: HTTP method, upper case;  ``htu``: path and query of the request URL;
- ``bh``: base64url SHA-256 of the exact request body;  ``ath``: base64url SHA-256 of the token;
- ``iat``: integer Unix time;  ``jti``: a fresh random id;  ``jwk``: base64url raw Ed25519 key.

Sans-I/O: the verifier returns the proof id and leaves the replay check to the caller, whose
nonce memory may be shared between service instances.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

from protocol.canonical_json import CanonicalJsonError, canonical_json
from protocol.domains import Purpose
from protocol.errors import PayloadError, ProtocolError, SignatureError
from protocol.identity import PublicIdentity, SigningIdentity, b64url, b64url_decode

PROOF_HEADER = "TucDesk-Proof"
MAX_PROOF_SIZE = 2048
MAX_TARGET_SIZE = 1024
PROOF_ID_BYTES = 16
DEFAULT_PROOF_SKEW_SECONDS = 60
_CLAIM_NAMES = frozenset({"htm", "htu", "bh", "ath", "iat", "jti", "jwk"})


@dataclass(frozen=True)
class VerifiedProof:
    """A proof whose signature, binding and time checked out; ``proof_id`` needs a replay check."""

    proof_id: str
    key: PublicIdentity
    issued_at: int


def sha256_b64url(data: bytes | str) -> str:
    """Base64url SHA-256 of ``data`` (strings are UTF-8 encoded), the form of ``bh`` and ``ath``."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return b64url(hashlib.sha256(raw).digest())


def create_proof(
    signer: SigningIdentity,
    *,
    method: str,
    target: str,
    body: bytes,
    access_token: str,
    now: int,
    proof_id: str | None = None,
) -> str:
    """A proof for one request: ``target`` is the path plus query string exactly as sent."""
    claims: dict[str, Any] = {
        "htm": method.upper(),
        "htu": target,
        "bh": sha256_b64url(body),
        "ath": sha256_b64url(access_token),
        "iat": int(now),
        "jti": proof_id if proof_id is not None else b64url(secrets.token_bytes(PROOF_ID_BYTES)),
        "jwk": b64url(signer.public.raw),
    }
    encoded = canonical_json(claims)
    signature = signer.sign(Purpose.REQUEST_PROOF, encoded)
    return b64url(encoded) + "." + b64url(signature)


def verify_proof(
    proof: str,
    *,
    method: str,
    target: str,
    body: bytes,
    access_token: str,
    expected_key_id: str,
    now: float,
    skew_seconds: float = DEFAULT_PROOF_SKEW_SECONDS,
) -> VerifiedProof:
    """Check a proof against the request and the token's ``cnf.jkt``; raise PayloadError if not."""
    if not isinstance(proof, str) or not proof or len(proof) > MAX_PROOF_SIZE:
        raise PayloadError("request proof is missing or too large")
    parts = proof.split(".")
    if len(parts) != 2:
        raise PayloadError("request proof is not claims.signature")
    encoded = _strict_b64url_decode(parts[0], MAX_PROOF_SIZE)
    signature = _strict_b64url_decode(parts[1], 128)
    claims = _parse_claims(encoded)
    try:
        key = PublicIdentity(b64url_decode(claims["jwk"], max_size=64))
    except ProtocolError:
        raise PayloadError("request proof key is malformed") from None
    # The key is checked against the token binding before the signature, so a proof made by any
    # key other than the token's is refused whatever it signs.
    if key.key_id != expected_key_id:
        raise PayloadError("request proof is signed by a key the token is not bound to")
    try:
        key.verify(Purpose.REQUEST_PROOF, encoded, signature)
    except SignatureError:
        raise PayloadError("request proof signature does not verify") from None
    try:
        canonical = canonical_json(claims)
    except CanonicalJsonError:  # e.g. an integer past 2**53 or a lone surrogate, signed anyway
        raise PayloadError("request proof claims have no canonical form") from None
    if canonical != encoded:
        raise PayloadError("request proof claims are not in canonical form")
    if claims["htm"] != method.upper():
        raise PayloadError("request proof is for another method")
    if claims["htu"] != target:
        raise PayloadError("request proof is for another URL")
    if claims["bh"] != sha256_b64url(body):
        raise PayloadError("request proof is for another body")
    if claims["ath"] != sha256_b64url(access_token):
        raise PayloadError("request proof is for another access token")
    issued_at = claims["iat"]
    if abs(now - issued_at) > skew_seconds:
        raise PayloadError("request proof time is outside the allowed clock skew")
    return VerifiedProof(proof_id=claims["jti"], key=key, issued_at=issued_at)


def _strict_b64url_decode(text: str, max_size: int) -> bytes:
    """Decode base64url, refusing any text that is not the one canonical encoding of its bytes."""
    decoded = b64url_decode(text, max_size=max_size)
    if b64url(decoded) != text:
        raise PayloadError("request proof is not canonical base64url")
    return decoded


def _parse_claims(encoded: bytes) -> dict[str, Any]:
    try:
        claims = json.loads(encoded)
    except (ValueError, UnicodeDecodeError):
        raise PayloadError("request proof claims are not JSON") from None
    if not isinstance(claims, dict) or set(claims) != _CLAIM_NAMES:
        raise PayloadError("request proof claims are not the expected set")
    for name in ("htm", "htu", "bh", "ath", "jti", "jwk"):
        value = claims[name]
        if not isinstance(value, str) or not value or len(value) > MAX_TARGET_SIZE:
            raise PayloadError(f"request proof claim {name} is malformed")
    if len(claims["jti"]) > 128:
        raise PayloadError("request proof id is too long")
    iat = claims["iat"]
    if not isinstance(iat, int) or isinstance(iat, bool):
        raise PayloadError("request proof claim iat must be an integer")
    return claims
