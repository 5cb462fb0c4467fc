"""Approval endpoints (docs/sessions.md §6): list, show, approve, deny and withdraw parked
requests.

Approvers and admins list and decide their team's pending requests; the requester may follow
their own. Approving takes the approver's signed approval of the exact request, checked against
the team's SIGNED roster just as the agent will check it; nobody approves their own request.
A decision's reason is shown on the requester's terminal, so one holding control characters is
refused (422). The gate itself is rendezvous/approval_gate.py.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import Field

from rendezvous.approval_gate import (
    APPROVER_ROLES,
    approval_view,
    approvers_of,
    check_decision_reason,
    check_may_decide,
    check_pending,
    check_requester_active,
    decide_request,
    expire_if_due,
    load_request,
    verify_submitted_approval,
    withdraw_request,
)
from rendezvous.audit_trail import caller_actor
from rendezvous.auth import Principal
from rendezvous.context import ServiceContext
from rendezvous.dependencies import Caller, Context
from rendezvous.errors import Forbidden
from rendezvous.schemas import StrictModel
from rendezvous.store import ApprovalRequest, ApprovalState, Operator
from rendezvous.team_policy import current_team_policy

router = APIRouter(tags=["approvals"])

MAX_REASON_LENGTH = 500
# What the list shows: requests waiting for a decision, or approvals waiting to be used.
ListedState = Literal["pending", "approved"]


class ApproveBody(StrictModel):
    """The approver's SignedApproval of the request (made by ``approve_request``)."""

    approval: dict[str, Any]
    reason: str | None = Field(default=None, max_length=MAX_REASON_LENGTH)


class DenyBody(StrictModel):
    """Why the request is denied (shown to the requester)."""

    reason: str | None = Field(default=None, max_length=MAX_REASON_LENGTH)


@router.get("/approvals")
async def list_approvals(
    caller: Caller, ctx: Context, state: ListedState = "pending"
) -> dict[str, Any]:
    """The team's pending approval requests (or, with ``state=approved``, the approved ones not
    used yet: what a new policy version would void), oldest first (approvers and admins)."""
    await _operator(ctx, caller, approver=True)
    wanted = ApprovalState(state)
    listed = []
    for request in await ctx.store.list_approval_requests(caller.team_id, [wanted]):
        current = await expire_if_due(ctx, request)
        if current.state is wanted:
            listed.append(await _view(ctx, current))
    return {"approvals": listed}


@router.get("/approvals/{request_id}")
async def get_approval(request_id: str, caller: Caller, ctx: Context) -> dict[str, Any]:
    """One approval request and its state (the requester, approvers and admins)."""
    operator = await _operator(ctx, caller, approver=False)
    request = await load_request(ctx, caller.team_id, request_id)
    if operator.id != request.requester_id and operator.role not in APPROVER_ROLES:
        raise Forbidden("only the requester, approvers and admins may see an approval request")
    return await _view(ctx, request)


@router.post("/approvals/{request_id}/approve")
async def approve(
    request_id: str, body: ApproveBody, caller: Caller, ctx: Context
) -> dict[str, Any]:
    """Record an approver's signed approval of exactly this request."""
    operator = await _operator(ctx, caller, approver=True)
    check_decision_reason(body.reason)
    request = await load_request(ctx, caller.team_id, request_id)
    check_may_decide(operator, request)
    check_pending(request)
    await check_requester_active(ctx, request)
    team_policy = await current_team_policy(ctx, caller.team_id)
    signed = verify_submitted_approval(body.approval, request, operator, team_policy, ctx.now())
    decided = await decide_request(
        ctx, actor=caller_actor(caller), request=request, caller=operator,
        state=ApprovalState.APPROVED, reason=body.reason, approval=signed,
    )  # fmt: skip
    return await _view(ctx, decided)


@router.post("/approvals/{request_id}/deny")
async def deny(request_id: str, body: DenyBody, caller: Caller, ctx: Context) -> dict[str, Any]:
    """Deny the request; the requester is told by whom and why."""
    operator = await _operator(ctx, caller, approver=True)
    check_decision_reason(body.reason)
    request = await load_request(ctx, caller.team_id, request_id)
    check_may_decide(operator, request)
    check_pending(request)
    await check_requester_active(ctx, request)
    decided = await decide_request(
        ctx, actor=caller_actor(caller), request=request, caller=operator,
        state=ApprovalState.DENIED, reason=body.reason, approval=None,
    )  # fmt: skip
    return await _view(ctx, decided)


@router.post("/approvals/{request_id}/withdraw")
async def withdraw(request_id: str, caller: Caller, ctx: Context) -> dict[str, Any]:
    """The requester takes back their own pending request: nobody can approve it any more, and
    it no longer counts against their pending requests."""
    operator = await _operator(ctx, caller, approver=False)
    request = await load_request(ctx, caller.team_id, request_id)
    withdrawn = await withdraw_request(
        ctx, actor=caller_actor(caller), request=request, caller=operator
    )
    return await _view(ctx, withdrawn)


async def _operator(ctx: ServiceContext, caller: Principal, *, approver: bool) -> Operator:
    if caller.kind != "operator":
        raise Forbidden("approvals are for operators, signed with their own key")
    operator = await ctx.store.get_operator(caller.team_id, caller.subject)
    if operator is None or not operator.is_active():
        raise Forbidden("this operator is disabled; ask an admin")
    if approver and operator.role not in APPROVER_ROLES:
        raise Forbidden(f"the {operator.role} role may not approve or deny (approver or admin may)")
    return operator


async def _view(ctx: ServiceContext, request: ApprovalRequest) -> dict[str, Any]:
    agent = await ctx.store.get_agent(request.team_id, request.agent_id)
    team_policy = await current_team_policy(ctx, request.team_id)
    approvers = (
        []
        if team_policy is None
        else approvers_of(team_policy.content.roster, request.requester_email)
    )
    return approval_view(request, None if agent is None else agent.name, approvers, ctx.now())
