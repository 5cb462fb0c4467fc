"""The approval gate (docs/sessions.md §6): park a request, decide it, redeem it exactly once.

A session request whose decision is ``approval_required`` is parked as an approval request. An
approver's CLI signs the exact request (protocol.policy.approve_request); the rendezvous checks
that signature against the team's SIGNED roster — as the agent will — and stores it. The
requester then asks again with the request id; the stored approval goes into the session grant
and the request is marked executed, so it is used once. Every step is audited; a request whose
time runs out is marked expired (and audited) the next time anyone looks at it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from audit.actions import PolicyOutcome
from audit.record import PolicyResult
from protocol.policy import (
    Action as PolicyAction,
)
from protocol.policy import (
    ApprovalContext,
    ApprovalError,
    ApprovalExpiredError,
    ApprovalMismatchError,
    ApproverNotAuthorizedError,
    Roster,
    SelfApprovalError,
    SignedApproval,
    command_sha256,
    verify_approval,
)
from rendezvous.audit_trail import Action, Actor, operator_actor, service_actor
from rendezvous.context import ServiceContext
from rendezvous.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    ServiceError,
    ServiceUnavailable,
    TooManyRequests,
)
from rendezvous.session_decision import SessionDecision
from rendezvous.store import Agent, ApprovalRequest, ApprovalState, Operator
from rendezvous.store.base import StoreError, TooManyPendingRequests, new_id
from rendezvous.team_policy import TeamPolicy

logger = logging.getLogger("tucdesk.rendezvous.approvals")

APPROVAL_REQUEST_SECONDS = 15 * 60
APPROVER_ROLES = frozenset({"approver", "admin"})
# One operator's waiting requests may not bury everyone else's in the approvers' list.
MAX_PENDING_REQUESTS_PER_OPERATOR = 20
PENDING_CAP_RETRY_AFTER_SECONDS = 60.0
# The decision reason of a request withdrawn because its approval.requested was not recorded.
UNAUDITED_REASON = "not recorded in the audit log; ask again"
# Why a disabled operator's pending requests are withdrawn (audited and stored as the reason),
# and why an approval is refused at use once the approver is disabled.
OPERATOR_DISABLED_REASON = "operator_disabled"
APPROVER_DISABLED_REASON = "approver_disabled"
# Reasons of approval.decision_refused records given in more than one place.
ROLE_MAY_NOT_DECIDE = "role_may_not_decide"
OWN_REQUEST = "own_request"


class ApprovalPending(Conflict):
    """The request has not been approved (yet)."""

    code = "approval_pending"


class ApprovalUnusable(Conflict):
    """The approval request cannot be used: expired, already used, or for something else.

    ``refusal`` is the reason a refused decision's ``approval.decision_refused`` record gives;
    None where the refusal is recorded otherwise (``approval.superseded``).
    """

    code = "approval_unusable"

    def __init__(self, message: str, refusal: str | None = "unusable") -> None:
        super().__init__(message)
        self.refusal = refusal


class DecisionRefused(Forbidden):
    """The caller may not make this decision or withdrawal (a plain 403 ``forbidden``);
    ``refusal`` is the reason its ``approval.decision_refused`` record gives."""

    def __init__(self, message: str, refusal: str) -> None:
        super().__init__(message)
        self.refusal = refusal


class ApprovalInvalid(BadRequest):
    """The submitted signed approval does not verify for this request (a plain 400)."""

    refusal = "approval_invalid"


class ApprovalDenied(Forbidden):
    """An approver denied the request."""

    code = "approval_denied"


class TooManyPendingApprovals(TooManyRequests):
    """The requester already has MAX_PENDING_REQUESTS_PER_OPERATOR requests waiting."""

    code = "too_many_pending_approvals"


class UnshowableReason(ServiceError):
    """A decision's reason holds characters a terminal would act on rather than print."""

    status = 422
    code = "invalid_request"


