"""The signed policy bundle: policy, roster and agent tags, signed by an admin and the rendezvous.

An admin signs the bundle content with their operator key (Purpose.POLICY); the rendezvous then
countersigns the content hash and the admin signature with its policy-signer key
(Purpose.POLICY_COUNTERSIGN). JSON form::

    {"content": {"format": "tucdesk-policy-bundle-v1", "team_id": ..., "version": 7,
                 "issued_at": <Unix s>, "previous_sha256": <hex> | null,
                 "policy_toml": "...", "policy_sha256": <hex>,
                 "roster": [{"public_key", "email", "role"}, ...],
                 "agent_tags": {"<agent id>": ["tag", ...], ...}},
     "admin_signature": {"key_id": <thumbprint>, "signature": <b64url>},
     "countersignature": {"key_id": <thumbprint>, "signature": <b64url>} | null}

Both signatures cover the RFC 8785 canonical encoding, so the JSON may be re-serialised freely.

An agent pins its team's admin keys and the rendezvous policy key at enrollment
(PinnedPolicyTrust) and takes a new bundle only through accept_policy_bundle: signed by a pinned
admin, countersigned by the pinned rendezvous key, for its team, and newer than what it has. The
admins of the accepted roster become the new pins, so a change to the admin set always carries
the signature of an admin who was already trusted, and the rendezvous alone can neither add an
operator nor loosen the policy.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from protocol.canonical_json import CanonicalJsonError, canonical_json
from protocol.domains import Purpose
from protocol.errors import PayloadError, ProtocolError
from protocol.identity import (
    SIGNATURE_SIZE,
    PublicIdentity,
    SigningIdentity,
    b64url,
    b64url_decode,
)
from protocol.policy.document import MAX_VERSION, Policy, parse_policy
from protocol.policy.errors import (
    CountersignatureError,
    MalformedBundleError,
    PolicyDocumentError,
    RequestError,
    RollbackError,
    TeamMismatchError,
    UntrustedSignerError,
)
from protocol.policy.request import AccessRequest, Action, TargetAgent
from protocol.policy.roster import Roster, RosterError

BUNDLE_FORMAT = "tucdesk-policy-bundle-v1"
MAX_BUNDLE_SIZE = 2 * 1024 * 1024
MAX_TEAM_ID_LENGTH = 128
MAX_TAGGED_AGENTS = 10_000
MAX_TAGS_PER_AGENT = 64
MAX_TAG_LENGTH = 128
MAX_AGENT_ID_LENGTH = 128
MAX_PINNED_ADMINS = 64
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_CONTENT_KEYS = frozenset(
    {
        "format",
        "team_id",
        "version",
        "issued_at",
        "previous_sha256",
        "policy_toml",
        "policy_sha256",
        "roster",
        "agent_tags",
    }
)
_BUNDLE_KEYS = frozenset({"content", "admin_signature", "countersignature"})
_SIGNATURE_KEYS = frozenset({"key_id", "signature"})
_TRUST_KEYS = frozenset({"team_id", "admin_keys", "rendezvous_key", "version", "bundle_sha256"})


@dataclass(frozen=True)
class PolicyBundleContent:
    """What admins sign: the team's policy text, roster and admin-assigned agent tags."""

    team_id: str
    version: int
    issued_at: int
    policy_text: str
    roster: Roster
    agent_tags: Mapping[str, frozenset[str]]
    previous_sha256: str | None
    policy: Policy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_text(self.team_id, "team_id", MAX_TEAM_ID_LENGTH)
        for name, value in (("version", self.version), ("issued_at", self.issued_at)):
            if type(value) is not int or not 0 <= value <= MAX_VERSION:
                raise MalformedBundleError(f"bundle {name} must be a whole number")
        if self.version < 1:
            raise MalformedBundleError("bundle version must be at least 1")
        if self.previous_sha256 is not None and not _is_sha256_hex(self.previous_sha256):
            raise MalformedBundleError("bundle previous_sha256 must be a hex SHA-256 or null")
        if not isinstance(self.policy_text, str):
            raise MalformedBundleError("bundle policy must be TOML text")
        if not isinstance(self.roster, Roster):
            raise MalformedBundleError("bundle roster must be a Roster")
        if not self.roster.admin_keys():
            raise MalformedBundleError("bundle roster must keep at least one admin")
        object.__setattr__(self, "agent_tags", _check_agent_tags(self.agent_tags))
        try:
            # Signed earlier, perhaps under older checks: new bundles get the full ones at
            # sign_policy_bundle and countersign_policy_bundle.
            policy = parse_policy(self.policy_text, already_signed=True)
        except PolicyDocumentError as error:
            raise MalformedBundleError(f"bundle policy is invalid: {error}") from None
        if policy.version != self.version:
            raise MalformedBundleError(
                f"bundle version {self.version} differs from the policy's version {policy.version}"
            )
        object.__setattr__(self, "policy", policy)

    @property
    def policy_sha256(self) -> str:
        """Hex SHA-256 of the policy text's UTF-8 bytes."""
        return hashlib.sha256(self.policy_text.encode("utf-8")).hexdigest()

    def tags_for(self, agent_id: str) -> frozenset[str]:
        """The tags admins assigned to ``agent_id`` (empty if none)."""
        return self.agent_tags.get(agent_id, frozenset())

    def to_json(self) -> dict[str, Any]:
        """The content as a JSON object."""
        return {
            "format": BUNDLE_FORMAT,
            "team_id": self.team_id,
            "version": self.version,
            "issued_at": self.issued_at,
            "previous_sha256": self.previous_sha256,
            "policy_toml": self.policy_text,
            "policy_sha256": self.policy_sha256,
            "roster": self.roster.to_json(),
            "agent_tags": {agent: sorted(tags) for agent, tags in sorted(self.agent_tags.items())},
        }

    def canonical_bytes(self) -> bytes:
        """The RFC 8785 encoding both signatures cover."""
        return _canonical(self.to_json())

    def sha256(self) -> str:
        """Hex SHA-256 of the canonical content: the bundle's identity, chained by the next one."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    @classmethod
    def from_json(cls, data: object) -> PolicyBundleContent:
        """Parse content written by to_json; raise MalformedBundleError if it is malformed."""
        if not isinstance(data, dict) or set(data) != _CONTENT_KEYS:
            raise MalformedBundleError(
                f"bundle content has exactly the keys {sorted(_CONTENT_KEYS)}"
            )
        if data["format"] != BUNDLE_FORMAT:
            raise MalformedBundleError(f"bundle format must be {BUNDLE_FORMAT}")
        tags = data["agent_tags"]
        if not isinstance(tags, dict) or not all(
            isinstance(values, list) and all(isinstance(tag, str) for tag in values)
            for values in tags.values()
        ):
            raise MalformedBundleError("bundle agent_tags maps agent ids to lists of tags")
        if any(len(set(values)) != len(values) for values in tags.values()):
            raise MalformedBundleError("bundle agent_tags lists a tag twice")
        try:
            roster = Roster.from_json(data["roster"])
            content = cls(
                team_id=data["team_id"],
                version=data["version"],
                issued_at=data["issued_at"],
                policy_text=data["policy_toml"],
                roster=roster,
                agent_tags={agent: frozenset(values) for agent, values in tags.items()},
                previous_sha256=data["previous_sha256"],
            )
        except (RosterError, TypeError) as error:
            raise MalformedBundleError(f"bundle is malformed: {error}") from None
        if not _is_sha256_hex(data["policy_sha256"]) or not hmac.compare_digest(
            data["policy_sha256"], content.policy_sha256
        ):
            raise MalformedBundleError("bundle policy_sha256 does not match its policy text")
        return content


@dataclass(frozen=True)
class SignedPolicyBundle:
    """Bundle content with the admin's signature and, once published, the rendezvous's."""

    content: PolicyBundleContent
    admin_key_id: str
    admin_signature: bytes
    countersigner_key_id: str | None = None
    countersignature: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        """The bundle as a JSON object (see the module docstring)."""
        countersignature = None
        if self.countersigner_key_id is not None and self.countersignature is not None:
            countersignature = {
                "key_id": self.countersigner_key_id,
                "signature": b64url(self.countersignature),
            }
        return {
            "content": self.content.to_json(),
            "admin_signature": {
                "key_id": self.admin_key_id,
                "signature": b64url(self.admin_signature),
            },
            "countersignature": countersignature,
        }

    def to_bytes(self) -> bytes:
        """The bundle as canonical JSON bytes, for storage and transport."""
        return _canonical(self.to_json())

    @classmethod
    def from_json(cls, data: object) -> SignedPolicyBundle:
        """Parse a bundle from its JSON object, text or bytes; MalformedBundleError if malformed."""
        if isinstance(data, str | bytes | bytearray):
            data = _parse_json(data)
        if not isinstance(data, dict) or set(data) != _BUNDLE_KEYS:
            raise MalformedBundleError(
                f"a policy bundle has exactly the keys {sorted(_BUNDLE_KEYS)}"
            )
        content = PolicyBundleContent.from_json(data["content"])
        admin_key_id, admin_signature = _parse_signature(data["admin_signature"], "admin")
        countersigner_key_id = countersignature = None
        if data["countersignature"] is not None:
            countersigner_key_id, countersignature = _parse_signature(
                data["countersignature"], "rendezvous"
            )
        return cls(content, admin_key_id, admin_signature, countersigner_key_id, countersignature)


@dataclass(frozen=True)
class PinnedPolicyTrust:
    """What an agent trusts for policy: its team, admin keys, rendezvous key, cached version."""

    team_id: str
    admin_keys: Mapping[str, PublicIdentity]
    rendezvous_key: PublicIdentity
    version: int = 0
    bundle_sha256: str | None = None

    def __post_init__(self) -> None:
        if not _is_text(self.team_id, MAX_TEAM_ID_LENGTH):
            raise ValueError(f"the pinned team id must be 1..{MAX_TEAM_ID_LENGTH} characters")
        keys = dict(self.admin_keys)
        if not keys or len(keys) > MAX_PINNED_ADMINS:
            raise ValueError(f"pin between 1 and {MAX_PINNED_ADMINS} admin keys")
        for thumbprint, key in keys.items():
            if not isinstance(key, PublicIdentity) or key.key_id != thumbprint:
                raise ValueError("pinned admin keys must be stored under their own thumbprint")
        if not isinstance(self.rendezvous_key, PublicIdentity):
            raise ValueError("the pinned rendezvous policy key must be a PublicIdentity")
        if type(self.version) is not int or self.version < 0:
            raise ValueError("the cached policy version must be a whole number")
        if self.bundle_sha256 is not None and not _is_sha256_hex(self.bundle_sha256):
            raise ValueError("the cached bundle hash must be a hex SHA-256")
        object.__setattr__(self, "admin_keys", keys)

    @classmethod
    def at_enrollment(
        cls, team_id: str, admin_keys: Iterable[PublicIdentity], rendezvous_key: PublicIdentity
    ) -> PinnedPolicyTrust:
        """The pins an agent takes at enrollment, before it has any policy."""
        return cls(team_id, {key.key_id: key for key in admin_keys}, rendezvous_key)

    def to_json(self) -> dict[str, Any]:
        """The pins as a JSON object, for the agent's state file."""
        return {
            "team_id": self.team_id,
            "admin_keys": sorted(b64url(key.raw) for key in self.admin_keys.values()),
            "rendezvous_key": b64url(self.rendezvous_key.raw),
            "version": self.version,
            "bundle_sha256": self.bundle_sha256,
        }

    @classmethod
    def from_json(cls, data: object) -> PinnedPolicyTrust:
        """Parse pins written by to_json; raise ValueError if they are malformed."""
        if not isinstance(data, dict) or set(data) != _TRUST_KEYS:
            raise ValueError(f"policy pins have exactly the keys {sorted(_TRUST_KEYS)}")
        admin_keys = data["admin_keys"]
        if not isinstance(admin_keys, list) or not all(isinstance(k, str) for k in admin_keys):
            raise ValueError("policy pins list admin keys as base64url text")
        try:
            keys = [PublicIdentity(b64url_decode(text, max_size=64)) for text in admin_keys]
            rendezvous_key = PublicIdentity(b64url_decode(data["rendezvous_key"], max_size=64))
        except ProtocolError as error:
            raise ValueError(f"policy pins hold an invalid key: {error}") from None
        return cls(
            data["team_id"],
            {key.key_id: key for key in keys},
            rendezvous_key,
            data["version"],
            data["bundle_sha256"],
        )


