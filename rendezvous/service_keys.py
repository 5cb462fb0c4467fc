"""The rendezvous service keys: JWT issuer, audit signer, relay-token signer and policy signer.

Each is an Ed25519 key in its own 0600 file under ``DATA_DIR/keys``. ``init`` creates missing
ones and never overwrites an existing key; ``serve`` only loads them. The public halves are
published as a JWK set (kid = RFC 7638 thumbprint, ``use`` = "sig", ``purpose`` = the role).

The first ``init`` (or ``serve``) on a database pins the keys' fingerprints in it; an instance
whose data dir holds other keys — typically an empty data dir initialised afresh against a
populated database — is refused, naming both fingerprints, instead of signing audit records,
tokens and policies with keys nobody pinned.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from protocol.errors import KeyFileError
from protocol.identity import PublicIdentity, SigningIdentity, b64url
from rendezvous.errors import ConfigError

if TYPE_CHECKING:
    from rendezvous.store import Store

KEYS_DIRECTORY = "keys"
KEYS_DIRECTORY_MODE = 0o700
KEY_ROLES = ("jwt-issuer", "audit-signer", "relay-token", "policy-signer")
# A mismatch names the audit signer first: the key verifiers of exported logs have pinned.
_MISMATCH_ORDER = ("audit-signer", "jwt-issuer", "relay-token", "policy-signer")


@dataclass(frozen=True)
class ServiceKeys:
    """The four service signing keys, by role."""

    jwt_issuer: SigningIdentity
    audit_signer: SigningIdentity
    relay_token: SigningIdentity
    policy_signer: SigningIdentity

    def by_role(self) -> dict[str, SigningIdentity]:
        """Each key under its role name, in KEY_ROLES order."""
        return {
            "jwt-issuer": self.jwt_issuer,
            "audit-signer": self.audit_signer,
            "relay-token": self.relay_token,
            "policy-signer": self.policy_signer,
        }

    def token_verification_keys(self) -> Mapping[str, PublicIdentity]:
        """Keys that may sign access tokens, by kid (only the JWT issuer key)."""
        return self._token_verification_keys

    @cached_property
    def _token_verification_keys(self) -> Mapping[str, PublicIdentity]:
        # Asked on every authenticated request; the kid is a hash of the key, so compute it once.
        return MappingProxyType({self.jwt_issuer.public.key_id: self.jwt_issuer.public})

    def jwks(self) -> dict[str, Any]:
        """The public JWK set for relays, agents and verifiers to pin."""
        return {
            "keys": [
                {
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "x": b64url(key.public.raw),
                    "kid": key.public.key_id,
                    "use": "sig",
                    "alg": "EdDSA",
                    "purpose": role,
                    "fingerprint": key.public.fingerprint,
                }
                for role, key in self.by_role().items()
            ]
        }


def key_path(data_dir: Path, role: str) -> Path:
    """Where the key for ``role`` lives under the data dir."""
    return Path(data_dir) / KEYS_DIRECTORY / f"{role}.key"


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
            raise ServiceKeyMismatch(
                f"this database was initialised with {role} key {pinned[role]} but "
                f"{key_path(data_dir, role)} holds {held[role]}; copy "
                f"{Path(data_dir) / KEYS_DIRECTORY} from the first instance"
            )
