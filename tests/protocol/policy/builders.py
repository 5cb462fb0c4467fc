"""Shared test material: a team's keys, roster and a policy bundle signed the normal way."""

from __future__ import annotations

from collections.abc import Iterable

from protocol.identity import SigningIdentity
from protocol.policy.roster import Role, Roster, RosterEntry
from protocol.policy.signed_policy import (
    PinnedPolicyTrust,
    PolicyBundleContent,
    SignedPolicyBundle,
    countersign_policy_bundle,
    sign_policy_bundle,
)

TEAM = "team_ops"
ISSUED_AT = 1_800_000_000


def _key(number: int) -> SigningIdentity:
    return SigningIdentity.from_seed(bytes([number]) * 32)


ADMIN = _key(1)
SECOND_ADMIN = _key(2)
OPERATOR = _key(3)
APPROVER = _key(4)
AUDITOR = _key(5)
NEWCOMER = _key(6)
RENDEZVOUS = _key(7)
STRANGER = _key(8)

BASE_ROSTER = Roster.of(
    [
        RosterEntry(ADMIN.public, "admin@example.com", Role.ADMIN),
        RosterEntry(OPERATOR.public, "oscar@example.com", Role.OPERATOR),
        RosterEntry(APPROVER.public, "amy@example.com", Role.APPROVER),
        RosterEntry(AUDITOR.public, "audrey@example.com", Role.AUDITOR),
    ]
)


def policy_text(version: int, mode: str = "allowlist") -> str:
    """A small valid policy document at ``version``."""
    return (
        f'version = {version}\nmode = "{mode}"\n'
        '[[rules]]\nid = "ops"\noutcome = "allow"\noperators = { roles = ["operator"] }\n'
    )


def content(
    version: int = 1,
    roster: Roster = BASE_ROSTER,
    previous: str | None = None,
    team: str = TEAM,
    mode: str = "allowlist",
    agent_tags: dict[str, frozenset[str]] | None = None,
) -> PolicyBundleContent:
    """Bundle content for ``version`` with the given roster."""
    return PolicyBundleContent(
        team_id=team,
        version=version,
        issued_at=ISSUED_AT + version,
        policy_text=policy_text(version, mode),
        roster=roster,
        agent_tags={"agt_1": frozenset({"prod", "db"})} if agent_tags is None else agent_tags,
        previous_sha256=previous,
    )


def enrollment_trust(admins: Iterable[SigningIdentity] = (ADMIN,)) -> PinnedPolicyTrust:
    """The pins an agent of TEAM takes at enrollment."""
    return PinnedPolicyTrust.at_enrollment(
        TEAM, [admin.public for admin in admins], RENDEZVOUS.public
    )


def published(
    bundle_content: PolicyBundleContent,
    admin: SigningIdentity = ADMIN,
    trust: PinnedPolicyTrust | None = None,
) -> SignedPolicyBundle:
    """Signed by ``admin`` and countersigned by the rendezvous, as the normal flow does."""
    signed = sign_policy_bundle(bundle_content, admin)
    return countersign_policy_bundle(signed, RENDEZVOUS, trust or enrollment_trust([admin])).bundle


def with_roster(roster: Roster, *extra: RosterEntry) -> Roster:
    """``roster`` with ``extra`` entries added."""
    return Roster.of([*roster.entries, *extra])
