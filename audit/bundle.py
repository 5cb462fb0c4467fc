"""The export bundle: one JSON Lines file an auditor verifies offline.

Line 1, the header: ``{"format": "tucdesk-audit-bundle-v1", "origin": ..., "team_id": ...}``.
Then one line per record, in sequence order from 0, each exactly the record's RFC 8785 encoding.
Last line, the trailer::

    {"checkpoint": <signed note text covering every record>,
     "consistency_proof": [<hex hash>, ...],
     "keys": [{"key_id": ..., "public_key": <base64url>, "role": "audit" | "agent"}, ...],
     "previous_checkpoint": <an earlier signed note text> | null}

Every line is canonical JSON ending in ``\\n``. Keys in the trailer are hints for humans and
error messages only: the verifier trusts the keys it is given, never the bundle's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from audit.errors import BundleError, NoteError, RecordError
from audit.merkle import HASH_SIZE
from audit.record import MAX_ID_LENGTH, strict_json
from protocol.canonical_json import CanonicalJsonError, canonical_json
from protocol.errors import ProtocolError
from protocol.identity import PUBLIC_KEY_SIZE, PublicIdentity, b64url, b64url_decode

BUNDLE_FORMAT = "tucdesk-audit-bundle-v1"
MAX_BUNDLE_LINE_BYTES = 256 * 1024
FIRST_RECORD_LINE = 2  # line 1 is the header; record k is on line k + 2
UTF8_BOM = b"\xef\xbb\xbf"
MAX_KEY_HINTS = 1024
MAX_PROOF_HASHES = 128
KEY_ROLES = ("audit", "agent")
_HEADER_FIELDS = frozenset({"format", "origin", "team_id"})
_TRAILER_FIELDS = frozenset({"checkpoint", "consistency_proof", "keys", "previous_checkpoint"})
_KEY_FIELDS = frozenset({"key_id", "public_key", "role"})


@dataclass(frozen=True)
class BundleHeader:
    """The first line: which log this is."""

    origin: str
    team_id: str

    def line(self) -> bytes:
        """The header as a bundle line."""
        value = {"format": BUNDLE_FORMAT, "origin": self.origin, "team_id": self.team_id}
        return canonical_json(value) + b"\n"


@dataclass(frozen=True)
class KeyHint:
    """A public key the exporter says signed something in the bundle (not trusted by itself)."""

    key_id: str
    public_key: PublicIdentity
    role: str


@dataclass(frozen=True)
class BundleTrailer:
    """The last line: the signed checkpoint, key hints, and optionally an earlier checkpoint."""

    checkpoint: bytes
    keys: tuple[KeyHint, ...] = ()
    previous_checkpoint: bytes | None = None
    consistency_proof: tuple[bytes, ...] = ()

    def line(self) -> bytes:
        """The trailer as a bundle line."""
        value = {
            "checkpoint": self.checkpoint.decode("utf-8"),
            "consistency_proof": [node.hex() for node in self.consistency_proof],
            "keys": [
                {
                    "key_id": hint.key_id,
                    "public_key": b64url(hint.public_key.raw),
                    "role": hint.role,
                }
                for hint in self.keys
            ],
            "previous_checkpoint": (
                None if self.previous_checkpoint is None else self.previous_checkpoint.decode()
            ),
        }
        return canonical_json(value) + b"\n"


def parse_header(line: bytes) -> BundleHeader:
    """Parse the header line; BundleError if this is not a TucDesk audit bundle."""
    try:
        value = strict_json(_strip_newline(line))
    except RecordError:
        raise BundleError("the first line is not JSON: not a TucDesk audit bundle") from None
    if not isinstance(value, dict) or value.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"the first line does not declare format {BUNDLE_FORMAT}")
    if value.keys() != _HEADER_FIELDS:
        raise BundleError("the bundle header has missing or unknown fields")
    origin, team_id = value["origin"], value["team_id"]
    if not isinstance(origin, str) or not isinstance(team_id, str) or not team_id:
        raise BundleError("the bundle header's origin and team_id must be strings")
    if len(team_id) > MAX_ID_LENGTH or _encode(value, BundleError) != _strip_newline(line):
        raise BundleError("the bundle header is not canonical")
    return BundleHeader(origin, team_id)


def is_trailer(value: object) -> bool:
    """Whether a parsed bundle line is the trailer (records never have a ``checkpoint`` field)."""
    return isinstance(value, dict) and "checkpoint" in value


def parse_trailer(value: dict[str, Any], line: bytes) -> BundleTrailer:
    """Parse the trailer from its JSON value and line bytes (no newline); NoteError if malformed."""
    if value.keys() != _TRAILER_FIELDS:
        raise NoteError("the bundle trailer has missing or unknown fields")
    checkpoint, previous = value["checkpoint"], value["previous_checkpoint"]
    if not isinstance(checkpoint, str) or not (previous is None or isinstance(previous, str)):
        raise NoteError("the bundle trailer's checkpoints must be strings")
    proof = value["consistency_proof"]
    if not isinstance(proof, list) or len(proof) > MAX_PROOF_HASHES:
        raise NoteError("the consistency proof must be a short list of hashes")
    nodes = tuple(_hex_hash(node) for node in proof)
    keys = value["keys"]
    if not isinstance(keys, list) or len(keys) > MAX_KEY_HINTS:
        raise NoteError("the bundle's key list is malformed")
    if _encode(value, NoteError) != line:
        raise NoteError("the bundle trailer is not in RFC 8785 canonical form")
    trailer = BundleTrailer(
        checkpoint=checkpoint.encode("utf-8"),
        keys=tuple(_key_hint(entry) for entry in keys),
        previous_checkpoint=None if previous is None else previous.encode("utf-8"),
        consistency_proof=nodes,
    )
    if trailer.line()[:-1] != line:
        raise NoteError("the bundle trailer is not in RFC 8785 canonical form")
    return trailer


def _encode(value: Any, error: type[Exception]) -> bytes:
    """RFC 8785 bytes of a parsed line, or ``error`` (e.g. for lone surrogates in strings)."""
    try:
        return canonical_json(value)
    except CanonicalJsonError:
        raise error("a bundle line holds text with no UTF-8 encoding") from None


def _strip_newline(line: bytes) -> bytes:
    if not line.endswith(b"\n"):
        raise BundleError("a bundle line does not end with a newline")
    return line[:-1]


def _hex_hash(value: object) -> bytes:
    if not isinstance(value, str) or len(value) != 2 * HASH_SIZE:
        raise NoteError("proof hashes are 64 hex digits")
    try:
        node = bytes.fromhex(value)
    except ValueError:
        raise NoteError("proof hashes are 64 hex digits") from None
    if node.hex() != value:
        raise NoteError("proof hashes are lowercase hex")
    return node


def _key_hint(value: object) -> KeyHint:
    if not isinstance(value, dict) or value.keys() != _KEY_FIELDS:
        raise NoteError("a bundle key entry has missing or unknown fields")
    key_id, encoded, role = value["key_id"], value["public_key"], value["role"]
    if not isinstance(key_id, str) or not isinstance(encoded, str) or role not in KEY_ROLES:
        raise NoteError("a bundle key entry is malformed")
    try:
        key = PublicIdentity(b64url_decode(encoded, max_size=PUBLIC_KEY_SIZE))
    except ProtocolError:
        raise NoteError("a bundle key entry is not an Ed25519 public key") from None
    if key.key_id != key_id:
        raise NoteError("a bundle key entry's key_id does not match its public key")
    return KeyHint(key_id, key, str(role))
