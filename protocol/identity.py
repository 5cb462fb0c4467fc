"""Ed25519 identities: generation, 0600 key files, OpenSSH fingerprints, purposeful signatures."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from protocol.domains import Purpose, framed_message
from protocol.errors import KeyFileError, PayloadError, SignatureError

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
MAX_KEY_FILE_SIZE = 16 * 1024
PRIVATE_KEY_FILE_MODE = 0o600
PRIVATE_DIRECTORY_MODE = 0o700
_PEM_PRIVATE_HEADER = b"-----BEGIN PRIVATE KEY-----"
_PEM_PUBLIC_HEADER = b"-----BEGIN PUBLIC KEY-----"
# Any private key, PKCS#8 or not (a verifier refuses them all).
_PEM_PRIVATE_MARKER = b"PRIVATE KEY-----"
_B64URL_TEXT = re.compile(r"[A-Za-z0-9_-]*")


@dataclass(frozen=True)
class PublicIdentity:
    """An Ed25519 public key: verifies signatures, names itself by fingerprint and key id."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes):
            raise KeyFileError("an Ed25519 public key must be given as bytes")
        if len(self.raw) != PUBLIC_KEY_SIZE:
            raise KeyFileError(
                f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes, got {len(self.raw)}"
            )

    @property
    def fingerprint(self) -> str:
        """OpenSSH fingerprint: ``SHA256:`` + unpadded base64 of SHA-256 of the SSH key blob."""
        digest = hashlib.sha256(_ssh_wire_encoding(self.raw)).digest()
        return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")

    @property
    def key_id(self) -> str:
        """A short stable identifier for this key (the RFC 7638 JWK thumbprint)."""
        return jwk_thumbprint(self.raw)

    def verify(self, purpose: Purpose, message: bytes, signature: bytes) -> None:
        """Raise SignatureError unless this key signed ``message`` for ``purpose``."""
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
            raise SignatureError(f"{purpose.value}: signature must be {SIGNATURE_SIZE} bytes")
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(
                signature, framed_message(purpose, message)
            )
        except (InvalidSignature, ValueError):
            raise SignatureError(f"{purpose.value}: signature does not verify") from None

    def to_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM, the format of public key files."""
        return Ed25519PublicKey.from_public_bytes(self.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def to_cryptography(self) -> Ed25519PublicKey:
        """The key as a ``cryptography`` object, for libraries such as pyjwt."""
        return Ed25519PublicKey.from_public_bytes(self.raw)

    @classmethod
    def from_pem(cls, data: bytes) -> PublicIdentity:
        """Parse a SubjectPublicKeyInfo PEM Ed25519 public key."""
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyFileError("not a PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError("public key is not Ed25519")
        return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


class SigningIdentity:
    """An Ed25519 private key. Signs only with a purpose prefix; never exposes raw bytes in repr."""

    __slots__ = ("_private", "public")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public = PublicIdentity(
            private.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )

    def __repr__(self) -> str:
        return f"SigningIdentity({self.public.fingerprint})"

    @classmethod
    def generate(cls) -> SigningIdentity:
        """A fresh random identity."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningIdentity:
        """The identity for a 32-byte RFC 8032 private seed (known-answer tests, state files)."""
        if len(seed) != 32:
            raise KeyFileError("an Ed25519 seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def seed(self) -> bytes:
        """The 32-byte private seed, for encrypted state files only."""
        return self._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    def sign(self, purpose: Purpose, message: bytes) -> bytes:
        """Sign ``message`` for ``purpose`` (the prefix is always included)."""
        return self._private.sign(framed_message(purpose, message))

    def to_cryptography(self) -> Ed25519PrivateKey:
        """The key as a ``cryptography`` object, for libraries such as pyjwt."""
        return self._private

    def save(self, path: Path) -> None:
        """Write the private key as PKCS#8 PEM, created 0600 and never world- or group-readable."""
        data = self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private_file(path, data)

    @classmethod
    def load(cls, path: Path) -> SigningIdentity:
        """Load a PKCS#8 PEM Ed25519 key, refusing one that group or others can read."""
        data = read_private_file(path)
        if _PEM_PRIVATE_HEADER not in data:
            raise KeyFileError(f"{path}: not a PEM private key")
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise KeyFileError(f"{path}: unreadable private key") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path}: private key is not Ed25519")
        return cls(key)


