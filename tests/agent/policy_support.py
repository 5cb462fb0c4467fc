"""Test support for the agent's policy: team admins in a store, and signed policy bundles.

Bundles are made exactly as the admin CLI and the rendezvous make them
(sign_policy_bundle, then countersign_policy_bundle with the rendezvous policy key).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping

from protocol.identity import SigningIdentity
from protocol.policy import (
    PinnedPolicyTrust,
    PolicyBundleContent,
    Role,
    Roster,
    RosterEntry,
    SignedPolicyBundle,
    countersign_policy_bundle,
    sign_policy_bundle,
)
from rendezvous.credentials import hash_secret, new_invite_code
from rendezvous.store import Store


async def ensure_team_admin(store: Store, team_id: str) -> SigningIdentity:
    """Enroll an admin operator in ``team_id`` (agents pin the team's admins at enrollment)."""
    identity = SigningIdentity.generate()
    code = new_invite_code()
    now = time.time()
    await store.create_invite(
        team_id, f"admin-{identity.public.key_id[:8]}@example.test", "admin",
        hash_secret(code), now + 600, "test", now,
    )
    await store.enroll_operator(hash_secret(code), now, identity.public.raw, identity.public.key_id)
    return identity


def policy_text(version: int, body: str, mode: str = "allowlist") -> str:
    """A policy document of ``version`` with ``body`` (rules) appended."""
    return f'version = {version}\nmode = "{mode}"\n{body}'


def roster(members: Mapping[SigningIdentity, tuple[str, Role]]) -> Roster:
    """A roster of (email, role) by operator key."""
    return Roster.of(
        RosterEntry(identity.public, email, role) for identity, (email, role) in members.items()
    )


def make_bundle(
    *,
    team_id: str,
    version: int,
    body: str,
    members: Mapping[SigningIdentity, tuple[str, Role]],
    signer: SigningIdentity,
    policy_signer: SigningIdentity,
    agent_tags: Mapping[str, Iterable[str]] | None = None,
    previous: SignedPolicyBundle | None = None,
    mode: str = "allowlist",
    countersign_as: Iterable[SigningIdentity] | None = None,
) -> SignedPolicyBundle:
    """An admin-signed, rendezvous-countersigned bundle.

    The countersignature is given under a rendezvous view that trusts ``signer`` (or the keys in
    ``countersign_as``), so a test can also make bundles a compromised rendezvous would publish.
    """
    content = PolicyBundleContent(
        team_id=team_id,
        version=version,
        issued_at=int(time.time()),
        policy_text=policy_text(version, body, mode),
        roster=roster(members),
        agent_tags={agent: frozenset(tags) for agent, tags in (agent_tags or {}).items()},
        previous_sha256=None if previous is None else previous.content.sha256(),
    )
    signed = sign_policy_bundle(content, signer)
    trusted = list(countersign_as) if countersign_as is not None else [signer]
    view = PinnedPolicyTrust(
        team_id,
        {key.public.key_id: key.public for key in trusted},
        policy_signer.public,
        0 if previous is None else previous.content.version,
        None if previous is None else previous.content.sha256(),
    )
    return countersign_policy_bundle(signed, policy_signer, view).bundle
