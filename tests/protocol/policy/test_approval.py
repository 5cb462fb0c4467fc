"""Approvals: accepted only for the exact request, by an approver in the roster, in time."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.domains import Purpose
from protocol.identity import SigningIdentity
from protocol.policy.approval import (
    DEFAULT_APPROVAL_LIFETIME_SECONDS,
    DEFAULT_CLOCK_SKEW_SECONDS,
    MAX_APPROVAL_LIFETIME_SECONDS,
    ApprovalContext,
    ApprovalStatement,
    SignedApproval,
    approve_request,
    command_sha256,
    verify_approval,
)
from protocol.policy.errors import (
    ApprovalError,
    ApprovalExpiredError,
    ApprovalMismatchError,
    ApproverNotAuthorizedError,
    SelfApprovalError,
)
from protocol.policy.request import Action
from protocol.policy.roster import Role, RosterEntry

from .builders import ADMIN, APPROVER, AUDITOR, BASE_ROSTER, OPERATOR, STRANGER, with_roster

NOW = 1_800_000_000
CONTEXT = ApprovalContext(
    request_id="req_42",
    team_id="team_ops",
    agent_id="agt_db1",
    action=Action.EXEC,
    command=("systemctl", "restart", "postgresql"),
    requester_thumbprint=OPERATOR.public.key_id,
    policy_version=7,
)


def _approval(approver: SigningIdentity = APPROVER, context: ApprovalContext = CONTEXT,
              now: float = NOW) -> SignedApproval:
    return approve_request(approver, context, now=now)


def _sign_statement(signer: SigningIdentity, statement: ApprovalStatement,
                    purpose: Purpose = Purpose.APPROVAL) -> SignedApproval:
    """Sign any statement by hand, skipping approve_request's own checks."""
    return SignedApproval(statement, signer.sign(purpose, statement.canonical_bytes()))


def test_an_approval_of_the_exact_request_by_an_approver_is_accepted() -> None:
    statement = verify_approval(_approval(), CONTEXT, BASE_ROSTER, NOW + 30)
    assert statement.approver_thumbprint == APPROVER.public.key_id
    assert statement.command_sha256 == command_sha256(CONTEXT.command)
    assert statement.expires_at == NOW + DEFAULT_APPROVAL_LIFETIME_SECONDS


def test_an_admin_may_approve_someone_elses_request() -> None:
    verify_approval(_approval(ADMIN), CONTEXT, BASE_ROSTER, NOW)


def test_an_approval_survives_its_json_bytes_and_text_forms() -> None:
    approval = _approval()
    encoded = json.dumps(approval.to_json())
    for form in (encoded, encoded.encode(), json.loads(encoded)):
        verify_approval(form, CONTEXT, BASE_ROSTER, NOW)


def test_a_shell_request_can_be_approved() -> None:
    shell = replace(CONTEXT, action=Action.SHELL, command=None)
    verify_approval(_approval(context=shell), shell, BASE_ROSTER, NOW)


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ({"command": ("systemctl", "stop", "postgresql")}, "command"),
        ({"command": ("systemctl", "restart", "postgresql", "&&", "rm", "-rf", "/")}, "command"),
        ({"command": ("systemctl", "restart  postgresql")}, "command"),
        ({"agent_id": "agt_web1"}, "agent"),
        ({"action": Action.SHELL, "command": None}, "action"),
        ({"policy_version": 8}, "policy version"),
        ({"request_id": "req_43"}, "request"),
        ({"team_id": "team_other"}, "team"),
        ({"requester_thumbprint": ADMIN.public.key_id}, "requester"),
        ({"requester_thumbprint": "clé-\ud800"}, "requester"),
        ({"agent_id": "agént"}, "agent"),
    ],
)
def test_an_approval_replayed_onto_anything_else_is_refused(
    change: dict[str, Any], what: str
) -> None:
    with pytest.raises(ApprovalMismatchError, match=f"another {what}$"):
        verify_approval(_approval(), replace(CONTEXT, **change), BASE_ROSTER, NOW)


def test_nobody_may_approve_their_own_request() -> None:
    own = replace(CONTEXT, requester_thumbprint=ADMIN.public.key_id)
    with pytest.raises(SelfApprovalError):
        approve_request(ADMIN, own, now=NOW)
    with pytest.raises(SelfApprovalError):
        # Signed by hand, as a CLI without the check above would.
        statement = ApprovalStatement(
            **{**_statement_fields(own), "approver_thumbprint": ADMIN.public.key_id}
        )
        verify_approval(_sign_statement(ADMIN, statement), own, BASE_ROSTER, NOW)


def test_a_second_key_of_the_requester_cannot_approve_either() -> None:
    second_key = STRANGER
    roster = with_roster(BASE_ROSTER, RosterEntry(second_key.public, "oscar@example.com",
                                                  Role.APPROVER))
    with pytest.raises(SelfApprovalError):
        verify_approval(_approval(second_key), CONTEXT, roster, NOW)


@pytest.mark.parametrize("approver", [OPERATOR, AUDITOR], ids=["operator", "auditor"])
def test_a_key_whose_role_may_not_approve_is_refused(approver: SigningIdentity) -> None:
    context = replace(CONTEXT, requester_thumbprint=ADMIN.public.key_id)
    with pytest.raises(ApproverNotAuthorizedError, match="may not approve"):
        verify_approval(_approval(approver, context), context, BASE_ROSTER, NOW)


