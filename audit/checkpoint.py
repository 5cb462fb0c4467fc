"""C2SP tlog-checkpoints (https://c2sp.org/tlog-checkpoint) for per-team audit logs.

Body: the origin line, the tree size in decimal, the root hash in standard base64, each ending
in a newline. The origin is ``<deployment>/audit/<team id>`` so a checkpoint names both the
deployment and the team; it doubles as the signed note's key name. Checkpoints are signed as
C2SP signed notes by the rendezvous audit key (see audit/note.py).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass

from audit.errors import NoteError
from audit.merkle import HASH_SIZE
from audit.note import is_valid_key_name, open_note, sign_note
from protocol.identity import PublicIdentity, SigningIdentity

ORIGIN_TEAM_SEPARATOR = "/audit/"
MAX_ORIGIN_LENGTH = 512
MAX_TREE_SIZE = 2**63 - 1
MAX_EXTENSION_LINES = 16


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint states: this origin's log had ``size`` records with this Merkle root."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    @property
    def team_id(self) -> str:
        """The team named by the origin line."""
        return self.origin.rpartition(ORIGIN_TEAM_SEPARATOR)[2]

    def body(self) -> str:
        """The checkpoint text the note signature covers."""
        root = base64.b64encode(self.root_hash).decode("ascii")
        lines = [self.origin, str(self.size), root, *self.extensions]
        return "".join(line + "\n" for line in lines)


def origin_for(deployment: str, team_id: str) -> str:
    """The origin line naming ``team_id``'s log in ``deployment``."""
    origin = f"{deployment}{ORIGIN_TEAM_SEPARATOR}{team_id}"
    if not deployment or not team_id or ORIGIN_TEAM_SEPARATOR in team_id:
        raise NoteError("a checkpoint origin needs a deployment name and a team id")
    if len(origin) > MAX_ORIGIN_LENGTH or not is_valid_key_name(origin):
        raise NoteError("deployment name and team id must not contain whitespace or '+'")
    return origin


def parse_checkpoint_body(text: str) -> Checkpoint:
    """Parse checkpoint text, refusing non-canonical numbers and hashes."""
    if not text.endswith("\n"):
        raise NoteError("checkpoint text must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3 or len(lines) > 3 + MAX_EXTENSION_LINES:
        raise NoteError("a checkpoint has an origin, a size and a root hash line")
    origin, size_text, root_text, *extensions = lines
    if ORIGIN_TEAM_SEPARATOR not in origin or not is_valid_key_name(origin):
        raise NoteError("checkpoint origin does not name a TucDesk audit log")
    if not size_text.isascii() or not size_text.isdigit() or (
        size_text != "0" and size_text.startswith("0")
    ):
        raise NoteError("checkpoint size is not a canonical decimal number")
    size = int(size_text)
    if size > MAX_TREE_SIZE:
        raise NoteError("checkpoint size is out of range")
    try:
        root = base64.b64decode(root_text, validate=True)
    except (binascii.Error, ValueError):
        raise NoteError("checkpoint root hash is not base64") from None
    if len(root) != HASH_SIZE or base64.b64encode(root).decode("ascii") != root_text:
        raise NoteError("checkpoint root hash is not a canonical SHA-256 hash")
    if any(not line for line in extensions):
        raise NoteError("checkpoint extension lines must not be empty")
    return Checkpoint(origin, size, root, tuple(extensions))


def sign_checkpoint(checkpoint: Checkpoint, identity: SigningIdentity) -> bytes:
    """The checkpoint as a signed note, key name = origin."""
    return sign_note(checkpoint.body(), checkpoint.origin, identity)


def open_checkpoint(
    note: bytes, trusted: Sequence[PublicIdentity]
) -> tuple[Checkpoint, PublicIdentity]:
    """Verify a signed checkpoint against trusted keys; return it and the key that signed it."""
    text, signer = open_note(note, trusted)
    return parse_checkpoint_body(text), signer
