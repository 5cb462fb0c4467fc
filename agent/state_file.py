"""The agent's machine-bound state file: its secrets, sealed so a copy on another host is useless.

Layout: ``MAGIC | version | salt | nonce | key check | AES-256-GCM(JSON state)``. The key is
HKDF-SHA256 over the machine identifiers (salt per file, info ``tucdesk-agent-state-v1``); the
whole header is authenticated as associated data. The key check (a second HKDF output, never the
key itself) tells "wrong machine" apart from "damaged file" so the error can say which.
"""

from __future__ import annotations

import errno
import hmac
import json
import os
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.machine_identity import MachineIdentifiers
from protocol.identity import SigningIdentity, b64url, b64url_decode, write_private_file

STATE_FILE_MAGIC = b"TUCSTATE"
STATE_FILE_VERSION = 1
SALT_SIZE = 16
NONCE_SIZE = 12
KEY_CHECK_SIZE = 16
KEY_SIZE = 32
HEADER_SIZE = len(STATE_FILE_MAGIC) + 1 + SALT_SIZE + NONCE_SIZE + KEY_CHECK_SIZE
GCM_TAG_SIZE = 16
MAX_STATE_FILE_SIZE = 256 * 1024
STATE_KEY_INFO = b"tucdesk-agent-state-v1"
KEY_CHECK_INFO = b"tucdesk-agent-state-v1 key check"
IDENTITY_SEED_SIZE = 32

_RE_ENROLL_ADVICE = "re-enroll this agent with 'tucdesk-agent enroll' and a new registration key"


class StateFileError(Exception):
    """The agent state file is missing, unreadable, damaged or not for this machine."""


class StateFileUnavailable(StateFileError):
    """The state file could not be read for a reason that may pass (an I/O error, no file
    descriptors or memory left): unlike the others, worth retrying."""


class StateFileCorruptError(StateFileError):
    """The file is truncated, garbage, or was modified after it was written."""


class StateFileMachineMismatchError(StateFileError):
    """The file was sealed on another machine, or this machine's identifiers have changed."""


@dataclass(frozen=True)
class AgentState:
    """Everything an enrolled agent remembers. The identity seed never appears in repr or logs."""

    agent_id: str
    team_id: str
    server_url: str
    identity_seed: bytes = field(repr=False)
    name: str = ""
    tags: tuple[str, ...] = ()
    ca_file: str | None = None
    ca_pin: str | None = None
    service_keys: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # PinnedPolicyTrust.to_json(): the pinned admins, rendezvous policy key and applied policy
    # version. None in state written before policies existed: such an agent refuses sessions.
    policy_trust: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if len(self.identity_seed) != IDENTITY_SEED_SIZE:
            raise StateFileError(f"the identity seed must be {IDENTITY_SEED_SIZE} bytes")

    def identity(self) -> SigningIdentity:
        """The agent's Ed25519 signing identity."""
        return SigningIdentity.from_seed(self.identity_seed)

    def to_json_dict(self) -> dict[str, Any]:
        """A JSON-able dict (the seed as base64url), the plaintext of the state file."""
        document: dict[str, Any] = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "identity_seed":
                value = b64url(value)
            elif item.name == "tags":
                value = list(value)
            document[item.name] = value
        return document

    @classmethod
    def from_json_dict(cls, document: Any) -> AgentState:
        """Rebuild the state from its JSON dict, refusing missing or mistyped fields."""
        if not isinstance(document, dict):
            raise StateFileCorruptError("agent state is not a JSON object")
        try:
            return cls(
                agent_id=_require(document, "agent_id", str),
                team_id=_require(document, "team_id", str),
                server_url=_require(document, "server_url", str),
                identity_seed=b64url_decode(_require(document, "identity_seed", str), 64),
                name=_optional(document, "name", str, ""),
                tags=tuple(_string_list(_optional(document, "tags", list, []))),
                ca_file=_optional(document, "ca_file", str, None),
                ca_pin=_optional(document, "ca_pin", str, None),
                service_keys=_optional(document, "service_keys", dict, {}),
                extra=_optional(document, "extra", dict, {}),
                policy_trust=_optional(document, "policy_trust", dict, None),
            )
        except StateFileError:
            raise
        except Exception:
            raise StateFileCorruptError("agent state has a malformed field") from None


def seal_state(state: AgentState, identifiers: MachineIdentifiers) -> bytes:
    """Encrypt ``state`` for this machine: the exact bytes of a state file."""
    salt = os.urandom(SALT_SIZE)
    nonce = os.urandom(NONCE_SIZE)
    key, key_check = _derive_keys(identifiers, salt)
    header = (
        STATE_FILE_MAGIC + bytes([STATE_FILE_VERSION]) + salt + nonce + key_check
    )
    plaintext = json.dumps(state.to_json_dict(), sort_keys=True, separators=(",", ":")).encode()
    sealed = header + AESGCM(key).encrypt(nonce, plaintext, header)
    if len(sealed) > MAX_STATE_FILE_SIZE:
        raise StateFileError(f"agent state is larger than {MAX_STATE_FILE_SIZE} bytes")
    return sealed