@dataclass(frozen=True)
class AcceptedPolicy:
    """A bundle that passed every check, its parsed policy and roster, and the pins to keep."""

    bundle: SignedPolicyBundle
    trust: PinnedPolicyTrust
    admins_changed: bool
    unchanged: bool

    @property
    def policy(self) -> Policy:
        """The parsed policy."""
        return self.bundle.content.policy

    @property
    def roster(self) -> Roster:
        """The signed team roster."""
        return self.bundle.content.roster

    def access_request(
        self,
        operator_thumbprint: str,
        agent_id: str,
        agent_name: str,
        action: Action,
        command: tuple[str, ...] | None = None,
    ) -> AccessRequest:
        """The request decide() rules on, with who and which tags taken from this bundle only.

        Raises RequestError unless the key is in the signed roster with a role that may open
        sessions: a grant for any other key is refused whatever the policy says.
        """
        if not self.roster.may_open_sessions(operator_thumbprint):
            raise RequestError(
                "the operator key is not in the signed roster with a role that may open sessions"
            )
        return AccessRequest(
            operator=self.roster.requesting_operator(operator_thumbprint),
            agent=TargetAgent(agent_id, agent_name, self.bundle.content.tags_for(agent_id)),
            action=action,
            command=command,
        )


def sign_policy_bundle(content: PolicyBundleContent, admin: SigningIdentity) -> SignedPolicyBundle:
    """An admin's signature over ``content`` (the admin CLI does this; not yet countersigned)."""
    _check_new_document(content)
    signature = admin.sign(Purpose.POLICY, content.canonical_bytes())
    return SignedPolicyBundle(content, admin.public.key_id, signature)