def test_a_key_not_in_the_roster_is_refused() -> None:
    with pytest.raises(ApproverNotAuthorizedError, match="not in the team roster"):
        verify_approval(_approval(STRANGER), CONTEXT, BASE_ROSTER, NOW)


def test_an_expired_approval_is_refused() -> None:
    approval = _approval()
    expires = approval.statement.expires_at
    verify_approval(approval, CONTEXT, BASE_ROSTER, expires + DEFAULT_CLOCK_SKEW_SECONDS - 1)
    with pytest.raises(ApprovalExpiredError, match="expired"):
        verify_approval(approval, CONTEXT, BASE_ROSTER, expires + DEFAULT_CLOCK_SKEW_SECONDS)


def test_an_approval_from_the_future_is_refused() -> None:
    approval = _approval(now=NOW + DEFAULT_CLOCK_SKEW_SECONDS + 1)
    with pytest.raises(ApprovalExpiredError, match="not valid yet"):
        verify_approval(approval, CONTEXT, BASE_ROSTER, NOW)


def test_an_approval_cannot_outlive_the_maximum_lifetime() -> None:
    with pytest.raises(ApprovalError, match="lasts between"):
        approve_request(
            APPROVER, CONTEXT, now=NOW, lifetime_seconds=MAX_APPROVAL_LIFETIME_SECONDS + 1
        )


def test_an_approval_whose_statement_was_edited_is_refused() -> None:
    approval = _approval()
    longer = replace(approval.statement, expires_at=approval.statement.expires_at + 600)
    with pytest.raises(ApprovalError, match="does not verify"):
        verify_approval(SignedApproval(longer, approval.signature), CONTEXT, BASE_ROSTER, NOW)


def test_a_signature_made_for_another_purpose_is_refused() -> None:
    statement = _approval().statement
    with pytest.raises(ApprovalError, match="does not verify"):
        verify_approval(_sign_statement(APPROVER, statement, Purpose.POLICY), CONTEXT,
                        BASE_ROSTER, NOW)


def test_the_command_hash_is_over_the_exact_argv() -> None:
    assert command_sha256(["a", "b"]) != command_sha256(["a b"])
    assert command_sha256(["a", "b"]) != command_sha256(["a", "b", ""])
    assert command_sha256([]) != command_sha256(None)
    assert command_sha256(("ls",)) == command_sha256(["ls"])


@pytest.mark.parametrize(
    "data",
    [
        b"{",
        b"[]",
        b"{}",
        b"x" * 5000,
        {"statement": {}, "signature": "AAAA"},
        {"statement": {"format": "tucdesk-approval-v1"}, "signature": "AAAA"},
        lambda: {**_approval().to_json(), "signature": 5},
        lambda: {**_approval().to_json(), "signature": "!!"},
        lambda: {"statement": {**_approval().to_json()["statement"], "format": "v0"},
                 "signature": _approval().to_json()["signature"]},
        lambda: {"statement": {**_approval().to_json()["statement"], "policy_version": "7"},
                 "signature": _approval().to_json()["signature"]},
        lambda: {"statement": {**_approval().to_json()["statement"], "issued_at": 1.5},
                 "signature": _approval().to_json()["signature"]},
        lambda: {"statement": {**_approval().to_json()["statement"], "agent_id": ""},
                 "signature": _approval().to_json()["signature"]},
    ],
)
def test_a_malformed_approval_is_refused(data: object) -> None:
    with pytest.raises(ApprovalError):
        verify_approval(data() if callable(data) else data, CONTEXT, BASE_ROSTER, NOW)


FIELD_CHANGES = st.one_of(
    st.builds(lambda v: {"request_id": v}, st.text(min_size=1, max_size=20)),
    st.builds(lambda v: {"agent_id": v}, st.text(min_size=1, max_size=20)),
    st.builds(lambda v: {"team_id": v}, st.text(min_size=1, max_size=20)),
    st.builds(lambda v: {"command": tuple(v)}, st.lists(st.text(max_size=10), max_size=5)),
    st.builds(lambda v: {"policy_version": v}, st.integers(min_value=0, max_value=2**40)),
    st.just({"action": Action.SHELL, "command": None}),
)


@settings(max_examples=150, deadline=None)
@given(FIELD_CHANGES)
def test_an_approval_is_good_for_its_own_request_only(change: dict[str, Any]) -> None:
    other = replace(CONTEXT, **change)
    approval = _approval()
    if other == CONTEXT:
        verify_approval(approval, other, BASE_ROSTER, NOW)
    else:
        with pytest.raises(ApprovalMismatchError):
            verify_approval(approval, other, BASE_ROSTER, NOW)


def _statement_fields(context: ApprovalContext) -> dict[str, Any]:
    return {
        "request_id": context.request_id,
        "team_id": context.team_id,
        "agent_id": context.agent_id,
        "action": context.action.value,
        "command_sha256": command_sha256(context.command),
        "policy_version": context.policy_version,
        "requester_thumbprint": context.requester_thumbprint,
        "approver_thumbprint": APPROVER.public.key_id,
        "issued_at": NOW,
        "expires_at": NOW + 60,
    }
