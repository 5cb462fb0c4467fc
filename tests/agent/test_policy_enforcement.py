"""The agent rules on every session grant with its own signed policy and roster (§6).

Grants here are real, validly signed grants (as a rendezvous — honest or compromised — mints
them); the agent must still refuse whatever its cached, admin-signed policy does not allow.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.grant_policy import GrantPolicy, GrantPolicyRefused
from agent.policy_cache import PolicyCache
from protocol.identity import SigningIdentity
from protocol.policy import (
    Action,
    ApprovalContext,
    Outcome,
    PinnedPolicyTrust,
    Role,
    SignedPolicyBundle,
    approve_request,
    decide,
)
from protocol.session_grant import SessionGrant, issue_session_grant, verify_session_grant
from tests.agent.policy_support import make_bundle

TEAM_ID = "tm_policy"
AGENT_ID = "agt_web1"
AGENT_NAME = "web-1"
ISSUER = "tucdesk-rendezvous"
GRANT_SIGNER = SigningIdentity.generate()
POLICY_SIGNER = SigningIdentity.generate()
ADMIN = SigningIdentity.generate()
ALICE = SigningIdentity.generate()  # operator
BOB = SigningIdentity.generate()  # approver
ALICE_APPROVER_KEY = SigningIdentity.generate()  # Alice's second key, with the approver role
DAVE = SigningIdentity.generate()  # operator role: may not approve
OUTSIDER = SigningIdentity.generate()  # a key the rendezvous knows but no admin signed
MEMBERS = {
    ADMIN: ("admin@example.test", Role.ADMIN),
    ALICE: ("alice@example.test", Role.OPERATOR),
    BOB: ("bob@example.test", Role.APPROVER),
    ALICE_APPROVER_KEY: ("alice@example.test", Role.APPROVER),
    DAVE: ("dave@example.test", Role.OPERATOR),
}
# Wednesday 2026-11-25 10:00 UTC, inside business hours in Berlin (11:00 CET).
WEEKDAY_MORNING = datetime(2026, 11, 25, 10, 0, tzinfo=UTC).timestamp()

POLICY_BODY = """
high_risk = ["*rm -rf*"]

[[rules]]
id = "ops-prod"
outcome = "allow"
operators = { roles = ["operator", "admin"] }
agents = { tags = ["prod"] }

[[rules]]
id = "no-dave-shell"
outcome = "deny"
operators = { emails = ["dave@example.test"] }
actions = ["shell"]