def countersign_policy_bundle(
    bundle: SignedPolicyBundle, rendezvous: SigningIdentity, trust: PinnedPolicyTrust
) -> AcceptedPolicy:
    """The rendezvous's countersignature, given only after the admin checks pass under ``trust``.

    ``trust`` is the rendezvous's own view of the team: its current admins and published version.
    """
    _check_new_document(bundle.content)
    checked = _check_admin_signed(bundle, trust)
    countersigned = replace(
        bundle,
        countersigner_key_id=rendezvous.public.key_id,
        countersignature=rendezvous.sign(Purpose.POLICY_COUNTERSIGN, _countersigned_bytes(bundle)),
    )
    return replace(checked, bundle=countersigned)


def _check_new_document(content: PolicyBundleContent) -> None:
    """The full checks of parse_policy for a document about to be signed or countersigned: a
    bundle signed earlier is read leniently (``already_signed``), a new one never is."""
    try:
        parse_policy(content.policy_text)
    except PolicyDocumentError as error:
        raise MalformedBundleError(f"bundle policy is invalid: {error}") from None


def accept_policy_bundle(bundle: object, trust: PinnedPolicyTrust) -> AcceptedPolicy:
    """Accept a bundle (object, JSON text or bytes) under the agent's pins, or raise why not.

    Raises MalformedBundleError, TeamMismatchError, UntrustedSignerError, CountersignatureError
    or RollbackError. On success the returned pins (``.trust``) replace the old ones.
    """
    parsed = (
        bundle if isinstance(bundle, SignedPolicyBundle) else SignedPolicyBundle.from_json(bundle)
    )
    if parsed.countersignature is None or parsed.countersigner_key_id is None:
        raise CountersignatureError("the policy bundle lacks the rendezvous countersignature")
    if parsed.countersigner_key_id != trust.rendezvous_key.key_id:
        raise CountersignatureError("the policy bundle is countersigned by an unpinned key")
    try:
        trust.rendezvous_key.verify(
            Purpose.POLICY_COUNTERSIGN, _countersigned_bytes(parsed), parsed.countersignature
        )
    except ProtocolError:
        raise CountersignatureError(
            "the policy bundle's rendezvous countersignature does not verify"
        ) from None
    return _check_admin_signed(parsed, trust)