def write_private_file(path: Path, data: bytes) -> None:
    """Create or replace ``path`` atomically with mode 0600 from the first byte on.

    A missing parent directory is created 0700.
    """
    path = Path(path)
    try:
        path.parent.mkdir(mode=PRIVATE_DIRECTORY_MODE, parents=True, exist_ok=True)
        # A random suffix, so a temporary file left by a crashed writer never blocks this one.
        temporary = path.with_name(f".{path.name}.tmp-{secrets.token_hex(8)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_KEY_FILE_MODE)
    except OSError as error:
        raise KeyFileError(f"{path}: cannot create key file ({error.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, PRIVATE_KEY_FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    sync_directory(path.parent)


def sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (fsync the directory); best effort where
    directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_private_file(path: Path) -> bytes:
    """Read a secret file, refusing one readable by group or others, or larger than any key file."""
    path = Path(path)
    with _open_regular_file(path) as handle:
        info = os.fstat(handle.fileno())
        if info.st_mode & 0o077:
            raise KeyFileError(
                f"{path}: permissions {stat.S_IMODE(info.st_mode):04o} are too open; "
                f"run 'chmod 600 {path}'"
            )
        return _read_bounded(handle, path)


def load_public_key_file(path: Path) -> PublicIdentity:
    """Load a PEM public key file (or the public half of a PEM private key file)."""
    path = Path(path)
    with _open_regular_file(path) as handle:
        data = _read_bounded(handle, path)
    if _PEM_PUBLIC_HEADER in data:
        return PublicIdentity.from_pem(data)
    if _PEM_PRIVATE_HEADER in data:
        return SigningIdentity.load(path).public
    raise KeyFileError(f"{path}: not a PEM Ed25519 key")


class PrivateKeyFileError(KeyFileError):
    """A public key was asked for and the file holds a private key."""


def load_verifying_key_file(path: str | Path) -> PublicIdentity:
    """Load a PEM public key file for a verifier (an auditor, a relay), refusing a private key
    file with PrivateKeyFileError rather than using its public half: a verifier must never be
    handed the signer's secret."""
    path = Path(path)
    with _open_regular_file(path) as handle:
        data = _read_bounded(handle, path)
    if _PEM_PRIVATE_MARKER in data:
        raise PrivateKeyFileError(f"{path}: holds a private key")
    if _PEM_PUBLIC_HEADER not in data:
        raise KeyFileError(f"{path}: not a PEM Ed25519 public key")
    try:
        return PublicIdentity.from_pem(data)
    except KeyFileError as error:
        raise KeyFileError(f"{path}: {error}") from None


def _open_regular_file(path: Path) -> BinaryIO:
    # Checks run on the opened descriptor, so the file cannot be swapped between check and read;
    # O_NONBLOCK keeps a FIFO planted at the path from blocking the open.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: no such key file") from None
    except OSError as error:
        raise KeyFileError(f"{path}: cannot open key file ({error.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_bounded(handle: BinaryIO, path: Path) -> bytes:
    # Read one byte past the limit so a file that grew after fstat is still caught.
    try:
        data = handle.read(MAX_KEY_FILE_SIZE + 1)
    except OSError as error:
        raise KeyFileError(f"{path}: cannot read key file ({error.strerror})") from None
    if len(data) > MAX_KEY_FILE_SIZE:
        raise KeyFileError(f"{path}: larger than any key file ({MAX_KEY_FILE_SIZE} bytes at most)")
    return data


def _ssh_wire_encoding(raw: bytes) -> bytes:
    algorithm = b"ssh-ed25519"
    return (
        len(algorithm).to_bytes(4, "big") + algorithm + len(raw).to_bytes(4, "big") + raw
    )


def jwk_thumbprint(raw: bytes) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url, unpadded) of an Ed25519 OKP public key."""
    x = base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")
    canonical = '{"crv":"Ed25519","kty":"OKP","x":"' + x + '"}'
    digest = hashlib.sha256(canonical.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode("ascii").rstrip("=")


def b64url(data: bytes) -> str:
    """Unpadded base64url, the encoding for binary values inside JSON payloads and tokens."""
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def b64url_decode(text: str, max_size: int = 4096) -> bytes:
    """Decode unpadded base64url, refusing oversized, padded, non-alphabet or non-canonical input.

    Strict so that each byte string has exactly one accepted text form (no malleability).
    """
    if not isinstance(text, str) or len(text) > _b64url_length(max_size):
        raise PayloadError("base64url value is missing or too large")
    if not _B64URL_TEXT.fullmatch(text) or len(text) % 4 == 1:
        raise PayloadError("value is not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url(data) != text:
        raise PayloadError("value is not canonical base64url")
    return data


def _b64url_length(size: int) -> int:
    """Length of the unpadded base64url text for ``size`` bytes."""
    return (4 * size + 2) // 3