[[rules]]
id = "restarts"
outcome = "approval_required"
commands = ["systemctl restart *"]
"""


def pins() -> PinnedPolicyTrust:
    return PinnedPolicyTrust.at_enrollment(TEAM_ID, [ADMIN.public], POLICY_SIGNER.public)


def bundle(
    body: str = POLICY_BODY,
    *,
    version: int = 1,
    tags: Sequence[str] = ("prod",),
    **options: Any,
) -> SignedPolicyBundle:
    return make_bundle(
        team_id=TEAM_ID, version=version, body=body, members=MEMBERS, signer=ADMIN,
        policy_signer=POLICY_SIGNER, agent_tags={AGENT_ID: tags}, **options,
    )


def enforcer(tmp_path: Path, *bundles: SignedPolicyBundle) -> GrantPolicy:
    cache = PolicyCache(pins(), None, tmp_path / "policy.json", lambda trust: None)
    for signed in bundles:
        cache.apply(signed.to_json())
    return GrantPolicy(cache, AGENT_ID, TEAM_ID, AGENT_NAME)


def grant(
    operator: SigningIdentity,
    command: Sequence[str] | None = ("uptime",),
    *,
    session_id: str = "ses_1",
    role: str = "admin",
    policy_version: int | None = 1,
    approval: dict[str, Any] | None = None,
    now: float | None = None,
) -> SessionGrant:
    """A genuine grant, signed by the rendezvous key the agent pinned, whatever it claims."""
    now = time.time() if now is None else now
    token = issue_session_grant(
        GRANT_SIGNER, issuer=ISSUER, session_id=session_id, team_id=TEAM_ID, agent_id=AGENT_ID,
        operator_id="op_x", operator_email="claimed@example.test", role=role,
        operator_key_thumbprint=operator.public.key_id,
        mode="shell" if command is None else "exec",
        command=None if command is None else list(command),
        policy_result="allow", policy_rule_id=None, policy_version=policy_version,
        approval=approval, now=now,
    )
    return verify_session_grant(
        token, {GRANT_SIGNER.public.key_id: GRANT_SIGNER.public}, issuer=ISSUER,
        agent_id=AGENT_ID, team_id=TEAM_ID, session_id=session_id,
        operator_key_thumbprint=operator.public.key_id, now=now,
    )


def approval_for(
    approver: SigningIdentity,
    requester: SigningIdentity,
    command: Sequence[str] | None,
    *,
    request_id: str = "apr_1",
    agent_id: str = AGENT_ID,
    policy_version: int = 1,
) -> dict[str, Any]:
    context = ApprovalContext(
        request_id=request_id, team_id=TEAM_ID, agent_id=agent_id,
        action=Action.SHELL if command is None else Action.EXEC,
        command=None if command is None else tuple(command),
        requester_thumbprint=requester.public.key_id, policy_version=policy_version,
    )
    return approve_request(approver, context, now=time.time()).to_json()


def refusal(policy: GrantPolicy, session_grant: SessionGrant, operator: SigningIdentity) -> str:
    with pytest.raises(GrantPolicyRefused) as refused:
        policy.check(session_grant, operator.public.key_id, time.time())
    return refused.value.reason


# ---- without a signed policy -------------------------------------------------------------


def test_without_a_signed_policy_only_pinned_admins_may_open_sessions(tmp_path: Path) -> None:
    policy = enforcer(tmp_path)
    decision = policy.check(grant(ADMIN, policy_version=None), ADMIN.public.key_id, time.time())
    assert decision.result is Outcome.ALLOW and decision.policy_version == 0
    reason = refusal(policy, grant(ALICE, role="operator", policy_version=None), ALICE)
    assert "only the 1 admin key this agent pinned at enrollment may open sessions" in reason
    assert "invited" not in reason


def test_an_admin_invited_after_enrollment_is_told_why_and_what_to_do(tmp_path: Path) -> None:
    # The caller is an admin, only not one this agent knew: saying "only its admins" was false.
    policy = enforcer(tmp_path)
    reason = refusal(policy, grant(ALICE, role="admin", policy_version=None), ALICE)
    assert reason == (
        "refused by the agent: the team has not signed a policy yet, so only the 1 admin key "
        "this agent pinned at enrollment may open sessions, and yours is not one of them (an "
        "admin invited, or given a new key, after the agent enrolled is not); ask one of the "
        "admins this agent knew at enrollment to run `tucdesk policy set FILE` (it takes a "
        "first policy signed by none other): the first policy also signs the current roster, "
        "from which this agent learns the current admins"
    )


def test_agent_enrolled_before_policies_refuses_every_session_and_says_to_re_enroll(
    tmp_path: Path,
) -> None:
    cache = PolicyCache.load(tmp_path / "policy.json", None, lambda trust: None)
    policy = GrantPolicy(cache, AGENT_ID, TEAM_ID, AGENT_NAME)
    assert "re-enroll" in refusal(policy, grant(ADMIN, policy_version=None), ADMIN)


# ---- a compromised rendezvous ------------------------------------------------------------


def test_operator_key_the_rendezvous_added_without_an_admin_signature_is_refused(
    tmp_path: Path,
) -> None:
    policy = enforcer(tmp_path, bundle())
    # The grant is genuine and claims the admin role; the signed roster does not know the key.
    reason = refusal(policy, grant(OUTSIDER, role="admin"), OUTSIDER)
    assert "not in the team roster signed by an admin" in reason
    assert "tucdesk roster sign" in reason


def test_grant_the_cached_policy_denies_is_refused_although_its_signature_is_valid(
    tmp_path: Path,
) -> None:
    policy = enforcer(tmp_path, bundle())
    reason = refusal(policy, grant(DAVE, None), DAVE)
    assert "denied by policy version 1 (rule no-dave-shell)" in reason


def test_agent_tags_come_from_the_signed_bundle_not_from_the_rendezvous(tmp_path: Path) -> None:
    policy = enforcer(tmp_path, bundle(tags=("staging",)))
    reason = refusal(policy, grant(ALICE), ALICE)
    assert "denied by policy version 1 (the policy's mode)" in reason


def test_role_and_email_come_from_the_signed_roster_not_the_grant(tmp_path: Path) -> None:
    policy = enforcer(tmp_path, bundle())
    # The grant says "admin"; Dave's signed role is operator, and his shell deny still applies.
    assert "no-dave-shell" in refusal(policy, grant(DAVE, None, role="admin"), DAVE)


def test_allowed_grant_reports_the_rule_and_version(tmp_path: Path) -> None:
    policy = enforcer(tmp_path, bundle())
    decision = policy.check(grant(ALICE), ALICE.public.key_id, time.time())
    assert (decision.result, decision.rule_id, decision.policy_version) == (
        Outcome.ALLOW, "ops-prod", 1,
    )


def test_grant_decided_under_a_newer_policy_than_the_agent_holds_is_refused_as_out_of_date(
    tmp_path: Path,
) -> None:
    policy = enforcer(tmp_path, bundle())
    reason = refusal(policy, grant(ALICE, policy_version=2), ALICE)
    assert "policy out of date" in reason and "holds version 1" in reason


def test_time_windows_are_judged_on_the_agent_too(tmp_path: Path) -> None:
    body = """
