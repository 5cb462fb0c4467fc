"""The approval gate on both backends: park, approve or deny, redeem once, expire."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from audit.actions import Action as AuditAction
from protocol.domains import Purpose
from protocol.policy import (
    Action,
    ApprovalContext,
    ApprovalStatement,
    Roster,
    SignedApproval,
    approve_request,
    command_sha256,
    verify_approval,
)
from protocol.policy.approval import DEFAULT_APPROVAL_LIFETIME_SECONDS
from protocol.session_grant import verify_session_grant
from rendezvous.approval_gate import (
    APPROVAL_REQUEST_SECONDS,
    MAX_PENDING_REQUESTS_PER_OPERATOR,
    UNAUDITED_REASON,
    approval_context,
)
from rendezvous.errors import ServiceUnavailable
from rendezvous.store import ApprovalState, Store
from tests.rendezvous.policy_support import current_policy, set_policy
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness
from tests.rendezvous.sessions_support import (
    AgentChannel,
    agent_channel,
    enroll_agent,
    jwt_issuer_keys,
    served_instance,
)

pytestmark = pytest.mark.anyio

RESTART = {"target": "web-1", "mode": "exec", "command": ["systemctl", "restart", "nginx"]}


@dataclass
class Team:
    service: ServiceHarness
    channel: AgentChannel
    team_id: str
    agent_id: str
    admin: OperatorSession
    operator: OperatorSession
    approver: OperatorSession


@asynccontextmanager
async def team_with_policy(store: Store, tmp_path: Path) -> AsyncIterator[Team]:
    """An online agent, an admin, an operator and an approver, all in the signed roster."""
    async with served_instance(store, tmp_path / "data") as (service, url):
        team_id = await service.team("ops")
        admin = await service.operator(team_id, "admin")
        operator = await service.operator(team_id, "operator")
        approver = await service.operator(team_id, "approver")
        agent = await enroll_agent(service, admin)
        await set_policy(service, admin)
        async with agent_channel(url, agent) as channel:
            yield Team(service, channel, team_id, agent.agent_id, admin, operator, approver)


async def _ask(team: Team, who: OperatorSession, body: dict[str, Any]) -> Any:
    return await team.service.call(who, "POST", "/v1/sessions", body)


async def _park(team: Team, who: OperatorSession, body: dict[str, Any] = RESTART) -> str:
    response = await _ask(team, who, body)
    assert response.status_code == 202, response.text
    request_id: str = response.json()["approval_request"]["id"]
    return request_id


async def _view(team: Team, who: OperatorSession, request_id: str) -> dict[str, Any]:
    response = await team.service.call(who, "GET", f"/v1/approvals/{request_id}")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


def _context(view: dict[str, Any]) -> ApprovalContext:
    """What an approver's CLI signs, from the request as the server shows it."""
    command = view["command"]
    return ApprovalContext(
        request_id=view["id"], team_id=view["team_id"], agent_id=view["agent"]["id"],
        action=Action(view["action"]), command=None if command is None else tuple(command),
        requester_thumbprint=view["requester_thumbprint"], policy_version=view["policy_version"],
    )  # fmt: skip


async def _approve(
    team: Team, who: OperatorSession, request_id: str, context: ApprovalContext | None = None
) -> Any:
    view = await _view(team, who, request_id)
    signed = approve_request(
        who.identity, context or _context(view), now=team.service.clock.now
    )
    return await team.service.call(
        who, "POST", f"/v1/approvals/{request_id}/approve",
        {"approval": signed.to_json(), "reason": "looks right"},
    )  # fmt: skip


async def _actions(team: Team) -> list[str]:
    return await team.service.audit_actions(team.team_id)