def check_decision_reason(reason: str | None) -> None:
    """Refuse a reason the requester's terminal would act on (escape codes, line breaks, bidi
    overrides): it is shown to them while they wait, and must not repaint their screen."""
    if reason is not None and not reason.isprintable():
        raise UnshowableReason(
            "reason: must be one line of printable text; it holds a control or formatting "
            "character (an escape code, line break or bidi override), which is refused"
        )


def approvers_of(roster: Roster, requester_email: str) -> list[str]:
    """Emails whose signed-roster role may approve, the requester excluded, sorted."""
    return sorted(
        {
            entry.email
            for entry in roster.entries
            if roster.may_approve(entry.thumbprint) and entry.email != requester_email.lower()
        }
    )


def approval_context(request: ApprovalRequest) -> ApprovalContext:
    """What an approval of ``request`` must be for, from the rendezvous's own record of it."""
    return ApprovalContext(
        request_id=request.id,
        team_id=request.team_id,
        agent_id=request.agent_id,
        action=PolicyAction(request.mode),
        command=request.command,
        requester_thumbprint=request.requester_thumbprint,
        policy_version=request.policy_version,
    )


def approval_view(
    request: ApprovalRequest, agent_name: str | None, approvers: Sequence[str], now: float
) -> dict[str, Any]:
    """A request as the requester and approvers see it (with what an approver's CLI signs)."""
    return {
        "id": request.id,
        "state": request.state.value,
        "team_id": request.team_id,
        "requester": {"id": request.requester_id, "email": request.requester_email},
        "requester_thumbprint": request.requester_thumbprint,
        "agent": {"id": request.agent_id, "name": agent_name},
        "action": request.mode,
        "command": None if request.command is None else list(request.command),
        "command_sha256": request.command_sha256,
        "policy_version": request.policy_version,
        "rule_id": request.rule_id,
        "reason": request.reason,
        "approvers": list(approvers),
        "created_at": request.created_at,
        "expires_at": request.expires_at,
        "age_seconds": max(0, int(now - request.created_at)),
        "decided_by": request.decided_by_email,
        "decision_reason": request.decision_reason,
        "session_id": request.session_id,
    }


async def park_request(
    ctx: ServiceContext,
    *,
    actor: Actor,
    operator: Operator,
    agent: Agent,
    mode: str,
    command: tuple[str, ...] | None,
    decision: SessionDecision,
    team_policy: TeamPolicy,
    audited: dict[str, Any],
) -> dict[str, Any]:
    """Park a request that needs approval; return the 202 answer (audited before it is)."""
    now = ctx.now()
    request = ApprovalRequest(
        id=new_id("apr"), team_id=agent.team_id, agent_id=agent.id, requester_id=operator.id,
        requester_email=operator.email, requester_thumbprint=operator.key_thumbprint,
        mode=mode, command=command, command_sha256=command_sha256(command),
        policy_version=team_policy.version, rule_id=decision.rule_id, reason=decision.reason,
        state=ApprovalState.RECORDING, created_at=now,
        expires_at=now + APPROVAL_REQUEST_SECONDS,
    )  # fmt: skip
    approvers = approvers_of(team_policy.content.roster, operator.email)
    if not approvers:
        raise Forbidden(
            f"{decision.reason}; but nobody else in the team's signed roster may approve it"
        )
    waiting = await ctx.store.count_pending_approval_requests(agent.team_id, operator.id, now)
    if waiting >= MAX_PENDING_REQUESTS_PER_OPERATOR:
        raise _too_many_pending(waiting)
    # Counted again and stored in one transaction, so concurrent requests cannot all slip under
    # the cap; stored before its audit record so that a request refused by the cap leaves none.
    # It is stored RECORDING (counted, but nobody can see, decide or redeem it) and becomes
    # pending only once approval.requested is written, so no decision can precede that record.
    try:
        await ctx.store.create_approval_request(
            request, max_pending=MAX_PENDING_REQUESTS_PER_OPERATOR
        )
    except TooManyPendingRequests as error:
        raise _too_many_pending(error.pending) from None
    try:
        await ctx.audit.record(
            agent.team_id, actor=actor, action=Action.APPROVAL_REQUESTED, target=agent.id,
            policy_result=PolicyResult(decision.outcome, decision.rule_id, decision.reason),
            details={
                "approval_request": request.id, "mode": mode, "approvers": approvers,
                "policy_version": team_policy.version, "expires_at": int(request.expires_at),
                **audited,
            },
        )  # fmt: skip
    except ServiceUnavailable:
        # No audit, no action: a request the log does not know of must never be decided.
        await _retract_unaudited(ctx, request, operator)
        raise
    published = await ctx.store.publish_approval_request(request.team_id, request.id)
    if published is None:
        # Nothing else moves a RECORDING request, so only a vanished row lands here; it is
        # recorded as requested but can never be decided or used.
        logger.error("approval request %s was not recording when published", request.id)
        raise ServiceUnavailable("the approval request could not be stored; ask again")
    # Checked again once pending: a disable that committed while this request was RECORDING
    # withdrew only the requests pending then. One committing after this check finds it.
    requester = await ctx.store.get_operator(operator.team_id, operator.id)
    if requester is None or not requester.is_active():
        await _withdraw_of_disabled(ctx, actor, published, withdrawn_by=None)
        raise Forbidden("this operator is disabled; ask an admin")
    return {
        "approval_request": {
            "id": request.id,
            "expires_at": int(request.expires_at),
            "approvers": approvers,
            "reason": decision.reason,
            "rule_id": decision.rule_id,
        }
    }