def _check_admin_signed(bundle: SignedPolicyBundle, trust: PinnedPolicyTrust) -> AcceptedPolicy:
    content = bundle.content
    if content.team_id != trust.team_id:
        raise TeamMismatchError("the policy bundle is for another team")
    digest = content.sha256()
    if (
        content.version == trust.version
        and trust.bundle_sha256 is not None
        and hmac.compare_digest(digest, trust.bundle_sha256)
    ):
        # The very content accepted before (a re-delivery, or the cached copy at start-up). Its
        # signer may since have left the pins, e.g. the admin who handed over in this version.
        return AcceptedPolicy(bundle, trust, admins_changed=False, unchanged=True)
    admin = trust.admin_keys.get(bundle.admin_key_id)
    if admin is None:
        raise UntrustedSignerError("the policy bundle is not signed by a pinned admin key")
    try:
        admin.verify(Purpose.POLICY, content.canonical_bytes(), bundle.admin_signature)
    except ProtocolError:
        raise UntrustedSignerError("the policy bundle's admin signature does not verify") from None
    if content.version < trust.version:
        raise RollbackError(
            f"policy version {content.version} is older than the cached version {trust.version}"
        )
    if content.version == trust.version:
        raise RollbackError(
            f"policy version {content.version} differs from the cached bundle of that version"
        )
    if (
        content.version == trust.version + 1
        and trust.bundle_sha256 is not None
        and (
            content.previous_sha256 is None
            or not hmac.compare_digest(content.previous_sha256, trust.bundle_sha256)
        )
    ):
        raise RollbackError("the policy bundle does not follow the cached one (previous_sha256)")
    new_admins = content.roster.admin_keys()
    new_trust = replace(trust, admin_keys=new_admins, version=content.version, bundle_sha256=digest)
    changed = set(new_admins) != set(trust.admin_keys)
    return AcceptedPolicy(bundle, new_trust, admins_changed=changed, unchanged=False)


