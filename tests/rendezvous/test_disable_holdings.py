"""Disabling an operator takes away everything it holds (SQLite and PostgreSQL).

Its API keys, the unused registration keys it or those keys made, its pending approval requests
and the approvals it granted stop working; a key made while the disable committed is refused at
use. Every test drives a real rendezvous over HTTP, with a real store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from protocol.identity import SigningIdentity
from rendezvous.audit_trail import Action
from rendezvous.credentials import hash_secret, new_api_key, new_registration_key
from rendezvous.store import Store
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness, harness
from tests.rendezvous.test_approvals import (
    RESTART,
    _approve,
    _ask,
    _park,
    _view,
    team_with_policy,
)

pytestmark = pytest.mark.anyio

SIEM_SCOPES = ["sessions:read", "registration_keys:write", "audit:read"]


async def _with_api_key(
    service: ServiceHarness, key: str, method: str, target: str, body: Any = None
) -> httpx.Response:
    return await service.http.request(
        method, target, json=body, headers={"Authorization": f"Bearer {key}"}
    )


async def _disable(
    service: ServiceHarness, admin: OperatorSession, operator_id: str
) -> dict[str, Any]:
    response = await service.call(admin, "POST", f"/v1/operators/{operator_id}/disable")
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def _enrolls(service: ServiceHarness, key: str) -> httpx.Response:
    return await service.register(SigningIdentity.generate(), key, hostname="new-host")


async def test_disabling_an_admin_revokes_its_api_keys_and_unused_registration_keys(
    store: Store, tmp_path: Path
) -> None:
    async with harness(store, tmp_path / "data") as service:
        team = await service.team("alpha")
        alice = await service.operator(team, "admin")
        hank = await service.operator(team, "admin")
        created = await service.call(
            hank, "POST", "/v1/api-keys", {"name": "siem", "scopes": SIEM_SCOPES}
        )
        assert created.status_code == 201, created.text
        siem = created.json()
        by_hank = await service.registration_key(hank)
        by_siem = await _with_api_key(
            service, siem["key"], "POST", "/v1/registration-keys", {"tags": []}
        )
        assert by_siem.status_code == 201, by_siem.text
        by_alice = await service.registration_key(alice)
        spent = await service.registration_key(hank)
        assert (await _enrolls(service, spent["key"])).status_code == 200

        answer = await _disable(service, alice, hank.operator_id)

        assert answer["revoked_api_keys"] == [siem["id"]]
        assert sorted(answer["revoked_registration_keys"]) == sorted(
            [by_hank["id"], by_siem.json()["id"]]
        )
        attempts: list[tuple[str, str, dict[str, Any] | None]] = [
            ("GET", "/v1/sessions", None),
            ("GET", "/v1/audit/export", None),
            ("POST", "/v1/registration-keys", {"tags": []}),
        ]
        for method, target, body in attempts:
            refused = await _with_api_key(service, siem["key"], method, target, body)
            assert refused.status_code == 401, (target, refused.text)
        for key in (by_hank["key"], by_siem.json()["key"]):
            refused = await _enrolls(service, key)
            assert refused.status_code != 200 and "revoked" in refused.json()["message"]
        assert (await _enrolls(service, by_alice["key"])).status_code == 200
        # One record states what the disable took away; none is written per key.
        [revoked] = await service.audit_events(team, Action.OPERATOR_REVOKED)
        assert revoked["context"]["api_keys"] == [siem["id"]]
        assert sorted(revoked["context"]["registration_keys"]) == sorted(
            [by_hank["id"], by_siem.json()["id"]]
        )
        assert not [
            event for event in await service.audit_events(team)
            if event["action"] in ("api_key.revoked", "registration_key.revoked")
        ]  # fmt: skip
        listed = (await service.call(alice, "GET", "/v1/api-keys")).json()
        assert [(key["created_by"], key["revoked_at"] is not None) for key in listed] == [
            (hank.operator_id, True)
        ]


async def test_keys_made_while_their_creator_was_being_disabled_are_refused_at_use(
    store: Store, tmp_path: Path
) -> None:
    """A key its creator made just as the disable committed (authenticated before it, stored
    after it) escapes the disable's revocation; it is refused when used all the same."""
    async with harness(store, tmp_path / "data") as service:
        team = await service.team("alpha")
        alice = await service.operator(team, "admin")
        hank = await service.operator(team, "admin")
        made_before = await service.call(
            hank, "POST", "/v1/api-keys", {"name": "siem", "scopes": SIEM_SCOPES}
        )
        assert made_before.status_code == 201, made_before.text
        await _disable(service, alice, hank.operator_id)
        now = service.clock.now
        late_api_key = new_api_key()
        await store.create_api_key(
            team, "late", SIEM_SCOPES, hash_secret(late_api_key), hank.operator_id, now
        )
        late_by_hank, late_by_api_key = new_registration_key(), new_registration_key()
        await store.create_registration_key(
            team, hash_secret(late_by_hank), [], now + 600, hank.operator_id, now
        )
        await store.create_registration_key(
            team, hash_secret(late_by_api_key), [], now + 600, made_before.json()["id"], now
        )

        refused = await _with_api_key(service, late_api_key, "GET", "/v1/sessions")
        assert refused.status_code == 401, refused.text
        for key in (late_by_hank, late_by_api_key):
            response = await _enrolls(service, key)
            assert response.status_code != 200, response.text
            assert "revoked" in response.json()["message"]
        fine = await service.registration_key(alice)
        assert (await _enrolls(service, fine["key"])).status_code == 200