def _too_many_pending(waiting: int) -> TooManyPendingApprovals:
    return TooManyPendingApprovals(
        f"you already have {waiting} approval requests pending (at most "
        f"{MAX_PENDING_REQUESTS_PER_OPERATOR} at a time); each expires "
        f"{APPROVAL_REQUEST_SECONDS // 60} minutes after it was made: use the ones you have, "
        "or withdraw those no longer needed (tucdesk approvals withdraw ID)",
        retry_after=PENDING_CAP_RETRY_AFTER_SECONDS,
    )


async def _retract_unaudited(
    ctx: ServiceContext, request: ApprovalRequest, operator: Operator
) -> None:
    """Withdraw a just-stored request whose ``approval.requested`` could not be recorded."""
    try:
        withdrawn = await ctx.store.withdraw_unrecorded_approval_request(
            request.team_id, request.id, decided_by=operator.id,
            decided_by_email=operator.email, reason=UNAUDITED_REASON, now=ctx.now(),
        )  # fmt: skip
    except StoreError as error:
        # The store failing too: the request stays RECORDING until it expires, holding one
        # place under the cap; nobody can see, decide or redeem it meanwhile.
        logger.error("withdrawing unaudited approval request %s failed: %s",
                     request.id, type(error).__name__)  # fmt: skip
        return
    if withdrawn is None:
        # Nothing else moves a RECORDING request; say so rather than assume it withdrawn.
        logger.error("unaudited approval request %s was not recording when withdrawn",
                     request.id)  # fmt: skip


async def expire_if_due(ctx: ServiceContext, request: ApprovalRequest) -> ApprovalRequest:
    """Mark a pending or unused approved request past its time expired (audited); return it now."""
    now = ctx.now()
    waiting = (ApprovalState.PENDING, ApprovalState.APPROVED)
    if request.state not in waiting or now < request.expires_at:
        return request
    await ctx.audit.record(
        request.team_id, actor=service_actor("approval expiry"), action=Action.APPROVAL_EXPIRED,
        target=request.agent_id, details={"approval_request": request.id},
    )  # fmt: skip
    expired = await ctx.store.expire_approval_request(request.team_id, request.id, now)
    if expired is not None:
        return expired
    await _record_superseded(
        ctx, service_actor("approval expiry"), request, Action.APPROVAL_EXPIRED
    )
    current = await ctx.store.get_approval_request(request.team_id, request.id)
    return current or request


async def load_request(ctx: ServiceContext, team_id: str, request_id: str) -> ApprovalRequest:
    """The team's approval request (expired lazily); NotFound if there is none."""
    request = await ctx.store.get_approval_request(team_id, request_id[:128])
    # A RECORDING request is not in the audit log yet: as far as anyone can tell, not there.
    if request is None or request.state is ApprovalState.RECORDING:
        raise NotFound("no such approval request in your team")
    return await expire_if_due(ctx, request)