async def test_a_request_needing_approval_is_parked_and_shown_to_approvers(
    store: Store, tmp_path: Path
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        response = await _ask(team, team.operator, RESTART)
        assert response.status_code == 202, response.text
        parked = response.json()["approval_request"]
        assert parked["id"].startswith("apr_")
        assert parked["rule_id"] == "restarts-need-approval"
        assert parked["approvers"] == sorted(
            [f"admin@{team.team_id}.test", f"approver@{team.team_id}.test"]
        )
        listing = await team.service.call(team.approver, "GET", "/v1/approvals")
        [pending] = listing.json()["approvals"]
        assert pending["id"] == parked["id"]
        assert pending["requester"]["email"] == f"operator@{team.team_id}.test"
        assert pending["command"] == RESTART["command"] and pending["action"] == "exec"
        assert pending["agent"]["name"] == "web-1" and pending["age_seconds"] >= 0
        refused = await team.service.call(team.operator, "GET", "/v1/approvals")
        assert refused.status_code == 403
        assert (await _view(team, team.operator, parked["id"]))["state"] == "pending"
        assert "approval.requested" in await _actions(team)


async def test_an_approved_request_runs_once_with_the_signed_approval_in_its_grant(
    store: Store, tmp_path: Path
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.operator)
        early = await _ask(team, team.operator, {**RESTART, "approval_id": request_id})
        assert early.status_code == 409 and "waiting" in early.json()["message"]
        approved = await _approve(team, team.approver, request_id)
        assert approved.status_code == 200, approved.text
        assert approved.json()["state"] == "approved"
        assert approved.json()["decision_reason"] == "looks right"

        response = await _ask(team, team.operator, {**RESTART, "approval_id": request_id})
        assert response.status_code == 201, response.text
        offer = await team.channel.receive("session_offer")
        grant = verify_session_grant(
            response.json()["grant"], jwt_issuer_keys(team.service),
            issuer=team.service.config.issuer, agent_id=team.agent_id, team_id=team.team_id,
            session_id=offer["session_id"],
            operator_key_thumbprint=team.operator.identity.public.key_id,
            now=team.service.clock.now,
        )  # fmt: skip
        assert grant.policy_result == "approval_required" and grant.approval is not None
        state = await current_policy(team.service, team.admin)
        roster = Roster.from_json(state["pending"]["roster"])
        view = await _view(team, team.operator, request_id)
        statement = verify_approval(grant.approval, _context(view), roster, team.service.clock.now)
        assert statement.approver_thumbprint == team.approver.identity.public.key_id
        assert view["state"] == "executed" and view["session_id"] == offer["session_id"]

        again = await _ask(team, team.operator, {**RESTART, "approval_id": request_id})
        assert again.status_code == 409, again.text
        actions = await _actions(team)
        assert actions.index("approval.approved") < actions.index("approval.executed")


async def test_nobody_approves_their_own_request(store: Store, tmp_path: Path) -> None:
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.admin)
        # approve_request refuses this locally; a modified CLI signs the statement anyway.
        context = _context(await _view(team, team.admin, request_id))
        issued = int(team.service.clock.now)
        statement = ApprovalStatement(
            request_id=context.request_id, team_id=context.team_id, agent_id=context.agent_id,
            action=context.action.value, command_sha256=command_sha256(context.command),
            policy_version=context.policy_version,
            requester_thumbprint=context.requester_thumbprint,
            approver_thumbprint=team.admin.identity.public.key_id, issued_at=issued,
            expires_at=issued + 600,
        )  # fmt: skip
        signature = team.admin.identity.sign(Purpose.APPROVAL, statement.canonical_bytes())
        response = await team.service.call(
            team.admin, "POST", f"/v1/approvals/{request_id}/approve",
            {"approval": SignedApproval(statement, signature).to_json()},
        )  # fmt: skip
        assert response.status_code == 403, response.text
        assert "own request" in response.json()["message"]
        assert (await _view(team, team.admin, request_id))["state"] == "pending"


async def test_an_approval_for_another_command_is_refused_and_cannot_be_moved(
    store: Store, tmp_path: Path
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.operator)
        view = await _view(team, team.approver, request_id)
        other = ApprovalContext(**{**_context(view).__dict__, "command": ("rm", "-rf", "/")})
        response = await _approve(team, team.approver, request_id, other)
        assert response.status_code == 400, response.text
        assert "another command" in response.json()["message"]

        assert (await _approve(team, team.approver, request_id)).status_code == 200
        moved = {**RESTART, "command": ["systemctl", "restart", "postgres"],
                 "approval_id": request_id}  # fmt: skip
        response = await _ask(team, team.operator, moved)
        assert response.status_code == 409, response.text
        assert "another agent, action or command" in response.json()["message"]
        stolen = await _ask(team, team.admin, {**RESTART, "approval_id": request_id})
        assert stolen.status_code == 403, stolen.text


