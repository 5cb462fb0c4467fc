"""Reading the audit keys an auditor pins with ``--key``: PEM Ed25519 public keys only.

A private key file is refused rather than reduced to its public half: an auditor has no reason
to hold the signer's private key, and one who was handed it should know that the person holding
it could have signed anything the bundle says.
"""

from __future__ import annotations

from pathlib import Path

from protocol.errors import ProtocolError
from protocol.identity import PrivateKeyFileError, PublicIdentity, load_verifying_key_file


class PinnedKeyError(Exception):
    """A --key file cannot be used as a pinned public key; the message says why."""


def load_pinned_key(path: Path) -> PublicIdentity:
    """The PEM Ed25519 public key in ``path``; PinnedKeyError (naming the file) otherwise."""
    try:
        return load_verifying_key_file(path)
    except PrivateKeyFileError:
        raise PinnedKeyError(
            f"key {path}: this is a PRIVATE key; refusing it. Pin the public key instead "
            "(tucdesk-rendezvous keys show --pem audit-signer): an auditor never needs the "
            "signer's private key, and whoever holds it could have signed anything"
        ) from None
    except ProtocolError as error:
        raise PinnedKeyError(f"key {error}") from None
