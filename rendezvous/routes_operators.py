"""The team's operators, for its admins: list them, and disable one.

``GET /v1/operators`` lists the caller's team (id, email, role, state, created; never a key or a
token). ``POST /v1/operators/{id}/disable`` stops the operator's key from logging in, kills every
token it holds, and ends the sessions it still has open: each session's agent is told over its
control channel, on whichever instance holds it (rendezvous/offer_bus.py
``end_disabled_operator_sessions``), and ends them at once with the reason ``operator_disabled``.
The team's last active admin cannot be disabled: nobody would be left to manage the team.

There is no ``enable``: its audit record would need an action the fixed vocabulary
(audit/actions.py) does not have, and every action there ships with a new verifier. To bring an
operator back, invite them again.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from pydantic import BaseModel

from rendezvous.audit_trail import Action, caller_actor
from rendezvous.auth import Permission, Principal, authorize
from rendezvous.context import ServiceContext
from rendezvous.dependencies import Caller, Context
from rendezvous.errors import Conflict, NotFound, ServiceUnavailable
from rendezvous.offer_bus import end_disabled_operator_sessions
from rendezvous.store import NotFound as StoreNotFound
from rendezvous.store import Operator, StoreError
from rendezvous.store.base import LastActiveAdmin

logger = logging.getLogger("tucdesk.rendezvous.operators")

router = APIRouter(tags=["operators"])
OPERATORS_PATH = "/operators"
NO_SUCH_OPERATOR = "no such operator in your team"
ADMIN_ROLE = "admin"
LAST_ADMIN_MESSAGE = (
    "{email} is the team's last active admin: invite another admin before disabling this one"
)
ENDING_SESSIONS_FAILED_MESSAGE = (
    "{email} is disabled (its tokens no longer work), but ending its open sessions failed: "
    "each rendezvous instance retries within a minute (repeating the disable retries now)"
)
ACTIVE = "active"
DISABLED = "disabled"


class OperatorView(BaseModel):
    """One operator as an admin sees it in the list (no key material, no tokens)."""

    id: str
    email: str
    role: str
    state: str  # ACTIVE or DISABLED
    created_at: float
    disabled_at: float | None
    key_thumbprint: str  # RFC 7638: public, and what the policy roster names


class OperatorList(BaseModel):
    """``GET /v1/operators``: the caller's team's operators, by email."""

    operators: list[OperatorView]


def operator_view(operator: Operator) -> OperatorView:
    """The list entry of ``operator``."""
    return OperatorView(
        id=operator.id,
        email=operator.email,
        role=operator.role,
        state=ACTIVE if operator.is_active() else DISABLED,
        created_at=operator.created_at,
        disabled_at=operator.disabled_at,
        key_thumbprint=operator.key_thumbprint,
    )


@router.get(OPERATORS_PATH, response_model=OperatorList)
async def list_operators(caller: Caller, ctx: Context) -> OperatorList:
    """The caller's team's operators (admins: emails and roles are not every member's to see)."""
    authorize(caller, Permission.OPERATORS_WRITE)
    operators = await ctx.store.list_operators(caller.team_id)
    return OperatorList(operators=[operator_view(operator) for operator in operators])


@router.post(OPERATORS_PATH + "/{operator_id}/disable", status_code=204)
async def disable_operator(operator_id: str, caller: Caller, ctx: Context) -> None:
    """Disable an operator of the caller's team (admin): its tokens die, it cannot log in, and
    its open sessions end. Repeating it ends any session of it still open."""
    authorize(caller, Permission.OPERATORS_WRITE)
    operator = await ctx.store.get_operator(caller.team_id, operator_id)
    if operator is None:
        raise NotFound(NO_SUCH_OPERATOR)
    audited = False
    if operator.is_active():
        if operator.role == ADMIN_ROLE and not await _another_active_admin(ctx, operator):
            raise Conflict(LAST_ADMIN_MESSAGE.format(email=operator.email))
        # No audit, no action: the record is durable before the key stops working.
        await ctx.audit.record(
            caller.team_id,
            actor=caller_actor(caller),
            action=Action.OPERATOR_REVOKED,
            target=f"operator:{operator.id}",
            details={"email": operator.email, "role": operator.role},
        )
        audited = True
    try:
        await ctx.store.disable_operator(
            caller.team_id, operator.id, ctx.now(), keep_an_active_admin=True
        )
    except StoreNotFound:
        if audited:
            await _record_revoke_failed(ctx, caller, operator, "not_found")
        raise NotFound(NO_SUCH_OPERATOR) from None
    except LastActiveAdmin:
        # Another admin was disabled between the check above and this one: the revocation
        # just recorded did not happen, and the log must say so.
        if audited:
            await _record_revoke_failed(ctx, caller, operator, "last_active_admin")
        raise Conflict(LAST_ADMIN_MESSAGE.format(email=operator.email)) from None
    try:
        told = await end_disabled_operator_sessions(ctx, caller.team_id, operator.id)
    except StoreError as error:
        # The operator is disabled either way (its tokens are dead); its sessions are ended
        # by every instance's periodic sweep (rendezvous/server.py), or when each agent next
        # reports its live sessions (rendezvous/control_channel.py).
        logger.warning("ending the sessions of disabled operator %s failed: %s",
                       operator.id, type(error).__name__)  # fmt: skip
        failed = ENDING_SESSIONS_FAILED_MESSAGE.format(email=operator.email)
        raise ServiceUnavailable(failed) from None
    logger.info("operator %s disabled: asked agents here to end %d session(s)", operator.id, told)


async def _record_revoke_failed(
    ctx: ServiceContext, caller: Principal, operator: Operator, reason: str
) -> None:
    await ctx.audit.record(
        caller.team_id,
        actor=caller_actor(caller),
        action=Action.OPERATOR_REVOKE_FAILED,
        target=f"operator:{operator.id}",
        details={"email": operator.email, "role": operator.role, "reason": reason},
    )


async def _another_active_admin(ctx: ServiceContext, operator: Operator) -> bool:
    operators = await ctx.store.list_operators(operator.team_id)
    return any(
        other.role == ADMIN_ROLE and other.is_active() and other.id != operator.id
        for other in operators
    )