async def test_an_approval_signed_with_someone_elses_key_is_refused(
    store: Store, tmp_path: Path
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.operator)
        view = await _view(team, team.approver, request_id)
        signed = approve_request(team.admin.identity, _context(view), now=team.service.clock.now)
        response = await team.service.call(
            team.approver, "POST", f"/v1/approvals/{request_id}/approve",
            {"approval": signed.to_json()},
        )  # fmt: skip
        assert response.status_code == 403, response.text
        forged = SignedApproval(signed.statement, bytes(64)).to_json()
        response = await team.service.call(
            team.admin, "POST", f"/v1/approvals/{request_id}/approve", {"approval": forged}
        )
        assert response.status_code == 400, response.text


async def test_a_denied_request_tells_the_requester_who_denied_it_and_why(
    store: Store, tmp_path: Path
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.operator)
        own = await team.service.call(
            team.operator, "POST", f"/v1/approvals/{request_id}/deny", {"reason": "x"}
        )
        assert own.status_code == 403
        response = await team.service.call(
            team.approver, "POST", f"/v1/approvals/{request_id}/deny",
            {"reason": "not during the sale"},
        )  # fmt: skip
        assert response.status_code == 200, response.text
        retry = await _ask(team, team.operator, {**RESTART, "approval_id": request_id})
        assert retry.status_code == 403, retry.text
        message = retry.json()["message"]
        assert f"approver@{team.team_id}.test" in message and "not during the sale" in message
        assert (await _approve(team, team.admin, request_id)).status_code == 409
        records = await team.service.store.audit.read_records(team.team_id, 0, 10_000)
        denials = [
            json.loads(record.canonical)["event"] for record in records
            if json.loads(record.canonical)["event"]["action"] == "approval.denied"
        ]  # fmt: skip
        assert denials[0]["context"]["reason"] == "not during the sale"


async def test_a_request_nobody_decides_expires_and_is_audited_once(
    store: Store, tmp_path: Path
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.operator)
        team.service.clock.now += APPROVAL_REQUEST_SECONDS + 1
        for who in (team.operator, team.approver):
            who.token = (await team.service.login(who.identity))["access_token"]
        assert (await _view(team, team.operator, request_id))["state"] == "expired"
        listing = await team.service.call(team.approver, "GET", "/v1/approvals")
        assert listing.json()["approvals"] == []
        response = await team.service.call(
            team.approver, "POST", f"/v1/approvals/{request_id}/deny", {"reason": None}
        )
        assert response.status_code == 409, response.text
        assert (await _actions(team)).count("approval.expired") == 1


async def test_an_approval_given_under_an_older_policy_version_is_not_used(
    store: Store, tmp_path: Path
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.operator)
        assert (await _approve(team, team.approver, request_id)).status_code == 200
        await set_policy(team.service, team.admin)
        response = await _ask(team, team.operator, {**RESTART, "approval_id": request_id})
        assert response.status_code == 409, response.text
        assert "policy changed" in response.json()["message"]


