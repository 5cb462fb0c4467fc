"""The rendezvous service keys: JWT issuer, audit signer, relay-token signer and policy signer.

Each is an Ed25519 key in its own 0600 file under ``DATA_DIR/keys``. ``init`` creates missing
ones and never overwrites an existing key; ``serve`` only loads them. The public halves are
published as a JWK set (kid = RFC 7638 thumbprint, ``use`` = "sig", ``purpose`` = the role).

The first ``init`` (or ``serve``) on a database pins the keys' fingerprints in it; an instance
whose data dir holds other keys — typically an empty data dir initialised afresh against a
populated database — is refused, naming both fingerprints, instead of signing audit records,
tokens and policies with keys nobody pinned.

``tucdesk-rendezvous keys rotate PURPOSE`` (rendezvous/key_rotation.py) replaces one key: the
old private key file is gone, its public half is kept in the database as *retired*
(``retired_service_keys``) and still verifies what it signed: access tokens, session grants and
relay tokens until ``accept_until`` (their longest lifetime after the rotation, or at once with
``--retire-old-now``), audit records for ever. Every instance loads the retired keys with the
current ones (at start and on SIGHUP).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from protocol.errors import KeyFileError
from protocol.identity import (
    PUBLIC_KEY_SIZE,
    PublicIdentity,
    SigningIdentity,
    b64url,
    b64url_decode,
)
from rendezvous.errors import ConfigError

if TYPE_CHECKING:
    from rendezvous.store import Store
    from rendezvous.store.base import RetiredServiceKey

KEYS_DIRECTORY = "keys"
KEYS_DIRECTORY_MODE = 0o700
KEY_ROLES = ("jwt-issuer", "audit-signer", "relay-token", "policy-signer")
# A mismatch names the audit signer first: the key verifiers of exported logs have pinned.
_MISMATCH_ORDER = ("audit-signer", "jwt-issuer", "relay-token", "policy-signer")
# Where `keys rotate` writes the new key until the database pins it: KEYFILE + suffix + a
# random name of its own, so two rotations never write (or move into place) each other's file.
PENDING_KEY_SUFFIX = ".new."
# Held (flock) for the whole of a `keys rotate` on a data dir (key_rotation.py).
ROTATION_LOCK_FILE = ".rotate.lock"
KEY_STATE_CURRENT = "current"
# The purposes whose rotations agents follow (agent/enrollment.py): only the session-grant
# signer. The others' statements are not sent (agents would only skip them).
AGENT_FOLLOWED_PURPOSES = ("jwt-issuer",)
# The rotation horizon: statements of rotations older than this are no longer sent. Agents
# follow the chain in memory from the keys pinned at enrollment on every connect, so an agent
# whose enrollment pins predate the horizon (or the newest MAX_ROTATION_STATEMENTS_PER_PURPOSE
# rotations, the agent's own cap) no longer follows once it restarts: re-enroll it. Two years
# and 256 statements leave room for rotating the grant signer even weekly.
ROTATION_HORIZON_SECONDS = 2 * 365 * 24 * 3600
MAX_ROTATION_STATEMENTS_PER_PURPOSE = 256
KEY_STATE_RETIRED = "retired"


@dataclass(frozen=True)
class RetiredKey:
    """A rotated-out service key: its public half, and until when what it signed is accepted."""

    role: str
    public: PublicIdentity
    replaced_by: str
    retired_at: float
    accept_until: float
    statement: Mapping[str, Any]
    """The rotation statement it signed, naming its successor (key_rotation.py)."""

    @classmethod
    def from_stored(cls, stored: RetiredServiceKey) -> RetiredKey:
        """The retired key a store row describes."""
        public = PublicIdentity(b64url_decode(stored.public_key, max_size=PUBLIC_KEY_SIZE))
        statement = json.loads(stored.statement)
        return cls(
            stored.role, public, stored.replaced_by, stored.retired_at, stored.accept_until,
            MappingProxyType(statement),
        )  # fmt: skip

    def is_accepted(self, now: float) -> bool:
        """Whether tokens, grants and relay tokens it signed may still verify."""
        return now < self.accept_until

    def describe_state(self, now: float) -> str:
        """Its state for ``keys show``."""
        if self.is_accepted(now):
            return f"retired, accepted until {_utc(self.accept_until)} (then audit records only)"
        return "retired, verifies audit records only"


def _utc(moment: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(moment))


@dataclass(frozen=True)
class ServiceKeys:
    """The four service signing keys, by role, and the retired public keys."""

    jwt_issuer: SigningIdentity
    audit_signer: SigningIdentity
    relay_token: SigningIdentity
    policy_signer: SigningIdentity
    retired: tuple[RetiredKey, ...] = ()

    def rotation_statements(
        self, now: float | None = None, purposes: tuple[str, ...] = AGENT_FOLLOWED_PURPOSES
    ) -> list[dict[str, Any]]:
        """The rotation statements agents can still need, oldest first: per purpose in
        ``purposes``, those of the last ROTATION_HORIZON_SECONDS, at most the newest
        MAX_ROTATION_STATEMENTS_PER_PURPOSE (the chain from any key pinned within the horizon)."""
        moment = time.time() if now is None else now
        chosen: list[RetiredKey] = []
        for purpose in purposes:
            recent = sorted(
                (key for key in self.retired
                 if key.role == purpose and key.retired_at >= moment - ROTATION_HORIZON_SECONDS),
                key=lambda k: k.retired_at,
            )
            chosen += recent[-MAX_ROTATION_STATEMENTS_PER_PURPOSE:]
        return [dict(key.statement) for key in sorted(chosen, key=lambda k: k.retired_at)]

    def retired_keys(self, role: str, now: float) -> list[RetiredKey]:
        """The retired keys of ``role`` whose signed tokens are still accepted at ``now``."""
        return [key for key in self.retired if key.role == role and key.is_accepted(now)]

    def by_role(self) -> dict[str, SigningIdentity]:
        """Each key under its role name, in KEY_ROLES order."""
        return {
            "jwt-issuer": self.jwt_issuer,
            "audit-signer": self.audit_signer,
            "relay-token": self.relay_token,
            "policy-signer": self.policy_signer,
        }

    def token_verification_keys(self) -> Mapping[str, PublicIdentity]:
        """Keys that may sign access tokens, by kid: the JWT issuer key, and retired ones whose
        tokens may still be unexpired."""
        return self._token_verification_keys

    @cached_property
    def _token_verification_keys(self) -> Mapping[str, PublicIdentity]:
        # Asked on every authenticated request; the kid is a hash of the key, so compute it once.
        # A retired key kept past its accept_until verifies nothing more: every token it signed
        # was issued before the rotation and expires by then (accept_until covers the longest
        # lifetime); with --retire-old-now it is never included.
        keys = {self.jwt_issuer.public.key_id: self.jwt_issuer.public}
        for retired in self.retired_keys("jwt-issuer", time.time()):
            keys.setdefault(retired.public.key_id, retired.public)
        return MappingProxyType(keys)

    def jwks(self, now: float | None = None) -> dict[str, Any]:
        """The public JWK set for relays, agents and verifiers to pin: the current keys, then the
        retired ones still accepted (``state`` says which is which)."""
        moment = time.time() if now is None else now
        published = [(role, key.public, KEY_STATE_CURRENT) for role, key in self.by_role().items()]
        published += [
            (retired.role, retired.public, KEY_STATE_RETIRED)
            for retired in self.retired
            if retired.is_accepted(moment)
        ]
        return {
            "keys": [
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": b64url(public.raw),
                    "kid": public.key_id,
                    "use": "sig",
                    "alg": "EdDSA",
                    "purpose": role,
                    "fingerprint": public.fingerprint,
                    "state": state,
                }
                for role, public, state in published
            ]
        }


def key_path(data_dir: Path, role: str) -> Path:
    """Where the key for ``role`` lives under the data dir."""
    return Path(data_dir) / KEYS_DIRECTORY / f"{role}.key"


def pending_key_path(data_dir: Path, role: str, name: str) -> Path:
    """Where ``keys rotate`` keeps the new key for ``role`` until the database pins it
    (``name`` is the rotation's own random name)."""
    path = key_path(data_dir, role)
    return path.with_name(path.name + PENDING_KEY_SUFFIX + name)


def pending_key_paths(data_dir: Path, role: str) -> list[Path]:
    """The pending key files of ``role`` that interrupted rotations left, by name."""
    path = key_path(data_dir, role)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(path.name + PENDING_KEY_SUFFIX + "*"))