async def test_disabling_an_operator_withdraws_its_pending_approval_requests(
    store: Store, tmp_path: Path
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.operator)
        answer = await _disable(team.service, team.admin, team.operator.operator_id)
        assert answer["withdrawn_approval_requests"] == 1
        view = await _view(team, team.admin, request_id)
        assert view["state"] == "withdrawn" and view["decision_reason"] == "operator_disabled"
        listing = await team.service.call(team.approver, "GET", "/v1/approvals")
        assert listing.json()["approvals"] == []
        approved = await _approve(team, team.approver, request_id)
        assert approved.status_code == 409, approved.text
        withdrawn = await team.service.audit_events(team.team_id, "approval.withdrawn")
        assert [event["context"]["reason"] for event in withdrawn] == ["operator_disabled"]
        assert not await team.service.audit_events(team.team_id, "approval.approved")


@pytest.mark.parametrize("decision", ["approve", "deny"])
async def test_nobody_decides_a_request_whose_requester_is_disabled(
    store: Store, tmp_path: Path, decision: str
) -> None:
    """A request parked as the disable committed escapes the withdrawal; deciding it is
    refused. The store's disable (which withdraws nothing) stands for that race here."""
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.operator)
        await store.disable_operator(
            team.team_id, team.operator.operator_id, team.service.clock.now
        )
        if decision == "approve":
            response = await _approve(team, team.approver, request_id)
        else:
            response = await team.service.call(
                team.approver, "POST", f"/v1/approvals/{request_id}/deny", {"reason": "no"}
            )
        assert response.status_code == 409, response.text
        assert "is disabled" in response.json()["message"]
        assert (await _view(team, team.admin, request_id))["state"] == "pending"
        assert not await team.service.audit_events(team.team_id, f"approval.{decision}d")


async def test_an_approval_whose_approver_was_disabled_since_is_refused_at_use(
    store: Store, tmp_path: Path
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.operator)
        approved = await _approve(team, team.approver, request_id)
        assert approved.status_code == 200, approved.text
        answer = await _disable(team.service, team.admin, team.approver.operator_id)
        assert "tucdesk roster sign" in answer["roster_pending"]

        response = await _ask(team, team.operator, {**RESTART, "approval_id": request_id})

        assert response.status_code == 409, response.text
        message = response.json()["message"]
        assert "was disabled; ask again" in message
        assert f"approver@{team.team_id}.test" in message
        refusals = await team.service.audit_events(team.team_id, "session.refused")
        assert [event["context"]["reason"] for event in refusals] == ["approver_disabled"]
        assert not await team.service.audit_events(team.team_id, "approval.executed")


async def test_the_disable_answer_names_no_roster_step_without_a_signed_roster(
    store: Store, tmp_path: Path
) -> None:
    async with harness(store, tmp_path / "data") as service:
        team = await service.team("alpha")
        alice = await service.operator(team, "admin")
        carol = await service.operator(team, "operator")
        answer = await _disable(service, alice, carol.operator_id)
        assert answer["roster_pending"] is None
        assert answer["revoked_api_keys"] == [] and answer["revoked_registration_keys"] == []
        again = await _disable(service, alice, carol.operator_id)
        assert again["already_disabled"] is True
