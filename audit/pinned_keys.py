"""Reading the audit keys an auditor pins with ``--key``: PEM Ed25519 public keys only.

A private key file is refused rather than reduced to its public half: an auditor has no reason
to hold the signer's private key, and one who was handed it should know that the person holding
it could have signed anything the bundle says.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from protocol.errors import ProtocolError
from protocol.identity import MAX_KEY_FILE_SIZE, PublicIdentity

PRIVATE_KEY_MARKER = b"PRIVATE KEY-----"


class PinnedKeyError(Exception):
    """A --key file cannot be used as a pinned public key; the message says why."""


def load_pinned_key(path: Path) -> PublicIdentity:
    """The PEM Ed25519 public key in ``path``; PinnedKeyError (naming the file) otherwise."""
    data = _read_key_file(path)
    if PRIVATE_KEY_MARKER in data:
        raise PinnedKeyError(
            f"key {path}: this is a PRIVATE key; refusing it. Pin the public key instead "
            "(tucdesk-rendezvous keys show --pem audit-signer): an auditor never needs the "
            "signer's private key, and whoever holds it could have signed anything"
        )
    try:
        return PublicIdentity.from_pem(data)
    except ProtocolError as error:
        raise PinnedKeyError(f"key {path}: {error} (expected a PEM Ed25519 public key)") from None


def _read_key_file(path: Path) -> bytes:
    # One open; checks on the descriptor. O_NONBLOCK: a FIFO at the path must not hang us.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise PinnedKeyError(f"key {path}: no such key file") from None
    except OSError as error:
        raise PinnedKeyError(f"key {path}: cannot open key file ({error.strerror})") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PinnedKeyError(f"key {path}: not a regular file")
        try:
            data = handle.read(MAX_KEY_FILE_SIZE + 1)
        except OSError as error:
            raise PinnedKeyError(f"key {path}: cannot read key file ({error.strerror})") from None
    if len(data) > MAX_KEY_FILE_SIZE:
        raise PinnedKeyError(f"key {path}: larger than any key file")
    return data
