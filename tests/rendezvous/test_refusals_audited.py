"""Refused attempts leave an audit record in the caller's own team log (and none in another
team's), while the refusal itself is answered exactly as before: a refused approval decision or
withdrawal (``approval.decision_refused``), agent removal (``agent.remove_failed``), tag change
(``agent.tags_change_failed``) and operator disable (``operator.revoke_failed``). Another
team's id is answered and recorded exactly like an id that does not exist.

Against a real rendezvous (teams alpha and beta on one instance, an online agent in each), on
SQLite and PostgreSQL; the exports verify with ``tucdesk-audit verify``.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from audit.errors import StoreError as AuditStoreError
from audit.main import main as audit_main
from protocol.identity import SigningIdentity
from protocol.policy import Action, ApprovalContext, approve_request
from rendezvous.approval_gate import APPROVAL_REQUEST_SECONDS
from rendezvous.audit_trail import MAX_REFUSED_ID_LENGTH
from rendezvous.store import Store
from tests.rendezvous.policy_support import set_policy
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness
from tests.rendezvous.sessions_support import agent_channel, enroll_agent, served_instance

pytestmark = pytest.mark.anyio

RESTART = {"target": "web-1", "mode": "exec", "command": ["systemctl", "restart", "nginx"]}
REFUSAL_ACTIONS = {
    "approval.decision_refused",
    "agent.remove_failed",
    "agent.tags_change_failed",
    "operator.revoke_failed",
}
NO_SUCH_REQUEST = {"error": "not_found", "message": "no such approval request in your team"}
NO_SUCH_AGENT = {"error": "not_found", "message": "no such agent in your team"}
NO_SUCH_OPERATOR = {"error": "not_found", "message": "no such operator in your team"}
UNSIGNED = {"approval": {}}  # refused before the approval is looked at


@dataclass
class Teams:
    service: ServiceHarness
    alpha: str
    beta: str
    alice: OperatorSession  # alpha's admin
    operator: OperatorSession  # alpha, operator role
    approver: OperatorSession  # alpha, approver role
    bob: OperatorSession  # beta's admin
    alpha_agent: str
    beta_agent: str


async def _operator_with_email(
    service: ServiceHarness, team_id: str, role: str, email: str
) -> OperatorSession:
    identity = SigningIdentity.generate()
    code = await service.invite(team_id, role, email=email)
    response = await service.http.post(
        "/v1/operators/enroll", json=service.enrollment(identity, code)
    )
    assert response.status_code == 200, response.text
    token = await service.login(identity)
    return OperatorSession(identity, token["operator_id"], team_id, role, token["access_token"])


@asynccontextmanager
async def two_teams(store: Store, tmp_path: Path) -> AsyncIterator[Teams]:
    """Alpha (admin, operator, approver, signed policy, online agent) and beta (admin bob and
    an online agent) on one rendezvous."""
    async with served_instance(store, tmp_path / "data") as (service, url):
        alpha = await service.team("alpha")
        beta = await service.team("beta")
        alice = await service.operator(alpha, "admin")
        operator = await service.operator(alpha, "operator")
        approver = await service.operator(alpha, "approver")
        bob = await service.operator(beta, "admin")
        alpha_agent = await enroll_agent(service, alice)
        beta_agent = await enroll_agent(service, bob)
        await set_policy(service, alice)
        async with agent_channel(url, alpha_agent), agent_channel(url, beta_agent):
            yield Teams(service, alpha, beta, alice, operator, approver, bob,
                        alpha_agent.agent_id, beta_agent.agent_id)  # fmt: skip


async def _park(teams: Teams, who: OperatorSession) -> str:
    response = await teams.service.call(who, "POST", "/v1/sessions", RESTART)
    assert response.status_code == 202, response.text
    request_id: str = response.json()["approval_request"]["id"]
    return request_id


async def _signed_approval(teams: Teams, who: OperatorSession, request_id: str) -> dict[str, Any]:
    view = (await teams.service.call(who, "GET", f"/v1/approvals/{request_id}")).json()
    context = ApprovalContext(
        request_id=view["id"], team_id=view["team_id"], agent_id=view["agent"]["id"],
        action=Action(view["action"]), command=tuple(view["command"]),
        requester_thumbprint=view["requester_thumbprint"], policy_version=view["policy_version"],
    )  # fmt: skip
    signed = approve_request(who.identity, context, now=teams.service.clock.now)
    return {"approval": signed.to_json()}


async def _refusals(service: ServiceHarness, team_id: str) -> list[dict[str, Any]]:
    events = await service.audit_events(team_id)
    return [event for event in events if event["action"] in REFUSAL_ACTIONS]


async def _answer(
    service: ServiceHarness, who: OperatorSession, method: str, path: str, body: Any = None
) -> tuple[int, dict[str, Any]]:
    response: httpx.Response = await service.call(who, method, path, body)
    return response.status_code, response.json()


def _refusal(event: dict[str, Any]) -> tuple[str, str, str, str | None, str | None]:
    context = event["context"]
    return (event["action"], event["actor"]["id"], event["target"], context.get("reason"),
            context.get("decision"))  # fmt: skip


async def _one_refusal(
    teams: Teams, team_id: str, before: int
) -> tuple[str, str, str, str | None, str | None]:
    """The one refusal record ``team_id``'s log gained since it held ``before`` of them."""
    refusals = await _refusals(teams.service, team_id)
    assert len(refusals) == before + 1, refusals
    return _refusal(refusals[-1])


