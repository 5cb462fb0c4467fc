"""A team's signed policy as the rendezvous holds it: the bundle in force and who may sign the next.

The rendezvous keeps no separate trust table: its view of a team (``rendezvous_trust``) is
derived from the newest stored bundle — the admins of its signed roster may sign the next
version, which must chain to it — or, for a team that never signed one, from its current active
admins. ``enrollment_trust`` is what a newly registering agent pins (docs/sessions.md §6).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from protocol.identity import PublicIdentity, b64url
from protocol.policy import (
    PinnedPolicyTrust,
    PolicyBundleContent,
    PolicyBundleError,
    Roster,
    RosterEntry,
    SignedPolicyBundle,
)
from protocol.policy.roster import Role
from rendezvous.context import ServiceContext
from rendezvous.errors import ServiceUnavailable
from rendezvous.store import Operator, StoredPolicyBundle

MAX_CACHED_BUNDLES = 256


@dataclass(frozen=True)
class TeamPolicy:
    """The countersigned bundle in force for a team, parsed."""

    stored: StoredPolicyBundle
    bundle: SignedPolicyBundle

    @property
    def content(self) -> PolicyBundleContent:
        """What the admin signed: policy, roster and agent tags."""
        return self.bundle.content

    @property
    def version(self) -> int:
        """The bundle's (and the policy document's) version."""
        return self.stored.version


# Parsing a bundle re-validates its TOML; keep the parsed form per content hash.
_parsed: dict[str, SignedPolicyBundle] = {}


def parse_stored_bundle(stored: StoredPolicyBundle) -> SignedPolicyBundle:
    """The stored bundle parsed (cached by content hash); ServiceUnavailable if it is corrupt."""
    cached = _parsed.get(stored.content_sha256)
    if cached is not None:
        return cached
    try:
        bundle = SignedPolicyBundle.from_json(stored.bundle)
    except PolicyBundleError:
        raise ServiceUnavailable("the team's stored policy bundle is unreadable") from None
    if len(_parsed) >= MAX_CACHED_BUNDLES:
        _parsed.clear()
    _parsed[stored.content_sha256] = bundle
    return bundle


async def current_team_policy(ctx: ServiceContext, team_id: str) -> TeamPolicy | None:
    """The team's bundle in force, or None if the team never signed one."""
    stored = await ctx.store.latest_policy_bundle(team_id)
    if stored is None:
        return None
    return TeamPolicy(stored, parse_stored_bundle(stored))


async def chain_version(ctx: ServiceContext, team_id: str, current: TeamPolicy | None) -> int:
    """The version the team's next bundle follows: the one in force, else the last version of
    a chain ``team reset-policy`` retired (0 if none), since numbering goes on across a reset."""
    if current is not None:
        return current.version
    return await ctx.store.newest_policy_version(team_id)


def signing_admins(
    current: TeamPolicy, operators: Iterable[Operator], *, excluding: str | None = None
) -> list[Operator]:
    """The team's active admins (but ``excluding``, an operator id) whose key the signed roster
    names as admin: those who can sign the next bundle. None left: the team's policy is frozen
    until the server admin's ``team reset-policy`` and each agent's re-enrollment."""
    return roster_signers(current.content.roster, operators, excluding=excluding)


def roster_signers(
    roster: Roster, operators: Iterable[Operator], *, excluding: str | None = None
) -> list[Operator]:
    """The active admins among ``operators`` (but ``excluding``) whose key ``roster`` names as
    admin: who could sign the bundle after one carrying ``roster``."""
    roster_admins = roster.admin_keys()
    return [
        operator
        for operator in operators
        if operator.is_active()
        and operator.role == Role.ADMIN
        and operator.key_thumbprint in roster_admins
        and operator.id != excluding
    ]


async def active_admin_keys(ctx: ServiceContext, team_id: str) -> list[PublicIdentity]:
    """The public keys of the team's active operators with the admin role."""
    return [
        PublicIdentity(operator.public_key)
        for operator in await ctx.store.list_operators(team_id)
        if operator.is_active() and operator.role == Role.ADMIN
    ]


async def rendezvous_trust(
    ctx: ServiceContext, team_id: str, current: TeamPolicy | None
) -> PinnedPolicyTrust | None:
    """Who may sign the team's next bundle, as the rendezvous sees it (None: nobody can)."""
    policy_key = ctx.keys.policy_signer.public
    if current is not None:
        return PinnedPolicyTrust(
            team_id,
            current.content.roster.admin_keys(),
            policy_key,
            version=current.version,
            bundle_sha256=current.stored.content_sha256,
        )
    admins = await active_admin_keys(ctx, team_id)
    if not admins:
        return None
    return PinnedPolicyTrust.at_enrollment(team_id, admins, policy_key)


async def enrollment_trust(ctx: ServiceContext, team_id: str) -> dict[str, Any] | None:
    """The pins a registering agent takes, ``{"admin_keys": [b64url…], "policy_key"}``, or None.

    With a bundle in force: the admins of its roster plus the admin who signed it, so the new
    agent accepts the bundle it is sent next. Without one: the team's active admins.
    """
    current = await current_team_policy(ctx, team_id)
    keys: dict[str, PublicIdentity] = {}
    if current is None:
        keys = {key.key_id: key for key in await active_admin_keys(ctx, team_id)}
    else:
        keys = dict(current.content.roster.admin_keys())
        signer = await ctx.store.get_operator_by_thumbprint(current.bundle.admin_key_id)
        if signer is not None and signer.team_id == team_id:
            key = PublicIdentity(signer.public_key)
            keys[key.key_id] = key
    if not keys:
        return None
    return {
        "admin_keys": sorted(b64url(key.raw) for key in keys.values()),
        "policy_key": b64url(ctx.keys.policy_signer.public.raw),
    }


async def pending_roster(ctx: ServiceContext, team_id: str) -> list[dict[str, str]]:
    """The team's active operators as roster entries: what a new roster signature would hold."""
    entries = []
    for operator in await ctx.store.list_operators(team_id):
        if not operator.is_active():
            continue
        try:
            entry = RosterEntry(
                PublicIdentity(operator.public_key), operator.email, Role(operator.role)
            )
        except ValueError:
            continue  # an operator row a roster cannot hold (e.g. an odd email) is left out
        entries.append(entry.to_json())
    return entries


async def pending_agent_tags(ctx: ServiceContext, team_id: str) -> dict[str, list[str]]:
    """The tags admins assigned to the team's agents now: what a new signature would hold."""
    return {
        agent.id: sorted(set(agent.tags))
        for agent in await ctx.store.list_agents(team_id)
        if agent.tags
    }
