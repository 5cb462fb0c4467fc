"""Session key schedule: X25519 agreement, HKDF-SHA256, per-direction AES-256-GCM keys, rekey.

    session keys = HKDF-SHA256(ikm = X25519 shared secret, salt = final transcript hash,
                               info = "tucdesk-session-v1", L = 96)
                 = operator->agent key (32) || agent->operator key (32) || confirmation key (32)

Each direction's key then steps along its own chain on rekey:
``next = HKDF-SHA256(ikm = key, salt = session id, info = "tucdesk-rekey-v1", L = 32)``, so an
old key can be forgotten and is not recoverable from the new one.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from enum import Enum

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.errors import HandshakeError

X25519_KEY_SIZE = 32
TRAFFIC_KEY_SIZE = 32
CONFIRMATION_KEY_SIZE = 32
SESSION_INFO = b"tucdesk-session-v1"
REKEY_INFO = b"tucdesk-rekey-v1"
MAX_SESSION_ID_SIZE = 256
_ALL_ZERO = bytes(X25519_KEY_SIZE)
_LOW_ORDER = "peer ephemeral key is a low-order point (all-zero X25519 result)"


class Role(Enum):
    """Which end of a session this is; each role seals with one key and opens with the other."""

    OPERATOR = "operator"
    AGENT = "agent"

    @property
    def peer(self) -> Role:
        """The role at the other end."""
        return Role.AGENT if self is Role.OPERATOR else Role.OPERATOR


def x25519_shared_secret(private_key: bytes, peer_public_key: bytes) -> bytes:
    """RFC 7748 X25519(scalar, u): refuses wrong sizes and an all-zero result (low-order point)."""
    if len(private_key) != X25519_KEY_SIZE or len(peer_public_key) != X25519_KEY_SIZE:
        raise HandshakeError(f"X25519 keys are {X25519_KEY_SIZE} bytes")
    private = X25519PrivateKey.from_private_bytes(private_key)
    return _exchange(private, peer_public_key)


def x25519_public_key(private_key: bytes) -> bytes:
    """The X25519 public key (u-coordinate) for a 32-byte private scalar."""
    if len(private_key) != X25519_KEY_SIZE:
        raise HandshakeError(f"X25519 keys are {X25519_KEY_SIZE} bytes")
    return _raw_public(X25519PrivateKey.from_private_bytes(private_key))


class EphemeralKey:
    """A one-handshake X25519 key pair; the private half never leaves this object."""

    __slots__ = ("_private", "public")

    def __init__(self, private: X25519PrivateKey | None = None) -> None:
        self._private = private if private is not None else X25519PrivateKey.generate()
        self.public = _raw_public(self._private)

    def __repr__(self) -> str:
        return "EphemeralKey(<secret>)"

    def shared_secret(self, peer_public_key: bytes) -> bytes:
        """X25519 with the peer's ephemeral public key; an all-zero result raises HandshakeError."""
        if len(peer_public_key) != X25519_KEY_SIZE:
            raise HandshakeError(f"X25519 keys are {X25519_KEY_SIZE} bytes")
        return _exchange(self._private, peer_public_key)


def hkdf_sha256(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF with SHA-256 (extract then expand); ``salt=None`` means HashLen zero bytes."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


@dataclass(frozen=True, repr=False)
class SessionKeys:
    """The keys one completed handshake yields. In memory only; repr never shows them."""

    session_id: bytes
    operator_to_agent: bytes
    agent_to_operator: bytes
    confirmation: bytes

    def __repr__(self) -> str:
        return f"SessionKeys(session_id={self.session_id!r}, keys=<secret>)"

    def sending_key(self, role: Role) -> bytes:
        """The key ``role`` seals with."""
        return self.operator_to_agent if role is Role.OPERATOR else self.agent_to_operator

    def receiving_key(self, role: Role) -> bytes:
        """The key ``role`` opens with."""
        return self.sending_key(role.peer)

    def confirmation_tag(self, label: bytes) -> bytes:
        """HMAC-SHA256 over ``label`` with the confirmation key: proof both ends hold these keys."""
        return hmac.new(self.confirmation, label, hashlib.sha256).digest()


def derive_session_keys(
    shared_secret: bytes, transcript_hash: bytes, session_id: bytes
) -> SessionKeys:
    """HKDF-SHA256(ikm = shared secret, salt = transcript hash, info = "tucdesk-session-v1")."""
    material = hkdf_sha256(
        shared_secret, transcript_hash, SESSION_INFO, 2 * TRAFFIC_KEY_SIZE + CONFIRMATION_KEY_SIZE
    )
    return SessionKeys(
        session_id=session_id,
        operator_to_agent=material[:TRAFFIC_KEY_SIZE],
        agent_to_operator=material[TRAFFIC_KEY_SIZE : 2 * TRAFFIC_KEY_SIZE],
        confirmation=material[2 * TRAFFIC_KEY_SIZE :],
    )


def next_traffic_key(key: bytes, session_id: bytes) -> bytes:
    """One step along a direction's rekey chain."""
    return hkdf_sha256(key, session_id, REKEY_INFO, TRAFFIC_KEY_SIZE)


def session_id_bytes(session_id: bytes | str) -> bytes:
    """The canonical bytes of a session id (UTF-8 for text), refusing empty or oversized ids."""
    raw = session_id.encode("utf-8") if isinstance(session_id, str) else bytes(session_id)
    if not raw or len(raw) > MAX_SESSION_ID_SIZE:
        raise HandshakeError(f"a session id is 1 to {MAX_SESSION_ID_SIZE} bytes")
    return raw


def _exchange(private: X25519PrivateKey, peer_public_key: bytes) -> bytes:
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public_key))
    except ValueError:
        # OpenSSL refuses the all-zero output itself; the explicit check below covers any backend.
        raise HandshakeError(_LOW_ORDER) from None
    if hmac.compare_digest(shared, _ALL_ZERO):
        raise HandshakeError(_LOW_ORDER)
    return shared


def _raw_public(private: X25519PrivateKey) -> bytes:
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
