"""One-time codes and bearer secrets: registration keys, API keys, invites and login challenges.

Secrets are 32 random bytes in lower-case unpadded base32 after a prefix naming their kind; the
store only ever sees their SHA-256 hash.
"""

from __future__ import annotations

import base64
import hashlib
import secrets

SECRET_RANDOM_BYTES = 32
REGISTRATION_KEY_PREFIX = "rk_live_"
API_KEY_PREFIX = "sk_live_"
INVITE_PREFIX = "inv_"
MAX_SECRET_LENGTH = 128


def _random_text() -> str:
    raw = secrets.token_bytes(SECRET_RANDOM_BYTES)
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def new_registration_key() -> str:
    """A fresh ``rk_live_…`` agent registration key."""
    return REGISTRATION_KEY_PREFIX + _random_text()


def new_api_key() -> str:
    """A fresh ``sk_live_…`` API key."""
    return API_KEY_PREFIX + _random_text()


def new_invite_code() -> str:
    """A fresh ``inv_…`` operator invite code."""
    return INVITE_PREFIX + _random_text()


def new_challenge() -> str:
    """A fresh login challenge nonce (not secret, but unpredictable)."""
    return _random_text()


def hash_secret(secret: str) -> bytes:
    """The SHA-256 digest the store keeps instead of the secret."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


def has_shape(secret: object, prefix: str) -> bool:
    """Whether ``secret`` is a string of the right prefix and a plausible length."""
    return (
        isinstance(secret, str)
        and secret.startswith(prefix)
        and len(prefix) < len(secret) <= MAX_SECRET_LENGTH
        and secret.isascii()
    )