def _countersigned_bytes(bundle: SignedPolicyBundle) -> bytes:
    return _canonical(
        {
            "content_sha256": bundle.content.sha256(),
            "admin_key_id": bundle.admin_key_id,
            "admin_signature": b64url(bundle.admin_signature),
        }
    )


def _parse_signature(data: object, whose: str) -> tuple[str, bytes]:
    if not isinstance(data, dict) or set(data) != _SIGNATURE_KEYS:
        raise MalformedBundleError(f"the {whose} signature has exactly the keys key_id, signature")
    key_id, text = data["key_id"], data["signature"]
    if not isinstance(key_id, str) or not isinstance(text, str) or len(key_id) > 64:
        raise MalformedBundleError(f"the {whose} signature is malformed")
    try:
        signature = b64url_decode(text, max_size=SIGNATURE_SIZE)
    except PayloadError:
        raise MalformedBundleError(f"the {whose} signature is not base64url") from None
    if len(signature) != SIGNATURE_SIZE:
        raise MalformedBundleError(f"the {whose} signature must be {SIGNATURE_SIZE} bytes")
    return key_id, signature


def _check_agent_tags(tags: object) -> dict[str, frozenset[str]]:
    if not isinstance(tags, Mapping):
        raise MalformedBundleError("bundle agent_tags must map agent ids to tags")
    if len(tags) > MAX_TAGGED_AGENTS:
        raise MalformedBundleError(f"bundle agent_tags covers at most {MAX_TAGGED_AGENTS} agents")
    checked: dict[str, frozenset[str]] = {}
    for agent_id, agent_tags in tags.items():
        _check_text(agent_id, "agent id", MAX_AGENT_ID_LENGTH)
        if not isinstance(agent_tags, frozenset) or len(agent_tags) > MAX_TAGS_PER_AGENT:
            raise MalformedBundleError(f"an agent has at most {MAX_TAGS_PER_AGENT} tags")
        for tag in agent_tags:
            _check_text(tag, "tag", MAX_TAG_LENGTH)
        checked[agent_id] = agent_tags
    return checked


def _check_text(value: object, name: str, limit: int) -> None:
    if not _is_text(value, limit):
        raise MalformedBundleError(f"bundle {name} must be 1..{limit} printable characters")


def _is_text(value: object, limit: int) -> bool:
    # Printable excludes lone surrogates, which could not be canonically encoded and signed.
    return isinstance(value, str) and 0 < len(value) <= limit and value.isprintable()


def _is_sha256_hex(value: object) -> bool:
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def _parse_json(data: str | bytes | bytearray) -> object:
    if len(data) > MAX_BUNDLE_SIZE:
        raise MalformedBundleError(f"a policy bundle is at most {MAX_BUNDLE_SIZE} bytes")
    try:
        return json.loads(
            data, object_pairs_hook=_object_without_duplicates, parse_float=_refuse_float,
            parse_constant=_refuse_float,
        )
    except MalformedBundleError:
        raise
    except (ValueError, RecursionError):
        raise MalformedBundleError("a policy bundle must be JSON") from None


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise MalformedBundleError("a policy bundle has a duplicate key")
    return result


def _refuse_float(text: str) -> object:
    raise MalformedBundleError("a policy bundle holds no floating-point numbers")


def _canonical(value: Any) -> bytes:
    try:
        return canonical_json(value)
    except CanonicalJsonError:
        raise MalformedBundleError("the policy bundle cannot be canonically encoded") from None


__all__ = [
    "BUNDLE_FORMAT",
    "MAX_BUNDLE_SIZE",
    "AcceptedPolicy",
    "PinnedPolicyTrust",
    "PolicyBundleContent",
    "SignedPolicyBundle",
    "accept_policy_bundle",
    "countersign_policy_bundle",
    "sign_policy_bundle",
]