async def with_retired_keys(store: Store, keys: ServiceKeys) -> ServiceKeys:
    """``keys`` with the database's retired keys added."""
    stored = await store.retired_service_keys()
    return ServiceKeys(
        jwt_issuer=keys.jwt_issuer,
        audit_signer=keys.audit_signer,
        relay_token=keys.relay_token,
        policy_signer=keys.policy_signer,
        retired=tuple(RetiredKey.from_stored(row) for row in stored),
    )


def create_missing_keys(data_dir: Path) -> list[str]:
    """Generate any service key that does not exist yet; return the roles created."""
    created = []
    directory = Path(data_dir) / KEYS_DIRECTORY
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(KEYS_DIRECTORY_MODE)
    for role in KEY_ROLES:
        path = key_path(data_dir, role)
        if not path.exists():
            SigningIdentity.generate().save(path)
            created.append(role)
    return created


def load_service_keys(data_dir: Path) -> ServiceKeys:
    """Load all four service keys, raising KeyFileError naming the first missing or unsafe file."""
    loaded = {}
    for role in KEY_ROLES:
        path = key_path(data_dir, role)
        if not path.exists():
            raise KeyFileError(
                f"{path} is missing; run 'tucdesk-rendezvous init --data-dir {data_dir}' first"
            )
        loaded[role] = SigningIdentity.load(path)
    return ServiceKeys(
        jwt_issuer=loaded["jwt-issuer"],
        audit_signer=loaded["audit-signer"],
        relay_token=loaded["relay-token"],
        policy_signer=loaded["policy-signer"],
    )