def check_may_decide(caller: Operator, request: ApprovalRequest) -> None:
    """Forbidden unless the caller holds an approving role and is not the requester."""
    if caller.role not in APPROVER_ROLES:
        raise DecisionRefused(
            f"the {caller.role} role may not approve or deny (approver or admin may)",
            ROLE_MAY_NOT_DECIDE,
        )
    if caller.id == request.requester_id or caller.email.lower() == request.requester_email:
        raise DecisionRefused("nobody may approve or deny their own request", OWN_REQUEST)


def check_pending(request: ApprovalRequest) -> None:
    """Conflict unless the request still waits for a decision."""
    if request.state is not ApprovalState.PENDING:
        raise ApprovalUnusable(
            f"the approval request is already {request.state.value}",
            f"already_{request.state.value}",
        )


async def check_requester_active(ctx: ServiceContext, request: ApprovalRequest) -> None:
    """Conflict if the request's requester was disabled: nobody decides for them any more (a
    request parked while the disable committed escapes its withdrawal, not this check)."""
    requester = await ctx.store.get_operator(request.team_id, request.requester_id)
    if requester is None or not requester.is_active():
        raise ApprovalUnusable(
            f"{request.requester_email} is disabled: their request can no longer be approved "
            "or denied",
            "requester_disabled",
        )


async def withdraw_requests_of_disabled(
    ctx: ServiceContext, actor: Actor, operator: Operator, *, withdrawn_by: Operator | None
) -> int:
    """Withdraw every pending request of ``operator``, just disabled (each audited first, reason
    ``operator_disabled``); return how many were withdrawn."""
    pending = await ctx.store.list_approval_requests(operator.team_id, [ApprovalState.PENDING])
    withdrawn = 0
    for request in pending:
        if request.requester_id != operator.id:
            continue
        if await _withdraw_of_disabled(ctx, actor, request, withdrawn_by=withdrawn_by):
            withdrawn += 1
    return withdrawn


async def _withdraw_of_disabled(
    ctx: ServiceContext, actor: Actor, request: ApprovalRequest, *, withdrawn_by: Operator | None
) -> bool:
    """Withdraw one pending request of a disabled requester (audited first); False if it was
    decided meanwhile (then ``approval.superseded`` follows)."""
    await ctx.audit.record(
        request.team_id, actor=actor, action=Action.APPROVAL_WITHDRAWN,
        target=request.agent_id,
        details={"approval_request": request.id, "requester": request.requester_email,
                 "policy_version": request.policy_version,
                 "reason": OPERATOR_DISABLED_REASON},
    )  # fmt: skip
    decided = await ctx.store.decide_approval_request(
        request.team_id, request.id, ApprovalState.WITHDRAWN,
        decided_by=withdrawn_by.id if withdrawn_by else "service",
        decided_by_email=withdrawn_by.email if withdrawn_by else "",
        reason=OPERATOR_DISABLED_REASON, approval=None, now=ctx.now(),
    )  # fmt: skip
    if decided is None:
        await _record_superseded(ctx, actor, request, Action.APPROVAL_WITHDRAWN)
        return False
    return True


def verify_submitted_approval(
    submitted: object,
    request: ApprovalRequest,
    caller: Operator,
    team_policy: TeamPolicy | None,
    now: float,
) -> SignedApproval:
    """The approver's signed approval, checked as the agent will check it; else an error."""
    if team_policy is None or team_policy.version != request.policy_version:
        raise ApprovalUnusable(
            "the team's policy changed since this request; the requester must ask again",
            "policy_changed",
        )
    try:
        signed = SignedApproval.from_json(submitted)
        verify_approval(signed, approval_context(request), team_policy.content.roster, now)
    except SelfApprovalError:
        raise DecisionRefused("nobody may approve their own request", OWN_REQUEST) from None
    except ApproverNotAuthorizedError as error:
        raise DecisionRefused(f"approval refused: {error}", "approver_not_in_roster") from None
    except (ApprovalMismatchError, ApprovalExpiredError) as error:
        raise ApprovalInvalid(f"approval refused: {error}") from None
    except ApprovalError as error:
        raise ApprovalInvalid(f"approval refused: {error}") from None
    if signed.statement.approver_thumbprint != caller.key_thumbprint:
        raise DecisionRefused("sign the approval with your own operator key", "not_own_key")
    return signed