[[rules]]
id = "berlin-office-hours"
outcome = "allow"
[rules.when]
days = ["mon", "tue", "wed", "thu", "fri"]
hours = "09:00-17:00"
timezone = "Europe/Berlin"
"""
    policy = enforcer(tmp_path, bundle(body))
    morning = WEEKDAY_MORNING
    evening = datetime(2026, 11, 25, 16, 0, tzinfo=UTC).timestamp()  # 17:00 in Berlin
    decision = policy.check(grant(ALICE, now=morning), ALICE.public.key_id, morning)
    assert decision.rule_id == "berlin-office-hours"
    with pytest.raises(GrantPolicyRefused, match="the policy's mode"):
        policy.check(grant(ALICE, now=evening), ALICE.public.key_id, evening)


# ---- approvals ---------------------------------------------------------------------------


def test_approval_required_without_an_approval_is_refused_with_the_rule(tmp_path: Path) -> None:
    policy = enforcer(tmp_path, bundle())
    reason = refusal(policy, grant(ALICE, ["systemctl", "restart", "nginx"]), ALICE)
    assert "requires approval (rule restarts)" in reason and "carries no approval" in reason


def test_high_risk_command_needs_an_approval_and_runs_with_one(tmp_path: Path) -> None:
    policy = enforcer(tmp_path, bundle())
    command = ["rm", "-rf", "/tmp/scratch"]
    assert "rule high_risk" in refusal(policy, grant(ALICE, command), ALICE)
    approved = grant(ALICE, command, approval=approval_for(BOB, ALICE, command))
    decision = policy.check(approved, ALICE.public.key_id, time.time())
    assert decision.result is Outcome.APPROVAL_REQUIRED
    assert decision.approval_request_id == "apr_1"


def test_approval_replayed_onto_another_command_is_refused(tmp_path: Path) -> None:
    policy = enforcer(tmp_path, bundle())
    approved_for = ["systemctl", "restart", "nginx"]
    replayed = grant(
        ALICE, ["systemctl", "restart", "postgresql"],
        approval=approval_for(BOB, ALICE, approved_for),
    )
    assert "approval is for another command" in refusal(policy, replayed, ALICE)


def test_approval_for_another_host_is_refused(tmp_path: Path) -> None:
    policy = enforcer(tmp_path, bundle())
    command = ["systemctl", "restart", "nginx"]
    elsewhere = grant(ALICE, command, approval=approval_for(BOB, ALICE, command, agent_id="agt_2"))
    assert "approval is for another agent" in refusal(policy, elsewhere, ALICE)


def test_approval_is_used_for_one_session_only(tmp_path: Path) -> None:
    policy = enforcer(tmp_path, bundle())
    command = ["systemctl", "restart", "nginx"]
    approval = approval_for(BOB, ALICE, command)
    policy.check(grant(ALICE, command, approval=approval), ALICE.public.key_id, time.time())
    again = grant(ALICE, command, session_id="ses_2", approval=approval)
    assert "already used for another session" in refusal(policy, again, ALICE)


def test_self_approval_with_a_second_key_of_the_same_person_is_refused(tmp_path: Path) -> None:
    policy = enforcer(tmp_path, bundle())
    command = ["systemctl", "restart", "nginx"]
    own = grant(ALICE, command, approval=approval_for(ALICE_APPROVER_KEY, ALICE, command))
    assert "own request" in refusal(policy, own, ALICE)


def test_approval_by_a_role_that_may_not_approve_is_refused(tmp_path: Path) -> None:
    policy = enforcer(tmp_path, bundle())
    command = ["systemctl", "restart", "nginx"]
    by_operator = grant(ALICE, command, approval=approval_for(DAVE, ALICE, command))
    assert "operator role may not approve" in refusal(policy, by_operator, ALICE)


def test_approval_by_a_key_outside_the_signed_roster_is_refused(tmp_path: Path) -> None:
    policy = enforcer(tmp_path, bundle())
    command = ["systemctl", "restart", "nginx"]
    forged = grant(ALICE, command, approval=approval_for(OUTSIDER, ALICE, command))
    assert "not in the team roster" in refusal(policy, forged, ALICE)


def test_approval_under_another_policy_version_is_refused(tmp_path: Path) -> None:
    first = bundle()
    policy = enforcer(tmp_path, first, bundle(version=2, previous=first))
    command = ["systemctl", "restart", "nginx"]
    stale = grant(
        ALICE, command, policy_version=2,
        approval=approval_for(BOB, ALICE, command, policy_version=1),
    )
    assert "another policy version" in refusal(policy, stale, ALICE)


# ---- the agent's decision is decide() on the signed roster and tags ------------------------


@settings(max_examples=40, deadline=None)
@given(
    operator=st.sampled_from([ADMIN, ALICE, BOB, DAVE, OUTSIDER]),
    command=st.one_of(
        st.none(),
        st.lists(
            st.sampled_from(["rm", "-rf", "/", "systemctl", "restart", "nginx", "uptime"]),
            min_size=1, max_size=4,
        ),
    ),
    tags=st.sampled_from([("prod",), ("staging",), ()]),
    claimed_role=st.sampled_from(["admin", "operator", "auditor"]),
)
def test_agent_allows_exactly_what_decide_allows_for_the_signed_roster_member(
    tmp_path_factory: pytest.TempPathFactory,
    operator: SigningIdentity,
    command: list[str] | None,
    tags: tuple[str, ...],
    claimed_role: str,
) -> None:
    signed = bundle(tags=tags)
    policy = enforcer(tmp_path_factory.mktemp("policy"), signed)
    session_grant = grant(operator, command, role=claimed_role)
    now = time.time()
    accepted = policy.cache.accepted
    assert accepted is not None
    may_open = accepted.roster.may_open_sessions(operator.public.key_id)
    expected = None
    if may_open:
        request = accepted.access_request(
            operator.public.key_id, AGENT_ID, AGENT_NAME,
            Action.SHELL if command is None else Action.EXEC,
            None if command is None else tuple(command),
        )
        expected = decide(accepted.policy, request, now).result
    try:
        decision = policy.check(session_grant, operator.public.key_id, now)
    except GrantPolicyRefused:
        assert expected is not Outcome.ALLOW
    else:
        assert expected is Outcome.ALLOW and decision.result is Outcome.ALLOW