class ServiceKeyMismatch(ConfigError):
    """The data dir's service keys are not the ones the database was initialised with."""


async def missing_pinned_keys(store: Store, data_dir: Path) -> None:
    """Raise ServiceKeyMismatch if the database pinned keys whose files the data dir lacks.

    ``init`` asks this before creating keys, so it never makes new ones for such a database.
    """
    pinned = await store.service_key_fingerprints()
    for role in _MISMATCH_ORDER:
        if role in pinned and not key_path(data_dir, role).exists():
            raise ServiceKeyMismatch(
                f"this database was initialised with {role} key {pinned[role]} but "
                f"{key_path(data_dir, role)} does not exist; copy {Path(data_dir) / KEYS_DIRECTORY}"
                " from the first instance (init does not create keys for such a database)"
            )


async def check_pinned_keys(
    store: Store, keys: ServiceKeys, data_dir: Path, now: float, *, pin: bool
) -> None:
    """Raise ServiceKeyMismatch unless ``keys`` are the ones the database pinned.

    With ``pin``, roles the database has no fingerprint for yet are pinned to ``keys`` first
    (the first ``init`` or ``serve`` on the database, or one initialised by an older version).
    """
    held = {role: key.public.fingerprint for role, key in keys.by_role().items()}
    if pin:
        pinned = await store.pin_service_key_fingerprints(held, now)
    else:
        pinned = await store.service_key_fingerprints()
    for role in _MISMATCH_ORDER:
        if role in pinned and pinned[role] != held[role]:
            _raise_if_rotation_unfinished(data_dir, role, pinned[role])
            raise ServiceKeyMismatch(
                f"this database was initialised with {role} key {pinned[role]} but "
                f"{key_path(data_dir, role)} holds {held[role]}; copy "
                f"{Path(data_dir) / KEYS_DIRECTORY} from the first instance (or from the "
                "instance where 'keys rotate' last ran)"
            )


def _raise_if_rotation_unfinished(data_dir: Path, role: str, pinned: str) -> None:
    """Name the step left of a rotation interrupted after the database pinned its key.

    The rotation pins the new key, then records service_key.rotated in every audit log, then
    moves the new key file into place (key_rotation.py); died before the move, only the ``mv``
    is left, and the audit records may be missing if it died before writing them all.
    """
    for pending in pending_key_paths(data_dir, role):
        try:
            fingerprint = SigningIdentity.load(pending).public.fingerprint
        except KeyFileError:
            continue
        if fingerprint == pinned:
            raise ServiceKeyMismatch(
                f"a rotation of the {role} key was interrupted after the database pinned the "
                f"new key {pinned}; finish it: mv {pending} {key_path(data_dir, role)} (if it "
                f"died before recording it, the audit logs lack its service_key.rotated record: "
                f"'keys show' lists the retired key)"
            )
