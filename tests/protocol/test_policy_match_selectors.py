"""Policy selectors that could never match are refused: agent tags and ids outside the forms the
rendezvous issues (compared exactly), and allow rules for roles that can never open a session."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.domains import Purpose
from protocol.identifiers import MAX_TAG_LENGTH, TAG_CHARACTERS, new_id
from protocol.policy.decide import decide
from protocol.policy.document import parse_policy
from protocol.policy.errors import MalformedBundleError, PolicyDocumentError
from protocol.policy.request import AccessRequest, Action, RequestingOperator, TargetAgent
from protocol.policy.signed_policy import (
    PolicyBundleContent,
    SignedPolicyBundle,
    countersign_policy_bundle,
    sign_policy_bundle,
)
from rendezvous.agent_tags import normalised_tags
from rendezvous.errors import BadRequest
from tests.protocol.policy.builders import ADMIN, RENDEZVOUS, content, enrollment_trust

NOW = datetime(2027, 6, 2, 12, 0, tzinfo=UTC)
FRANK = RequestingOperator("frank@example.com", "operator", "thumb-frank")
WEB_ID = new_id("agt")
WEB = TargetAgent(WEB_ID, "a-web-1", frozenset({"web"}))


def _document(rule: str, mode: str = "blocklist") -> str:
    return f'version = 1\nmode = "{mode}"\n[[rules]]\nid = "r"\n{rule}\n'


def _deny_operators_on(agents: str) -> str:
    return _document(f'outcome = "deny"\noperators = {{ roles = ["operator"] }}\nagents = {agents}')


def test_an_upper_case_tag_is_refused_naming_the_tag_and_the_lower_case_form() -> None:
    # The auditor's case: in blocklist mode this rule never matched, and frank ran as root.
    with pytest.raises(PolicyDocumentError) as refused:
        parse_policy(_deny_operators_on('{ tags = ["Web"] }'))
    message = str(refused.value)
    assert "line 7" in message and "rules[0].agents.tags[0]" in message
    assert "'Web' can never match" in message and "write 'web'" in message
    assert "a-z 0-9 - _ . : =" in message


def test_the_lower_case_tag_denies_as_the_admin_meant() -> None:
    policy = parse_policy(_deny_operators_on('{ tags = ["web"] }'))
    assert decide(policy, AccessRequest(FRANK, WEB, Action.EXEC, ("id",)), NOW).result == "deny"


@pytest.mark.parametrize("tag", ["wéb", "web server", "", " web", "x" * (MAX_TAG_LENGTH + 1)])
def test_a_tag_no_agent_can_carry_is_refused(tag: str) -> None:
    with pytest.raises(PolicyDocumentError, match=r"tags\[0\]"):
        parse_policy(_deny_operators_on(f'{{ tags = ["{tag}"] }}'))


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=sorted(TAG_CHARACTERS) + list("ABZé _/"), max_size=MAX_TAG_LENGTH + 2))
def test_a_policy_accepts_exactly_the_tags_the_rendezvous_stores(tag: str) -> None:
    try:
        stored = normalised_tags([tag]) == [tag]
    except BadRequest:
        stored = False
    try:
        parse_policy(_deny_operators_on(f'{{ tags = ["{tag}"] }}'))
        accepted = True
    except PolicyDocumentError:
        accepted = False
    assert accepted == stored


@pytest.mark.parametrize(
    ("agent_id", "hint"),
    [
        (WEB_ID.upper(), "ids are lower-case"),
        (WEB_ID[:-1], "is not an agent id"),
        ("op_" + WEB_ID[4:], "is not an agent id"),
        ("a-web-1", "is not an agent id"),
        (WEB_ID.replace("agt_", "agt-"), "is not an agent id"),
    ],
)
def test_an_agent_id_the_store_could_never_issue_is_refused(agent_id: str, hint: str) -> None:
    with pytest.raises(PolicyDocumentError) as refused:
        parse_policy(_deny_operators_on(f'{{ ids = ["{agent_id}"] }}'))
    assert "rules[0].agents.ids[0]" in str(refused.value) and hint in str(refused.value)
    assert "agt_ and 16 characters of a-z 2-7" in str(refused.value)


@settings(max_examples=50, deadline=None)
@given(st.integers())
def test_every_id_the_store_issues_is_accepted_and_matches(_: int) -> None:
    agent_id = new_id("agt")
    policy = parse_policy(_deny_operators_on(f'{{ ids = ["{agent_id}"] }}'))
    agent = TargetAgent(agent_id, "h", frozenset())
    assert decide(policy, AccessRequest(FRANK, agent, Action.SHELL), NOW).result == "deny"


@pytest.mark.parametrize("outcome", ["allow", "approval_required"])
@pytest.mark.parametrize("role", ["approver", "auditor"])
def test_a_rule_letting_in_a_role_that_cannot_open_sessions_is_refused(
    outcome: str, role: str
) -> None:
    rule = f'outcome = "{outcome}"\noperators = {{ roles = ["admin", "{role}"] }}'
    with pytest.raises(PolicyDocumentError) as refused:
        parse_policy(_document(rule, mode="allowlist"))
    message = str(refused.value)
    assert "rules[0].operators.roles[1]" in message
    assert f"role {role!r} can never open a session (only admin, operator can)" in message


def test_a_deny_rule_may_name_any_role() -> None:
    parse_policy(_document('outcome = "deny"\noperators = { roles = ["approver", "auditor"] }'))


def _old_content() -> PolicyBundleContent:
    """Content whose policy was signed before these checks: an upper-case tag in a deny rule."""
    return replace(content(), policy_text=_deny_operators_on('{ tags = ["Web"] }'))


def test_a_bundle_signed_before_the_checks_still_reads_but_cannot_be_signed_again() -> None:
    # A team's policy in force must stay readable after the upgrade (no lock-out of `policy
    # set`), and its rule still never matches, as when it was signed ...
    old = _old_content()
    assert decide(old.policy, AccessRequest(FRANK, WEB, Action.SHELL), NOW).result == "allow"
    # ... but no new signature or countersignature goes on such a document.
    with pytest.raises(MalformedBundleError, match="can never match"):
        sign_policy_bundle(old, ADMIN)
    signed_earlier = SignedPolicyBundle(
        old, ADMIN.public.key_id, ADMIN.sign(Purpose.POLICY, old.canonical_bytes())
    )
    with pytest.raises(MalformedBundleError, match="can never match"):
        countersign_policy_bundle(signed_earlier, RENDEZVOUS, enrollment_trust())
