"""Approval endpoints (docs/sessions.md §6): list, show, approve, deny and withdraw parked
requests.

Approvers and admins list and decide their team's pending requests; the requester may follow
their own. Approving takes the approver's signed approval of the exact request, checked against
the team's SIGNED roster just as the agent will check it; nobody approves their own request.
A decision's reason is shown on the requester's terminal, so one holding control characters is
refused (422). The gate itself is rendezvous/approval_gate.py.

A refused approval, denial or withdrawal (403, 404, 409, or 400 for a signed approval that does
not verify) leaves one ``approval.decision_refused`` record in the CALLER's team log, naming the
request id as sent and why: an approver probing ids, approving their own request or one already
decided is visible to the team's auditors. Another team's id and one that does not exist are
answered and recorded alike (``not_found``). A malformed body (422) is not recorded.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import Field

from rendezvous.approval_gate import (
    APPROVER_ROLES,
    ROLE_MAY_NOT_DECIDE,
    ApprovalInvalid,
    ApprovalUnusable,
    DecisionRefused,
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
from rendezvous.audit_trail import REFUSED_NOT_FOUND, Action, caller_actor, refused_id
from rendezvous.auth import Principal
from rendezvous.context import ServiceContext
from rendezvous.dependencies import Caller, Context
from rendezvous.errors import Forbidden, NotFound, ServiceError
from rendezvous.schemas import StrictModel
from rendezvous.store import ApprovalRequest, ApprovalState, Operator
from rendezvous.team_policy import current_team_policy

router = APIRouter(tags=["approvals"])

MAX_REASON_LENGTH = 500
# What the list shows: requests waiting for a decision, or approvals waiting to be used.
ListedState = Literal["pending", "approved"]
# The decision a refused request asked for, in its approval.decision_refused record.
Decision = Literal["approve", "deny", "withdraw"]
REFUSED_TARGET_PREFIX = "approval_request:"


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


async def _decidable(
    ctx: ServiceContext, caller: Principal, request_id: str, reason: str | None
) -> tuple[Operator, ApprovalRequest]:
    """The caller (an approver or admin) and the pending request it may approve or deny, or the
    refusal: a reason with control characters, not the caller's to decide, no longer pending,
    or a requester disabled since."""
    operator = await _operator(ctx, caller, approver=True)
    check_decision_reason(reason)
    request = await load_request(ctx, caller.team_id, request_id)
    check_may_decide(operator, request)
    check_pending(request)
    await check_requester_active(ctx, request)
    return operator, request


@router.post("/approvals/{request_id}/approve")
async def approve(
    request_id: str, body: ApproveBody, caller: Caller, ctx: Context
) -> dict[str, Any]:
    """Record an approver's signed approval of exactly this request."""
    async with _refusal_recorded(ctx, caller, request_id, "approve"):
        operator, request = await _decidable(ctx, caller, request_id, body.reason)
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
    async with _refusal_recorded(ctx, caller, request_id, "deny"):
        operator, request = await _decidable(ctx, caller, request_id, body.reason)
        decided = await decide_request(
            ctx, actor=caller_actor(caller), request=request, caller=operator,
            state=ApprovalState.DENIED, reason=body.reason, approval=None,
        )  # fmt: skip
    return await _view(ctx, decided)


@router.post("/approvals/{request_id}/withdraw")
async def withdraw(request_id: str, caller: Caller, ctx: Context) -> dict[str, Any]:
    """The requester takes back their own pending request: nobody can approve it any more, and
    it no longer counts against their pending requests."""
    async with _refusal_recorded(ctx, caller, request_id, "withdraw"):
        operator = await _operator(ctx, caller, approver=False)
        request = await load_request(ctx, caller.team_id, request_id)
        withdrawn = await withdraw_request(
            ctx, actor=caller_actor(caller), request=request, caller=operator
        )
    return await _view(ctx, withdrawn)


async def _operator(ctx: ServiceContext, caller: Principal, *, approver: bool) -> Operator:
    if caller.kind != "operator":
        raise DecisionRefused(
            "approvals are for operators, signed with their own key", "not_an_operator"
        )
    operator = await ctx.store.get_operator(caller.team_id, caller.subject)
    if operator is None or not operator.is_active():
        raise DecisionRefused("this operator is disabled; ask an admin", "operator_disabled")
    if approver and operator.role not in APPROVER_ROLES:
        raise DecisionRefused(
            f"the {operator.role} role may not approve or deny (approver or admin may)",
            ROLE_MAY_NOT_DECIDE,
        )
    return operator


def _refusal_reason(error: ServiceError) -> str | None:
    """Why a decision was refused, for its record; None when it is not a refusal to record (a
    malformed body, a failed store or log, a lost race already recorded as superseded)."""
    if isinstance(error, (DecisionRefused, ApprovalUnusable, ApprovalInvalid)):
        return error.refusal
    if isinstance(error, NotFound):
        return REFUSED_NOT_FOUND
    if isinstance(error, Forbidden):
        return "forbidden"  # a refusal without a reason code of its own: still recorded
    return None


@asynccontextmanager
async def _refusal_recorded(
    ctx: ServiceContext, caller: Principal, request_id: str, decision: Decision
) -> AsyncIterator[None]:
    """Record a refusal of the block's decision in the caller's own team log, then let the
    refusal through unchanged (also when the record could not be appended)."""
    try:
        yield
    except ServiceError as error:
        reason = _refusal_reason(error)
        if reason is not None:
            sent = refused_id(request_id)
            await ctx.audit.record_refusal(
                caller.team_id, actor=caller_actor(caller),
                action=Action.APPROVAL_DECISION_REFUSED, target=REFUSED_TARGET_PREFIX + sent,
                details={"approval_request": sent, "decision": decision, "reason": reason},
            )  # fmt: skip
        raise


async def _view(ctx: ServiceContext, request: ApprovalRequest) -> dict[str, Any]:
    agent = await ctx.store.get_agent(request.team_id, request.agent_id)
    team_policy = await current_team_policy(ctx, request.team_id)
    approvers = (
        []
        if team_policy is None
        else approvers_of(team_policy.content.roster, request.requester_email)
    )
    return approval_view(request, None if agent is None else agent.name, approvers, ctx.now())