def open_state(
    data: bytes, identifiers: MachineIdentifiers, source: str = "state file"
) -> AgentState:
    """Decrypt state file bytes with this machine's identifiers, or say plainly why not."""
    if len(data) > MAX_STATE_FILE_SIZE:
        raise StateFileCorruptError(f"{source}: larger than {MAX_STATE_FILE_SIZE} bytes")
    if not data.startswith(STATE_FILE_MAGIC):
        raise StateFileCorruptError(f"{source}: not a TucDesk agent state file")
    if len(data) < HEADER_SIZE + GCM_TAG_SIZE:
        raise StateFileCorruptError(f"{source}: truncated; {_RE_ENROLL_ADVICE}")
    version = data[len(STATE_FILE_MAGIC)]
    if version != STATE_FILE_VERSION:
        raise StateFileCorruptError(
            f"{source}: format version {version} is not supported (expected {STATE_FILE_VERSION})"
        )
    offset = len(STATE_FILE_MAGIC) + 1
    salt = data[offset : offset + SALT_SIZE]
    offset += SALT_SIZE
    nonce = data[offset : offset + NONCE_SIZE]
    offset += NONCE_SIZE
    stored_check = data[offset : offset + KEY_CHECK_SIZE]
    header, ciphertext = data[:HEADER_SIZE], data[HEADER_SIZE:]
    key, key_check = _derive_keys(identifiers, salt)
    if not hmac.compare_digest(key_check, stored_check):
        raise StateFileMachineMismatchError(
            f"{source} was made on another machine, or this machine's identifiers (machine id, "
            f"product UUID, network cards) have changed, so it cannot be decrypted here; "
            f"{_RE_ENROLL_ADVICE}"
        )
    try:
        plaintext = AESGCM(key).decrypt(nonce, ciphertext, header)
    except InvalidTag:
        raise StateFileCorruptError(
            f"{source}: damaged or modified after it was written; {_RE_ENROLL_ADVICE}"
        ) from None
    try:
        document = json.loads(plaintext)
    except ValueError:
        raise StateFileCorruptError(f"{source}: decrypted state is not JSON") from None
    return AgentState.from_json_dict(document)


def save_state(path: Path, state: AgentState, identifiers: MachineIdentifiers) -> None:
    """Seal ``state`` and write it atomically with mode 0600."""
    write_private_file(Path(path), seal_state(state, identifiers))


# Open failures that may pass by themselves (a restart may succeed), unlike a missing file or a
# refused permission.
_TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EINTR,
                               errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE})  # fmt: skip


def load_state(path: Path, identifiers: MachineIdentifiers) -> AgentState:
    """Read and open the state file at ``path``, refusing one that group or others can read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StateFileError(
            f"{path}: no agent state; enroll first with 'tucdesk-agent enroll'"
        ) from None
    except OSError as error:
        kind = StateFileUnavailable if error.errno in _TRANSIENT_ERRNOS else StateFileError
        raise kind(f"{path}: cannot open the agent state ({error.strerror})") from None
    # Checked before fdopen, which refuses a directory with a bare IsADirectoryError.
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise StateFileError(f"{path}: not a regular file; remove it, then {_RE_ENROLL_ADVICE}")
    with os.fdopen(fd, "rb") as handle:
        if info.st_mode & 0o077:
            raise StateFileError(
                f"{path}: permissions {stat.S_IMODE(info.st_mode):04o} are too open; "
                f"run 'chmod 600 {path}'"
            )
        data = handle.read(MAX_STATE_FILE_SIZE + 1)
    return open_state(data, identifiers, source=str(path))


def _derive_keys(identifiers: MachineIdentifiers, salt: bytes) -> tuple[bytes, bytes]:
    material = identifiers.key_material()
    key = HKDF(hashes.SHA256(), KEY_SIZE, salt, STATE_KEY_INFO).derive(material)
    key_check = HKDF(hashes.SHA256(), KEY_CHECK_SIZE, salt, KEY_CHECK_INFO).derive(material)
    return key, key_check


def _require(document: dict[str, Any], name: str, kind: type) -> Any:
    value = document.get(name)
    if not isinstance(value, kind):
        raise StateFileCorruptError(f"agent state field '{name}' is missing or not {kind.__name__}")
    return value


def _optional(document: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = document.get(name, default)
    if value is not default and not isinstance(value, kind):
        raise StateFileCorruptError(f"agent state field '{name}' is not a {kind.__name__}")
    return value


def _string_list(values: list[Any]) -> list[str]:
    if not all(isinstance(value, str) for value in values):
        raise StateFileCorruptError("agent state field 'tags' must be a list of strings")
    return values
