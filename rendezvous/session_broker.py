"""Brokering a session (docs/sessions.md §1, §6): resolve, audit, decide, store, mint, offer.

A decision that needs approval parks the request (202, rendezvous/approval_gate.py); asked again
with the approved request's id, the session goes ahead with the signed approval in its grant.

The order is the contract: the request and the decision are in the audit log before anything
else happens; an offline agent, a missing relay or an undelivered offer is refused (and audited
as ``session.refused``); only then does the operator get the grant and its relay token.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from typing import Any, NoReturn

from audit.actions import PolicyOutcome
from audit.record import PolicyResult
from protocol.identity import b64url
from protocol.relay_token import Side, issue_relay_token
from protocol.session_grant import DEFAULT_SESSION_GRANT_LIFETIME_SECONDS, issue_session_grant
from rendezvous.approval_gate import (
    APPROVER_DISABLED_REASON,
    approver_active,
    approver_disabled_error,
    mark_executed,
    park_request,
    redeemable_approval,
)
from rendezvous.audit_trail import Action, caller_actor
from rendezvous.auth import Principal
from rendezvous.config import RelayEndpoint
from rendezvous.context import ServiceContext
from rendezvous.errors import BadRequest, Conflict, Forbidden, NotFound, ServiceUnavailable
from rendezvous.offer_bus import AGENT_REMOVED_REASON, OfferDelivery, deliver_offer
from rendezvous.session_decision import SessionAsk, SessionDecision, decide_session
from rendezvous.store import AmbiguousName, ApprovalRequest, Operator, Session, SessionState
from rendezvous.store import NotFound as StoreNotFound
from rendezvous.store.base import CONNECTION_STALE_AFTER_SECONDS, new_id
from rendezvous.team_policy import current_team_policy

SESSION_OFFER_SECONDS = DEFAULT_SESSION_GRANT_LIFETIME_SECONDS
MAX_AUDITED_COMMAND_CHARACTERS = 4096
# Reasons of sessions the rendezvous refused itself (the agent's own refusals carry its reason).
POLICY_DENIED = "policy_denied"
OPERATOR_DISABLED = "operator_disabled"
NO_RELAY_MESSAGE = "no relay is configured; start the rendezvous with --relay ID=HOST:PORT"


class AgentNotFound(NotFound):
    """No agent of the caller's team has this name or id."""

    code = "agent_not_found"


class AgentOffline(Conflict):
    """The agent has no live control channel, so it cannot be offered the session."""

    code = "agent_offline"


class NoRelay(ServiceUnavailable):
    """The rendezvous has no relay configured to carry sessions."""

    code = "no_relay"


class AmbiguousTarget(Conflict):
    """Several agents of the team carry this name."""

    code = "ambiguous_target"


@dataclass(frozen=True)
class SessionRequest:
    """A validated ``POST /v1/sessions`` body."""

    target: str
    mode: str
    command: tuple[str, ...] | None
    term: str
    rows: int
    cols: int
    approval_id: str | None = None


def choose_relay(ctx: ServiceContext) -> RelayEndpoint:
    """One of the configured relays, at random among those the last check reached
    (rendezvous/relay_health.py); NoRelay if there is none."""
    if not ctx.config.relays:
        raise NoRelay(NO_RELAY_MESSAGE)
    return ctx.relay_health.choose(ctx.config.relays)


def audited_command(command: tuple[str, ...] | None) -> dict[str, Any]:
    """The command as audit context: shell-quoted (truncated if long) plus its full hash."""
    if command is None:
        return {}
    text = shlex.join(command)
    digest = hashlib.sha256(json.dumps(list(command)).encode("utf-8")).hexdigest()
    return {
        "command": text[:MAX_AUDITED_COMMAND_CHARACTERS],
        "command_truncated": len(text) > MAX_AUDITED_COMMAND_CHARACTERS,
        "command_sha256": digest,
    }