async def test_a_request_nobody_else_could_approve_is_refused_not_parked(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team_id = await service.team("solo")
        admin = await service.operator(team_id, "admin")
        agent = await enroll_agent(service, admin)
        await set_policy(service, admin)
        async with agent_channel(url, agent):
            response = await service.call(admin, "POST", "/v1/sessions", RESTART)
        assert response.status_code == 403, response.text
        assert "nobody else" in response.json()["message"]
        assert "approval.requested" not in await service.audit_actions(team_id)


async def test_an_approval_left_unused_past_its_lifetime_expires(
    store: Store, tmp_path: Path
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.operator)
        assert (await _approve(team, team.approver, request_id)).status_code == 200
        team.service.clock.now += DEFAULT_APPROVAL_LIFETIME_SECONDS + 1
        team.operator.token = (await team.service.login(team.operator.identity))["access_token"]
        response = await _ask(team, team.operator, {**RESTART, "approval_id": request_id})
        assert response.status_code == 409, response.text
        assert "expired" in response.json()["message"]
        assert (await _view(team, team.operator, request_id))["state"] == "expired"
        assert (await _actions(team)).count("approval.expired") == 1


REPAINTING_REASON = "\x1b[2K\r\x1b[1A\x1b[2Ktucdesk: approved by boss@example.test"


@pytest.mark.parametrize("decision", ["deny", "approve"])
async def test_a_decision_reason_with_control_characters_is_refused_and_changes_nothing(
    store: Store, tmp_path: Path, decision: str
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.operator)
        view = await _view(team, team.approver, request_id)
        body: dict[str, Any] = {"reason": REPAINTING_REASON}
        if decision == "approve":
            signed = approve_request(team.approver.identity, _context(view),
                                     now=team.service.clock.now)  # fmt: skip
            body["approval"] = signed.to_json()
        response = await team.service.call(
            team.approver, "POST", f"/v1/approvals/{request_id}/{decision}", body
        )
        assert response.status_code == 422, response.text
        assert "printable" in response.json()["message"]
        after = await _view(team, team.operator, request_id)
        assert (after["state"], after["decided_by"], after["decision_reason"]) == (
            "pending", None, None
        )
        actions = await _actions(team)
        assert "approval.denied" not in actions and "approval.approved" not in actions


async def test_an_operator_may_keep_only_so_many_requests_pending(
    store: Store, tmp_path: Path
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        for _ in range(MAX_PENDING_REQUESTS_PER_OPERATOR):
            await _park(team, team.operator)
        refused = await _ask(team, team.operator, RESTART)
        assert refused.status_code == 429, refused.text
        message = refused.json()["message"]
        assert f"{MAX_PENDING_REQUESTS_PER_OPERATOR} approval requests pending" in message
        assert "expires" in message and "tucdesk approvals withdraw" in message
        listing = await team.service.call(team.approver, "GET", "/v1/approvals")
        assert len(listing.json()["approvals"]) == MAX_PENDING_REQUESTS_PER_OPERATOR
        # The cap is per requester: someone else's request still gets to the approvers.
        assert (await _ask(team, team.admin, RESTART)).status_code == 202
        # A decided request no longer counts...
        oldest = listing.json()["approvals"][0]["id"]
        denied = await team.service.call(
            team.approver, "POST", f"/v1/approvals/{oldest}/deny", {"reason": "one is enough"}
        )
        assert denied.status_code == 200, denied.text
        await _park(team, team.operator)
        assert (await _ask(team, team.operator, RESTART)).status_code == 429
        # ...nor does one past its time, even before anyone has looked at it and marked it.
        team.service.clock.now += APPROVAL_REQUEST_SECONDS + 1
        team.operator.token = (await team.service.login(team.operator.identity))["access_token"]
        assert await team.service.store.count_pending_approval_requests(
            team.team_id, (await _view(team, team.operator, oldest))["requester"]["id"],
            team.service.clock.now,
        ) == 0  # fmt: skip
        await _park(team, team.operator)


async def test_the_requester_withdraws_a_pending_request_audited_and_no_longer_approvable(
    store: Store, tmp_path: Path
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.operator)
        view = await _view(team, team.approver, request_id)
        withdrawn = await team.service.call(
            team.operator, "POST", f"/v1/approvals/{request_id}/withdraw"
        )
        assert withdrawn.status_code == 200, withdrawn.text
        assert withdrawn.json()["state"] == "withdrawn"
        assert "approval.withdrawn" in await _actions(team)
        listing = await team.service.call(team.approver, "GET", "/v1/approvals")
        assert request_id not in {item["id"] for item in listing.json()["approvals"]}
        # An approval signed from the view taken before the withdrawal is refused.
        signed = approve_request(team.approver.identity, _context(view), now=team.service.clock.now)
        late = await team.service.call(
            team.approver, "POST", f"/v1/approvals/{request_id}/approve",
            {"approval": signed.to_json()},
        )  # fmt: skip
        assert late.status_code == 409, late.text
        redeemed = await _ask(team, team.operator, {**RESTART, "approval_id": request_id})
        assert redeemed.status_code == 409, redeemed.text
        assert "withdrew" in redeemed.json()["message"]
        again = await team.service.call(
            team.operator, "POST", f"/v1/approvals/{request_id}/withdraw"
        )
        assert again.status_code == 409, again.text
        assert (await _actions(team)).count("approval.withdrawn") == 1


@pytest.mark.parametrize("who", ["approver", "admin"])
async def test_nobody_but_the_requester_may_withdraw_a_request(
    store: Store, tmp_path: Path, who: str
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.operator)
        other = team.approver if who == "approver" else team.admin
        refused = await team.service.call(other, "POST", f"/v1/approvals/{request_id}/withdraw")
        assert refused.status_code == 403, refused.text
        assert (await _view(team, team.operator, request_id))["state"] == "pending"
        assert "approval.withdrawn" not in await _actions(team)


async def test_another_teams_request_cannot_be_withdrawn(store: Store, tmp_path: Path) -> None:
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.operator)
        stranger = await team.service.operator(await team.service.team("other"), "operator")
        refused = await team.service.call(
            stranger, "POST", f"/v1/approvals/{request_id}/withdraw"
        )
        assert refused.status_code == 404, refused.text
        assert (await _view(team, team.operator, request_id))["state"] == "pending"


async def test_a_withdrawn_request_frees_its_place_under_the_cap(
    store: Store, tmp_path: Path
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        parked = [await _park(team, team.operator)
                  for _ in range(MAX_PENDING_REQUESTS_PER_OPERATOR)]  # fmt: skip
        assert (await _ask(team, team.operator, RESTART)).status_code == 429
        withdrawn = await team.service.call(
            team.operator, "POST", f"/v1/approvals/{parked[0]}/withdraw"
        )
        assert withdrawn.status_code == 200, withdrawn.text
        await _park(team, team.operator)


async def test_concurrent_requests_cannot_pass_the_pending_cap_together(
    store: Store, tmp_path: Path
) -> None:
    async with team_with_policy(store, tmp_path) as team:
        for _ in range(MAX_PENDING_REQUESTS_PER_OPERATOR - 1):
            await _park(team, team.operator)
        statuses: list[int] = []

        async def ask() -> None:
            statuses.append((await _ask(team, team.operator, RESTART)).status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(15):
                nursery.start_soon(ask)
        assert sorted(statuses) == [202] + [429] * 14
        listing = await team.service.call(team.approver, "GET", "/v1/approvals")
        assert len(listing.json()["approvals"]) == MAX_PENDING_REQUESTS_PER_OPERATOR
        # Every parked request is on record, and no refused one is.
        requested = (await _actions(team)).count("approval.requested")
        assert requested == MAX_PENDING_REQUESTS_PER_OPERATOR


async def test_a_request_whose_audit_record_fails_is_withdrawn_and_never_approvable(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No audit, no action: a request stored before its record is withdrawn if the record
    cannot be written, so nobody can approve a request the log does not know of."""
    async with team_with_policy(store, tmp_path) as team:
        record = team.service.ctx.audit.record

        async def requests_unauditable(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("action") == AuditAction.APPROVAL_REQUESTED:
                raise ServiceUnavailable("the audit log is unavailable")
            return await record(*args, **kwargs)

        monkeypatch.setattr(team.service.ctx.audit, "record", requests_unauditable)
        response = await _ask(team, team.operator, RESTART)
        assert response.status_code == 503, response.text
        monkeypatch.setattr(team.service.ctx.audit, "record", record)
        listing = await team.service.call(team.approver, "GET", "/v1/approvals")
        assert listing.json()["approvals"] == []
        [withdrawn] = await store.list_approval_requests(
            team.team_id, [ApprovalState.WITHDRAWN]
        )
        assert withdrawn.decision_reason == UNAUDITED_REASON
        assert "approval.requested" not in await _actions(team)
        assert (await _approve(team, team.approver, withdrawn.id)).status_code == 409


@pytest.mark.parametrize(
    ("late", "winner", "state"),
    [
        ("approval.approved", "withdraw", "withdrawn"),
        ("approval.withdrawn", "approve", "approved"),
    ],
)
async def test_a_decision_that_loses_a_race_is_recorded_as_superseded(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    late: str, winner: str, state: str,
) -> None:  # fmt: skip
    """The loser's record is written first (no audit, no action), so a record saying it did
    not take effect must follow it: the log never claims both a withdrawal and an approval."""
    async with team_with_policy(store, tmp_path) as team:
        request_id = await _park(team, team.operator)
        view = await _view(team, team.approver, request_id)
        signed = approve_request(team.approver.identity, _context(view), now=team.service.clock.now)
        record = team.service.ctx.audit.record
        recorded, winner_done = trio.Event(), trio.Event()

        async def pause_after_late_record(*args: Any, **kwargs: Any) -> Any:
            await record(*args, **kwargs)
            if kwargs.get("action") == AuditAction(late):
                recorded.set()
                await winner_done.wait()  # the other side's update lands in this gap

        monkeypatch.setattr(team.service.ctx.audit, "record", pause_after_late_record)
        calls = {
            "withdraw": (team.operator, f"/v1/approvals/{request_id}/withdraw", None),
            "approve": (team.approver, f"/v1/approvals/{request_id}/approve",
                        {"approval": signed.to_json()}),
        }  # fmt: skip
        loser = "approve" if winner == "withdraw" else "withdraw"
        answers: dict[str, Any] = {}

        async def call(name: str) -> None:
            who, path, body = calls[name]
            answers[name] = await team.service.call(who, "POST", path, body)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call, loser)
            with trio.fail_after(15):
                await recorded.wait()
            await call(winner)
            winner_done.set()
        assert answers[winner].status_code == 200, answers[winner].text
        assert answers[loser].status_code == 409, answers[loser].text
        events = await team.service.audit_events(team.team_id)
        decisions = [e for e in events if e["action"] in (
            "approval.approved", "approval.withdrawn", "approval.superseded")]  # fmt: skip
        assert [e["action"] for e in decisions] == [late, f"approval.{state}",
                                                    "approval.superseded"]  # fmt: skip
        assert decisions[-1]["context"] == {
            "approval_request": request_id, "audited_as": late, "state": state
        }
        assert (await _view(team, team.operator, request_id))["state"] == state


async def _try_to_decide_while_recording(team: Team) -> dict[str, Any]:
    """What the approver meets for the one request being recorded: listed? shown? decidable?"""
    [recording] = await team.service.store.list_approval_requests(
        team.team_id, list(ApprovalState)
    )
    signed = approve_request(
        team.approver.identity, approval_context(recording), now=team.service.clock.now
    )
    listing = await team.service.call(team.approver, "GET", "/v1/approvals")
    shown = await team.service.call(team.approver, "GET", f"/v1/approvals/{recording.id}")
    approved = await team.service.call(
        team.approver, "POST", f"/v1/approvals/{recording.id}/approve",
        {"approval": signed.to_json()},
    )  # fmt: skip
    denied = await team.service.call(
        team.approver, "POST", f"/v1/approvals/{recording.id}/deny", {"reason": "no"}
    )
    withdrawn = await team.service.call(
        team.operator, "POST", f"/v1/approvals/{recording.id}/withdraw", None
    )
    return {
        "id": recording.id,
        "listed": listing.json()["approvals"],
        "statuses": [r.status_code for r in (shown, approved, denied, withdrawn)],
        "counted": await team.service.store.count_pending_approval_requests(
            team.team_id, recording.requester_id, team.service.clock.now
        ),
    }


@pytest.mark.parametrize("record_fails", [False, True])
async def test_a_request_cannot_be_decided_before_its_approval_requested_is_written(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_fails: bool
) -> None:
    """Until approval.requested is written the stored request is counted under the cap but is
    not listed, shown, decided or withdrawn; so no decision precedes (or outlives) its record."""
    async with team_with_policy(store, tmp_path) as team:
        record = team.service.ctx.audit.record
        seen: dict[str, Any] = {}

        async def decide_during_record(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("action") == AuditAction.APPROVAL_REQUESTED:
                seen.update(await _try_to_decide_while_recording(team))
                if record_fails:
                    raise ServiceUnavailable("the audit log is unavailable")
            return await record(*args, **kwargs)

        monkeypatch.setattr(team.service.ctx.audit, "record", decide_during_record)
        response = await _ask(team, team.operator, RESTART)
        monkeypatch.setattr(team.service.ctx.audit, "record", record)
        assert seen["listed"] == []
        assert seen["statuses"] == [404, 404, 404, 404]
        assert seen["counted"] == 1
        refused = "approval.decision_refused"  # the three 404s (approve, deny, withdraw)
        actions = [a for a in await _actions(team) if a.startswith("approval.") and a != refused]
        assert (await _actions(team)).count(refused) == 3
        current = await store.get_approval_request(team.team_id, seen["id"])
        assert current is not None
        if record_fails:
            assert response.status_code == 503, response.text
            assert current.state is ApprovalState.WITHDRAWN
            assert current.decision_reason == UNAUDITED_REASON
            assert actions == []
        else:
            assert response.status_code == 202, response.text
            assert current.state is ApprovalState.PENDING
            assert actions == ["approval.requested"]
            assert (await _approve(team, team.approver, seen["id"])).status_code == 200