async def decide_request(
    ctx: ServiceContext,
    *,
    actor: Actor,
    request: ApprovalRequest,
    caller: Operator,
    state: ApprovalState,
    reason: str | None,
    approval: SignedApproval | None,
) -> ApprovalRequest:
    """Record an approval or denial (audited first); Conflict if someone else decided first
    (then an ``approval.superseded`` record follows the one this call wrote)."""
    approved = state is ApprovalState.APPROVED
    await ctx.audit.record(
        request.team_id, actor=actor,
        action=Action.APPROVAL_APPROVED if approved else Action.APPROVAL_DENIED,
        target=request.agent_id,
        policy_result=PolicyResult(
            PolicyOutcome.APPROVED if approved else PolicyOutcome.DENIED, request.rule_id,
            reason or ("approved" if approved else "denied"),
        ),
        details={
            "approval_request": request.id, "requester": request.requester_email,
            "reason": reason or "", "policy_version": request.policy_version,
        },
    )  # fmt: skip
    decided = await ctx.store.decide_approval_request(
        request.team_id, request.id, state, decided_by=caller.id,
        decided_by_email=caller.email, reason=reason,
        approval=None if approval is None else json.dumps(approval.to_json()), now=ctx.now(),
        expires_at=None if approval is None else float(approval.statement.expires_at),
    )  # fmt: skip
    if decided is None:
        audited_as = Action.APPROVAL_APPROVED if approved else Action.APPROVAL_DENIED
        await _record_superseded(ctx, actor, request, audited_as)
        raise ApprovalUnusable("the approval request was decided or expired meanwhile", None)
    return decided


async def withdraw_request(
    ctx: ServiceContext, *, actor: Actor, request: ApprovalRequest, caller: Operator
) -> ApprovalRequest:
    """The requester takes back a pending request (audited first); Forbidden for anyone else,
    Conflict if it was decided or expired meanwhile (then ``approval.superseded`` follows)."""
    if caller.id != request.requester_id:
        raise DecisionRefused(
            "only the operator who made a request may withdraw it", "not_requester"
        )
    check_pending(request)
    await ctx.audit.record(
        request.team_id, actor=actor, action=Action.APPROVAL_WITHDRAWN, target=request.agent_id,
        details={"approval_request": request.id, "requester": request.requester_email,
                 "policy_version": request.policy_version},
    )  # fmt: skip
    withdrawn = await ctx.store.decide_approval_request(
        request.team_id, request.id, ApprovalState.WITHDRAWN, decided_by=caller.id,
        decided_by_email=caller.email, reason="withdrawn by the requester", approval=None,
        now=ctx.now(),
    )  # fmt: skip
    if withdrawn is None:
        await _record_superseded(ctx, actor, request, Action.APPROVAL_WITHDRAWN)
        raise ApprovalUnusable("the approval request was decided or expired meanwhile", None)
    return withdrawn


async def _record_superseded(
    ctx: ServiceContext, actor: Actor, request: ApprovalRequest, audited_as: Action
) -> None:
    """Follow a decision or withdrawal that lost the race to the request's conditional update
    with ``approval.superseded`` naming the state that won, so the log never claims it."""
    current = await ctx.store.get_approval_request(request.team_id, request.id)
    state = "missing" if current is None else current.state.value
    await ctx.audit.record(
        request.team_id, actor=actor, action=Action.APPROVAL_SUPERSEDED,
        target=request.agent_id,
        details={"approval_request": request.id, "audited_as": audited_as.value, "state": state},
    )  # fmt: skip