async def open_session(
    ctx: ServiceContext, principal: Principal, request: SessionRequest
) -> tuple[int, dict[str, Any]]:
    """Broker one session for ``principal``: (201, grant answer) or (202, parked approval request).

    Raises a ServiceError when the session is refused.
    """
    session_id = new_id("ses")
    actor = caller_actor(principal)
    try:
        agent = await ctx.store.find_agent(principal.team_id, request.target)
    except AmbiguousName:
        raise AmbiguousTarget(
            f"several agents are named {request.target!r}; use the agent id"
        ) from None
    target = agent.id if agent is not None else f"agent_name:{request.target[:200]}"
    request_context: dict[str, Any] = {
        "target": request.target[:200],
        "mode": request.mode,
        "term": request.term,
        "rows": request.rows,
        "cols": request.cols,
        **audited_command(request.command),
    }
    if request.approval_id is not None:
        request_context["approval_request"] = request.approval_id[:128]
    await ctx.audit.record(
        principal.team_id, actor=actor, action=Action.SESSION_REQUESTED, target=target,
        session_id=session_id, details=request_context,
    )  # fmt: skip
    operator = None
    if principal.kind == "operator":
        operator = await ctx.store.get_operator(principal.team_id, principal.subject)
    team_policy = await current_team_policy(ctx, principal.team_id)
    ask = SessionAsk(request.target, request.mode, request.command)
    decision = decide_session(
        principal, agent, ask,
        policy=None if team_policy is None else team_policy.content,
        operator_thumbprint=None if operator is None else operator.key_thumbprint,
        now=ctx.now(),
    )  # fmt: skip
    await ctx.audit.record(
        principal.team_id, actor=actor, action=Action.SESSION_DECISION, target=target,
        session_id=session_id,
        policy_result=PolicyResult(decision.outcome, decision.rule_id, decision.reason),
        details={"policy_version": decision.policy_version},
    )  # fmt: skip
    if agent is None:
        raise AgentNotFound(f"no agent named {request.target!r} in your team")

    async def keep_refused(reason: str, now: float) -> None:
        # A refusal of a known agent by a known operator is a session row too, so
        # `tucdesk sessions --state refused` shows who tried what where, not only the audit log.
        if operator is not None:
            await ctx.store.create_session(
                refused_session(session_id, agent.team_id, agent.id, operator, request, decision,
                                reason, now)
            )  # fmt: skip

    async def refuse(reason: str, error: Exception, *, offered: Session | None = None) -> NoReturn:
        # No audit, no action: the refusal is on record before its row (new, or the ``offered``
        # one) says so.
        await ctx.audit.record(
            principal.team_id, actor=actor, action=Action.SESSION_REFUSED, target=agent.id,
            session_id=session_id, details={"reason": reason},
        )  # fmt: skip
        if offered is None:
            await keep_refused(reason, ctx.now())
        else:
            await ctx.store.update_session_state(
                offered.team_id, offered.agent_id, offered.id, SessionState.REFUSED, reason,
                ctx.now(), from_states=(SessionState.OFFERED,),
            )  # fmt: skip
        raise error

    if decision.outcome is PolicyOutcome.DENY:
        await keep_refused(POLICY_DENIED, ctx.now())
        raise Forbidden(decision.reason)
    if operator is None or not operator.is_active():
        await keep_refused(OPERATOR_DISABLED, ctx.now())
        raise Forbidden("this operator is disabled; ask an admin")
    approval: tuple[ApprovalRequest, dict[str, Any]] | None = None
    if decision.outcome is PolicyOutcome.APPROVAL_REQUIRED:
        assert team_policy is not None  # only a signed policy requires approval
        if request.approval_id is None:
            parked = await park_request(
                ctx, actor=actor, operator=operator, agent=agent, mode=request.mode,
                command=request.command, decision=decision, team_policy=team_policy,
                audited=audited_command(request.command),
            )  # fmt: skip
            return 202, parked
        approval = await redeemable_approval(
            ctx, request.approval_id, operator=operator, agent=agent, mode=request.mode,
            command=request.command, team_policy=team_policy,
        )  # fmt: skip
    elif not decision.allowed:
        await keep_refused(POLICY_DENIED, ctx.now())
        raise Forbidden(decision.reason)

    if not ctx.config.relays:
        await refuse("no_relay", NoRelay(NO_RELAY_MESSAGE))
    now = ctx.now()
    live = [
        connection
        for connection in await ctx.store.list_agent_connections(agent.team_id, agent.id)
        if connection.heartbeat_at > now - CONNECTION_STALE_AFTER_SECONDS
    ]
    if not live:
        await refuse("agent_offline", AgentOffline(f"agent {agent.name} is offline"))
    relay = choose_relay(ctx)
    if approval is not None:
        await mark_executed(ctx, actor, approval[0], session_id)

    def agent_removed() -> AgentNotFound:
        return AgentNotFound(f"agent {agent.name} was removed from your team")

    try:
        session = await ctx.store.create_session(
            Session(
                id=session_id, team_id=agent.team_id, agent_id=agent.id, operator_id=operator.id,
                operator_key_thumbprint=operator.key_thumbprint, mode=request.mode,
                command=request.command, relay_id=relay.id, relay_host=relay.host,
                relay_port=relay.port, relay_udp_port=relay.udp_port,
                policy_result=decision.outcome.value, policy_rule_id=decision.rule_id,
                state=SessionState.OFFERED, state_reason=None, created_at=now,
                expires_at=now + SESSION_OFFER_SECONDS, updated_at=now,
            )
        )  # fmt: skip
    except StoreNotFound:
        # Removed since find_agent: the store refuses the row (ordered against the removal, so
        # no session is stored once it committed). Recorded; no row to keep.
        await ctx.audit.record(
            principal.team_id, actor=actor, action=Action.SESSION_REFUSED, target=agent.id,
            session_id=session_id, details={"reason": AGENT_REMOVED_REASON},
        )  # fmt: skip
        raise agent_removed() from None
    # Checked again now that the row exists: an admin disabling the operator after the check
    # above looked up its open sessions before this one was stored, so nobody else ends it.
    # A disable committing after this check finds the row (and deliver_here checks once more).
    current = await ctx.store.get_operator(operator.team_id, operator.id)
    if current is None or not current.is_active():
        await refuse(
            OPERATOR_DISABLED, Forbidden("this operator is disabled; ask an admin"),
            offered=session,
        )  # fmt: skip
    # The agent too: a removal that committed since create_session lists this session and ends
    # it, but it must not be offered meanwhile (deliver_here checks once more).
    if await ctx.store.get_agent(agent.team_id, agent.id) is None:
        await refuse(AGENT_REMOVED_REASON, agent_removed(), offered=session)
    # The approver too: redeemable_approval checked it before mark_executed, and a disable of
    # the approver ends only the approver's own sessions, never this one.
    if approval is not None and not await approver_active(ctx, approval[0]):
        await refuse(
            APPROVER_DISABLED_REASON, approver_disabled_error(approval[0]), offered=session
        )
    grant = issue_session_grant(
        ctx.keys.jwt_issuer, issuer=ctx.config.issuer, session_id=session.id,
        team_id=agent.team_id, agent_id=agent.id, operator_id=operator.id,
        operator_email=operator.email, role=operator.role,
        operator_key_thumbprint=operator.key_thumbprint, mode=request.mode,
        command=request.command, policy_result=decision.outcome.value,
        policy_rule_id=decision.rule_id, policy_version=decision.policy_version,
        approval=None if approval is None else approval[1],
        now=now, lifetime=SESSION_OFFER_SECONDS,
    )  # fmt: skip
    operator_relay_token = issue_relay_token(
        ctx.keys.relay_token, session_id=session.id, side=Side.OPERATOR, relay_id=relay.id,
        now=now, issuer=ctx.config.issuer, lifetime=SESSION_OFFER_SECONDS,
    )  # fmt: skip
    # The newest channel is the one most likely still alive.
    delivery = await deliver_offer(ctx, session, live[-1])
    if delivery is OfferDelivery.OPERATOR_DISABLED:
        await refuse(
            OPERATOR_DISABLED, Forbidden("this operator is disabled; ask an admin"),
            offered=session,
        )  # fmt: skip
    if delivery is OfferDelivery.AGENT_REMOVED:
        await refuse(AGENT_REMOVED_REASON, agent_removed(), offered=session)
    if delivery is not OfferDelivery.SENT:
        await refuse(
            "offer_not_delivered",
            AgentOffline(f"agent {agent.name} did not take the offer; it may be reconnecting"),
            offered=session,
        )
    return 201, {
        "session_id": session.id,
        "expires_at": int(session.expires_at),
        "agent": {
            "id": agent.id,
            "name": agent.name,
            "public_key": b64url(agent.public_key),
            "fingerprint": agent.key_fingerprint,
        },
        "grant": grant,
        "relay": relay.to_json(),
        "relay_token": operator_relay_token,
    }


def refused_session(
    session_id: str,
    team_id: str,
    agent_id: str,
    operator: Operator,
    request: SessionRequest,
    decision: SessionDecision,
    reason: str,
    now: float,
) -> Session:
    """The row of a session refused before any relay was chosen (denied by policy or a disabled
    operator, no relay, agent offline): no relay, already expired. Write it after the refusal's
    audit record (no audit, no action)."""
    return Session(
        id=session_id, team_id=team_id, agent_id=agent_id, operator_id=operator.id,
        operator_key_thumbprint=operator.key_thumbprint, mode=request.mode,
        command=request.command, relay_id="", relay_host="", relay_port=0, relay_udp_port=None,
        policy_result=decision.outcome.value, policy_rule_id=decision.rule_id,
        state=SessionState.REFUSED, state_reason=reason, created_at=now, expires_at=now,
        updated_at=now,
    )  # fmt: skip


def validate_command(mode: str, command: list[str] | None) -> tuple[str, ...] | None:
    """The argv for exec (required) or None for a shell (which must not carry one)."""
    if mode == "shell":
        if command is not None:
            raise BadRequest("a shell session takes no command; use mode exec")
        return None
    if not command:
        raise BadRequest("an exec session needs a command of at least one argument")
    return tuple(command)
