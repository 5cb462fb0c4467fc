"""C2SP signed notes (https://c2sp.org/signed-note) with Ed25519 keys.

A note is UTF-8 text ending in a newline, a blank line, then signature lines
``— <key name> <base64(key hash || signature)>``. The key hash is the first four bytes of
SHA-256(key name || 0x0A || 0x01 || public key), 0x01 being the Ed25519 signature type.

Why the signature here carries no TucDesk purpose prefix: the spec defines an Ed25519 note
signature as the plain signature of the note text, and other tools (witnesses, Go's
``golang.org/x/mod/sumdb/note``) must be able to check our checkpoints, so we sign the text bytes
directly with the raw key. That cannot be confused with any TucDesk signature: every other one
covers ``purpose prefix || 0x00 || message`` and note text never contains a NUL byte.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature

from audit.errors import NoteError, UntrustedNote
from protocol.identity import SIGNATURE_SIZE, PublicIdentity, SigningIdentity

MAX_NOTE_BYTES = 16 * 1024
MAX_NOTE_SIGNATURES = 100
ED25519_SIGNATURE_TYPE = b"\x01"
KEY_HASH_SIZE = 4
SIGNATURE_LINE_PREFIX = "\u2014 "


@dataclass(frozen=True)
class NoteSignature:
    """One signature line of a note, not yet verified."""

    key_name: str
    key_hash: bytes
    signature: bytes


@dataclass(frozen=True)
class SignedNote:
    """A parsed note: the signed text and its signature lines."""

    text: str
    signatures: tuple[NoteSignature, ...]


def is_valid_key_name(name: str) -> bool:
    """A key name is non-empty and contains neither whitespace nor ``+``."""
    return bool(name) and "+" not in name and not any(ch.isspace() for ch in name) and all(
        ch.isprintable() for ch in name
    )


def note_key_hash(key_name: str, public: PublicIdentity) -> bytes:
    """The 4-byte key hash that names ``public`` under ``key_name`` in signature lines."""
    material = key_name.encode("utf-8") + b"\n" + ED25519_SIGNATURE_TYPE + public.raw
    return hashlib.sha256(material).digest()[:KEY_HASH_SIZE]


def verifier_key(key_name: str, public: PublicIdentity) -> str:
    """The spec's text form of a verifier key: ``name+hex(key hash)+base64(0x01 || key)``."""
    encoded = base64.b64encode(ED25519_SIGNATURE_TYPE + public.raw).decode("ascii")
    return f"{key_name}+{note_key_hash(key_name, public).hex()}+{encoded}"


def sign_note(text: str, key_name: str, identity: SigningIdentity) -> bytes:
    """The signed note for ``text``, with one Ed25519 signature by ``identity`` as ``key_name``."""
    _check_text(text)
    if not is_valid_key_name(key_name):
        raise NoteError(f"{key_name!r} is not a valid note key name")
    body = text.encode("utf-8")
    signature = identity.to_cryptography().sign(body)
    blob = note_key_hash(key_name, identity.public) + signature
    line = f"{SIGNATURE_LINE_PREFIX}{key_name} {base64.b64encode(blob).decode('ascii')}\n"
    note = body + b"\n" + line.encode("utf-8")
    if len(note) > MAX_NOTE_BYTES:
        raise NoteError(f"a signed note is at most {MAX_NOTE_BYTES} bytes")
    return note


def parse_note(data: bytes) -> SignedNote:
    """Split a signed note into text and signature lines, refusing anything malformed."""
    if len(data) > MAX_NOTE_BYTES:
        raise NoteError(f"a signed note is at most {MAX_NOTE_BYTES} bytes")
    try:
        decoded = data.decode("utf-8")
    except UnicodeDecodeError:
        raise NoteError("a signed note is not valid UTF-8") from None
    split = decoded.rfind("\n\n")
    if split < 0:
        raise NoteError("a signed note has no blank line before its signatures")
    text, block = decoded[: split + 1], decoded[split + 2 :]
    _check_text(text)
    if not block.endswith("\n"):
        raise NoteError("a signed note's last signature line does not end with a newline")
    lines = block[:-1].split("\n")
    if len(lines) > MAX_NOTE_SIGNATURES:
        raise NoteError(f"a signed note has more than {MAX_NOTE_SIGNATURES} signatures")
    return SignedNote(text, tuple(_parse_signature_line(line) for line in lines))


def open_note(data: bytes, trusted: Sequence[PublicIdentity]) -> tuple[str, PublicIdentity]:
    """The note's text and the trusted key that signed it, or NoteError.

    Lines by keys we do not know are ignored; a line by a trusted key that fails to verify
    rejects the whole note, as the spec requires.
    """
    note = parse_note(data)
    body = note.text.encode("utf-8")
    signer: PublicIdentity | None = None
    for line in note.signatures:
        for key in trusted:
            if note_key_hash(line.key_name, key) != line.key_hash:
                continue
            if len(line.signature) != SIGNATURE_SIZE:
                raise NoteError(f"note signature by {line.key_name} has the wrong length")
            try:
                key.to_cryptography().verify(line.signature, body)
            except InvalidSignature:
                raise NoteError(f"note signature by {line.key_name} does not verify") from None
            signer = signer or key
    if signer is None:
        raise UntrustedNote("the note carries no signature by a pinned key")
    return note.text, signer


def _check_text(text: str) -> None:
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")
    if "\n\n" in text or text.startswith("\n"):
        raise NoteError("note text must not contain blank lines")
    if any(ch != "\n" and (ord(ch) < 0x20 or ord(ch) == 0x7F) for ch in text):
        raise NoteError("note text must not contain control characters")


def _parse_signature_line(line: str) -> NoteSignature:
    if not line.startswith(SIGNATURE_LINE_PREFIX):
        raise NoteError("a note signature line must start with an em dash and a space")
    name, separator, encoded = line[len(SIGNATURE_LINE_PREFIX) :].partition(" ")
    if not separator or not is_valid_key_name(name):
        raise NoteError("a note signature line has a malformed key name")
    try:
        blob = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise NoteError("a note signature is not base64") from None
    if len(blob) <= KEY_HASH_SIZE or base64.b64encode(blob).decode("ascii") != encoded:
        raise NoteError("a note signature is malformed")
    return NoteSignature(name, blob[:KEY_HASH_SIZE], blob[KEY_HASH_SIZE:])