async def redeemable_approval(
    ctx: ServiceContext,
    request_id: str,
    *,
    operator: Operator,
    agent: Agent,
    mode: str,
    command: tuple[str, ...] | None,
    team_policy: TeamPolicy,
) -> tuple[ApprovalRequest, dict[str, Any]]:
    """The approved request ``request_id`` and its signed approval, if it is for exactly this.

    Raises NotFound, Forbidden (someone else's, or denied) or Conflict (pending, expired, used,
    or for another agent, action, command or policy version).
    """
    request = await load_request(ctx, operator.team_id, request_id)
    if request.requester_id != operator.id:
        raise Forbidden("this approval request was made by someone else")
    if request.state is ApprovalState.DENIED:
        by = request.decided_by_email or "an approver"
        why = f": {request.decision_reason}" if request.decision_reason else ""
        raise ApprovalDenied(f"the request was denied by {by}{why}")
    if request.state is ApprovalState.PENDING:
        raise ApprovalPending("the request is still waiting for an approver")
    if request.state is ApprovalState.EXPIRED:
        raise ApprovalUnusable("the approval request has expired; ask again")
    if request.state is ApprovalState.WITHDRAWN:
        raise ApprovalUnusable("you withdrew this approval request; ask again")
    if request.state is not ApprovalState.APPROVED or request.approval is None:
        raise ApprovalUnusable(f"the approval request is {request.state.value}")
    if (
        request.agent_id != agent.id
        or request.mode != mode
        or request.command_sha256 != command_sha256(command)
    ):
        raise ApprovalUnusable("the approval is for another agent, action or command")
    if request.policy_version != team_policy.version:
        raise ApprovalUnusable("the team's policy changed since the approval; ask again")
    await _check_approver_active(ctx, request, operator, agent)
    try:
        approval = json.loads(request.approval)
        verify_approval(
            approval, approval_context(request), team_policy.content.roster, ctx.now()
        )
    except ApprovalExpiredError:
        raise ApprovalUnusable("the approval has expired; ask again") from None
    except (ApprovalError, ValueError):
        raise ApprovalUnusable("the stored approval no longer verifies; ask again") from None
    return request, approval


async def _check_approver_active(
    ctx: ServiceContext, request: ApprovalRequest, requester: Operator, agent: Agent
) -> None:
    """Refuse (audited) an approval whose approver was disabled since. The agent's signed
    roster still names the approver until an admin signs a new one, so the rendezvous is where
    this is refused; the broker checks again once the session row exists (a disable racing
    this check), see ``approver_active``."""
    if await approver_active(ctx, request):
        return
    await ctx.audit.record(
        request.team_id, actor=operator_actor(requester), action=Action.SESSION_REFUSED,
        target=agent.id,
        details={"reason": APPROVER_DISABLED_REASON, "approval_request": request.id,
                 "approved_by": request.decided_by_email or ""},
    )  # fmt: skip
    raise approver_disabled_error(request)


async def approver_active(ctx: ServiceContext, request: ApprovalRequest) -> bool:
    """Whether the operator who approved ``request`` is still enabled."""
    approver = (
        None
        if request.decided_by is None
        else await ctx.store.get_operator(request.team_id, request.decided_by)
    )
    return approver is not None and approver.is_active()


def approver_disabled_error(request: ApprovalRequest) -> ApprovalUnusable:
    """What the requester reads when the approver of ``request`` was disabled."""
    by = request.decided_by_email or "the approver"
    return ApprovalUnusable(f"the approver ({by}) was disabled; ask again")


async def mark_executed(
    ctx: ServiceContext, actor: Actor, request: ApprovalRequest, session_id: str
) -> None:
    """Use the approval for ``session_id`` (once: Conflict if it was used meanwhile), audited."""
    executed = await ctx.store.execute_approval_request(
        request.team_id, request.id, session_id, ctx.now()
    )
    if executed is None:
        raise ApprovalUnusable("the approval was used meanwhile")
    await ctx.audit.record(
        request.team_id, actor=actor, action=Action.APPROVAL_EXECUTED, target=request.agent_id,
        session_id=session_id,
        details={"approval_request": request.id, "approved_by": request.decided_by_email or ""},
    )  # fmt: skip