async def _export_verifies(service: ServiceHarness, team_id: str, tmp_path: Path) -> str:
    """Export ``team_id``'s log, check ``tucdesk-audit verify`` accepts it; return its path."""
    bundle = io.BytesIO()
    await service.ctx.audit.export_to(team_id, bundle)
    path, pem = tmp_path / f"{team_id}.jsonl", tmp_path / "audit.pem"
    path.write_bytes(bundle.getvalue())
    pem.write_bytes(service.ctx.audit.audit_key.to_pem())
    assert audit_main(["verify", str(path), "--key", str(pem)]) == 0
    return str(path)


async def test_refused_approval_decisions_are_recorded_in_the_callers_team_with_their_reason(
    store: Store, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with two_teams(store, tmp_path) as teams:
        service, alpha = teams.service, teams.alpha
        twin = await _operator_with_email(service, alpha, "approver",
                                          f"OPERATOR@{alpha}.test")  # fmt: skip
        expected = []

        async def refused(
            who: OperatorSession, path: str, body: Any, answer: tuple[int, dict[str, Any]],
            reason: str, decision: str, request_id: str,
        ) -> None:  # fmt: skip
            before = len(await _refusals(service, alpha))
            assert await _answer(service, who, "POST", path, body) == answer
            record = await _one_refusal(teams, alpha, before)
            target = f"approval_request:{request_id}"
            assert record == ("approval.decision_refused", who.operator_id, target, reason,
                              decision)  # fmt: skip
            expected.append(record)

        own = await _park(teams, teams.alice)
        await refused(teams.alice, f"/v1/approvals/{own}/approve", UNSIGNED,
                      (403, {"error": "forbidden",
                             "message": "nobody may approve or deny their own request"}),
                      "own_request", "approve", own)  # fmt: skip
        mine = await _park(teams, teams.operator)
        # A second identity whose email differs from the requester's only in case.
        await refused(twin, f"/v1/approvals/{mine}/approve", UNSIGNED,
                      (403, {"error": "forbidden",
                             "message": "nobody may approve or deny their own request"}),
                      "own_request", "approve", mine)  # fmt: skip
        await refused(teams.operator, f"/v1/approvals/{mine}/deny", {"reason": "no"},
                      (403, {"error": "forbidden", "message":
                             "the operator role may not approve or deny (approver or admin "
                             "may)"}),
                      "role_may_not_decide", "deny", mine)  # fmt: skip
        await refused(teams.approver, f"/v1/approvals/{mine}/withdraw", None,
                      (403, {"error": "forbidden", "message":
                             "only the operator who made a request may withdraw it"}),
                      "not_requester", "withdraw", mine)  # fmt: skip
        approval = await _signed_approval(teams, teams.approver, mine)
        assert (await service.call(teams.approver, "POST", f"/v1/approvals/{mine}/approve",
                                   approval)).status_code == 200  # fmt: skip
        await refused(teams.alice, f"/v1/approvals/{mine}/approve",
                      await _signed_approval(teams, teams.alice, mine),
                      (409, {"error": "approval_unusable",
                             "message": "the approval request is already approved"}),
                      "already_approved", "approve", mine)  # fmt: skip
        late = await _park(teams, teams.operator)
        late_approval = await _signed_approval(teams, teams.approver, late)
        service.clock.now += APPROVAL_REQUEST_SECONDS + 1
        token = (await service.login(teams.approver.identity))["access_token"]  # expired too
        teams.approver.token = token
        await refused(teams.approver, f"/v1/approvals/{late}/approve", late_approval,
                      (409, {"error": "approval_unusable",
                             "message": "the approval request is already expired"}),
                      "already_expired", "approve", late)  # fmt: skip
        assert await _refusals(service, teams.beta) == []
        path = await _export_verifies(service, alpha, tmp_path)
    capsys.readouterr()
    pem = str(tmp_path / "audit.pem")
    assert audit_main(["show", path, "--key", pem, "--action", "approval.decision_refused",
                       "--json"]) == 0  # fmt: skip
    shown = json.loads(capsys.readouterr().out)["records"]
    assert [record["actor"]["id"] for record in shown] == [record[1] for record in expected]
    # Joined from the request's approval.requested in the same log: whose request it was.
    assert shown[1]["subject"] == f"operator@{alpha}.test"


async def test_another_teams_request_is_refused_like_a_missing_one_and_recorded_only_in_yours(
    store: Store, tmp_path: Path
) -> None:
    async with two_teams(store, tmp_path) as teams:
        service, bob = teams.service, teams.bob
        theirs = await _park(teams, teams.operator)
        alpha_before = await service.audit_events(teams.alpha)
        for decision, body in (("approve", UNSIGNED), ("deny", {"reason": "x"})):
            for request_id in (theirs, "apr_doesnotexist"):
                before = len(await _refusals(service, teams.beta))
                answer = await _answer(service, bob, "POST",
                                       f"/v1/approvals/{request_id}/{decision}", body)  # fmt: skip
                assert answer == (404, NO_SUCH_REQUEST)
                assert await _one_refusal(teams, teams.beta, before) == (
                    "approval.decision_refused", bob.operator_id,
                    f"approval_request:{request_id}", "not_found", decision,
                )  # fmt: skip
        # Nothing in alpha's log: not the probe, not a record naming bob.
        assert await service.audit_events(teams.alpha) == alpha_before
        [refusal] = (await _refusals(service, teams.beta))[:1]
        assert set(refusal["context"]) == {"approval_request", "decision", "reason"}
        assert (await store.get_approval_request(teams.alpha, theirs)).state.value == "pending"
        await _export_verifies(service, teams.beta, tmp_path)
        await _export_verifies(service, teams.alpha, tmp_path)


async def test_another_teams_agent_and_operator_are_refused_like_missing_ones_and_recorded(
    store: Store, tmp_path: Path
) -> None:
    async with two_teams(store, tmp_path) as teams:
        service, alice = teams.service, teams.alice
        beta_before = await service.audit_events(teams.beta)
        calls = [
            ("DELETE", "/v1/agents/{}", None, NO_SUCH_AGENT, "agent.remove_failed", "{}"),
            ("PUT", "/v1/agents/{}/tags", {"tags": ["prod"]}, NO_SUCH_AGENT,
             "agent.tags_change_failed", "{}"),
            ("POST", "/v1/operators/{}/disable", None, NO_SUCH_OPERATOR,
             "operator.revoke_failed", "operator:{}"),
        ]  # fmt: skip
        for method, path, body, missing, action, target in calls:
            theirs = teams.bob.operator_id if action.startswith("operator") else teams.beta_agent
            for sent in (theirs, "does-not-exist"):
                before = len(await _refusals(service, teams.alpha))
                assert await _answer(service, alice, method, path.format(sent), body) == (
                    404, missing)  # fmt: skip
                assert await _one_refusal(teams, teams.alpha, before) == (
                    action, alice.operator_id, target.format(sent), "not_found", None)
        refusals = await _refusals(service, teams.alpha)
        assert all(set(event["context"]) == {"reason"} for event in refusals)
        assert await service.audit_events(teams.beta) == beta_before
        assert [agent["id"] for agent in (await service.call(
            teams.bob, "GET", "/v1/agents")).json()["agents"]] == [teams.beta_agent]  # fmt: skip
        await _export_verifies(service, teams.alpha, tmp_path)


async def test_a_caller_without_the_right_is_refused_as_before_and_recorded(
    store: Store, tmp_path: Path
) -> None:
    async with two_teams(store, tmp_path) as teams:
        service, operator = teams.service, teams.operator
        calls = [
            ("DELETE", f"/v1/agents/{teams.alpha_agent}", None, "agent.remove_failed",
             teams.alpha_agent, "agents:write"),
            ("PUT", f"/v1/agents/{teams.alpha_agent}/tags", {"tags": ["prod"]},
             "agent.tags_change_failed", teams.alpha_agent, "agents:write"),
            ("POST", f"/v1/operators/{teams.alice.operator_id}/disable", None,
             "operator.revoke_failed", f"operator:{teams.alice.operator_id}", "operators:write"),
        ]  # fmt: skip
        for method, path, body, action, target, permission in calls:
            before = len(await _refusals(service, teams.alpha))
            assert await _answer(service, operator, method, path, body) == (403, {
                "error": "forbidden",
                "message": f"the operator role may not do this ({permission})"})  # fmt: skip
            assert await _one_refusal(teams, teams.alpha, before) == (
                action, operator.operator_id, target, "not_permitted", None)
        # The last active admin: refused (409) before anything was recorded as revoked.
        before = len(await _refusals(service, teams.alpha))
        status, _ = await _answer(service, teams.alice, "POST",
                                  f"/v1/operators/{teams.alice.operator_id}/disable")  # fmt: skip
        assert status == 409
        assert await _one_refusal(teams, teams.alpha, before) == (
            "operator.revoke_failed", teams.alice.operator_id,
            f"operator:{teams.alice.operator_id}", "last_active_admin", None)  # fmt: skip
        assert "operator.revoked" not in await service.audit_actions(teams.alpha)
        await _export_verifies(service, teams.alpha, tmp_path)


async def test_a_long_id_is_recorded_capped(store: Store, tmp_path: Path) -> None:
    async with two_teams(store, tmp_path) as teams:
        sent = "x" * 900  # near the request proof's limit on the signed target (1024)
        answer = await _answer(teams.service, teams.bob, "POST",
                               f"/v1/approvals/{sent}/deny", {"reason": "x"})  # fmt: skip
        assert answer == (404, NO_SUCH_REQUEST)
        assert await _answer(teams.service, teams.bob, "DELETE", f"/v1/agents/{sent}") == (
            404, NO_SUCH_AGENT)  # fmt: skip
        [decision, removal] = await _refusals(teams.service, teams.beta)
        capped = sent[:MAX_REFUSED_ID_LENGTH]
        assert decision["target"] == f"approval_request:{capped}"
        assert decision["context"]["approval_request"] == capped
        assert removal["target"] == capped


async def test_a_refusal_whose_record_cannot_be_appended_still_stands_and_is_logged(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A refusal changes nothing, so there is nothing for the log to hold back: the caller gets
    the same refusal (never a 503), and the service log says the record is missing."""
    async with two_teams(store, tmp_path) as teams:
        service = teams.service

        async def failing_append(*args: Any, **kwargs: Any) -> None:
            raise AuditStoreError("disk I/O error")

        theirs = await _park(teams, teams.operator)
        before = await service.audit_events(teams.beta)
        monkeypatch.setattr(service.store.audit, "append", failing_append)
        with caplog.at_level(logging.ERROR, logger="tucdesk.rendezvous.audit"):
            denied = await _answer(service, teams.bob, "POST", f"/v1/approvals/{theirs}/deny",
                                   {"reason": "x"})  # fmt: skip
            removed = await _answer(service, teams.bob, "DELETE", f"/v1/agents/{teams.alpha_agent}")
            alice_path = f"/v1/operators/{teams.alice.operator_id}/disable"
            disabled = await _answer(service, teams.bob, "POST", alice_path)
        monkeypatch.undo()
        assert (denied, removed, disabled) == (
            (404, NO_SUCH_REQUEST), (404, NO_SUCH_AGENT), (404, NO_SUCH_OPERATOR))
        messages = [record.getMessage() for record in caplog.records]
        unrecorded = [message for message in messages if "stands unrecorded" in message]
        assert unrecorded == [
            "a refused request (approval.decision_refused, reason not_found) stands unrecorded",
            "a refused request (agent.remove_failed, reason not_found) stands unrecorded",
            "a refused request (operator.revoke_failed, reason not_found) stands unrecorded",
        ]
        assert not any(theirs in message for message in messages)
        assert await service.audit_events(teams.beta) == before
        # The log goes on: the next refusal is recorded, and the export still verifies.
        assert (await _answer(service, teams.bob, "DELETE", "/v1/agents/gone"))[0] == 404
        assert len(await _refusals(service, teams.beta)) == 1
        await _export_verifies(service, teams.beta, tmp_path)
