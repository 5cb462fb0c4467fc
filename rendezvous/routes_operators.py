"""The team's operators, for its admins: list them, and disable one.

``GET /v1/operators`` lists the caller's team (id, email, role, state, created; never a key or a
token). ``POST /v1/operators/{id}/disable`` takes away everything the operator holds, as
Teleport's ``tctl lock`` does: it stops the operator's key from logging in, kills every token it
holds, revokes (in the same store transaction) every API key it created and every unused
registration key it or those API keys created, expires the team's unused invites for its email
(a second-key invite would bring the person back), withdraws its pending approval requests,
and ends the sessions it still has open: each session's agent is told over its control channel, on
whichever instance holds it (rendezvous/offer_bus.py ``end_disabled_operator_sessions``), and
ends them at once with the reason ``operator_disabled``. Approvals it granted are refused when
used (rendezvous/approval_gate.py). The answer counts what was revoked, and says when the
team's signed roster still names the operator: agents keep accepting its key (for grants the
rendezvous no longer issues) until an admin signs a new roster, which the rendezvous cannot do.
The team's last active admin cannot be disabled: nobody would be left to manage the team.
Nor, once the team signed a policy, the last active admin its signed ROSTER names as admin
(``?freeze_roster=true`` accepts it, for a compromised key): agents take a new policy or roster
only with a roster admin's signature, so nobody could change either again, and no operator
invited since could ever open a session. A team frozen so is recovered by the server admin
(``tucdesk-rendezvous team reset-policy``) and by re-enrolling each agent (docs/policy.md).
A ``--freeze-roster`` disable's ``operator.revoked`` says ``freeze_roster: true``, and
``roster_frozen: true`` when it does leave no active roster admin. A refused disable (not an
admin, no such operator in the caller's team — another team's id is answered and recorded
alike —, the last active admin, or the signed roster's) leaves an ``operator.revoke_failed``
record with the id as sent in the CALLER's team log.

There is no ``enable``: its audit record would need an action the fixed vocabulary
(audit/actions.py) does not have, and every action there ships with a new verifier. To bring an
operator back, invite them again.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter
from pydantic import BaseModel

from rendezvous.approval_gate import withdraw_requests_of_disabled
from rendezvous.audit_trail import (
    REFUSED_NOT_FOUND,
    REFUSED_NOT_PERMITTED,
    Action,
    caller_actor,
    refused_id,
)
from rendezvous.auth import Permission, Principal, authorize
from rendezvous.context import ServiceContext
from rendezvous.dependencies import Caller, Context
from rendezvous.errors import Conflict, Forbidden, NotFound, ServiceUnavailable
from rendezvous.offer_bus import end_disabled_operator_sessions
from rendezvous.store import NotFound as StoreNotFound
from rendezvous.store import Operator, StoreError
from rendezvous.store.base import LastActiveAdmin, LastRosterSigner, OperatorHoldings
from rendezvous.team_policy import TeamPolicy, current_team_policy, signing_admins

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
DISABLED_BUT_INCOMPLETE_MESSAGE = (
    "{email} IS disabled (its tokens, API keys, registration keys and invites no longer work; "
    "the operator.revoked record names them), but the audit log or the store failed after "
    "that: its pending approval requests may not be withdrawn and its sessions not ended. "
    "Repeat the disable: it withdraws them and ends the sessions"
)
FROZEN_ROSTER_MESSAGE = (
    "{email} is the last active admin of the team's signed roster: agents take a new policy or "
    "roster only with a roster admin's signature, so disabling it freezes the team's policy "
    "and roster (no operator invited since could open a session). Have {email} run "
    "`{roster_sign}` first, so the roster names another active admin; if {email}'s key is "
    "compromised, disable it anyway with --freeze-roster and recover as docs/policy.md says "
    "(the server admin's `tucdesk-rendezvous team reset-policy`, then re-enroll each agent)"
)
FROZEN_REASON = "last_signed_roster_admin"
ROSTER_FROZEN_MESSAGE = (
    "no active admin of the team's signed roster is left: nobody can sign a policy or roster "
    "its agents accept, and no operator invited since can open a session, until the server "
    "admin runs `tucdesk-rendezvous team reset-policy` and each agent is re-enrolled "
    "(docs/policy.md)"
)
ACTIVE = "active"
DISABLED = "disabled"
ROSTER_SIGN_COMMAND = "tucdesk roster sign"
ROSTER_STILL_NAMES_MESSAGE = (
    "agents still accept {email}'s key from the team's signed roster until an admin runs "
    f"`{ROSTER_SIGN_COMMAND}`: only an admin's key can sign a roster, not the rendezvous"
)


class RosterWouldFreeze(Conflict):
    """The disable would leave the team's signed roster without an active admin."""

    code = "roster_would_freeze"


class OperatorView(BaseModel):
    """One operator as an admin sees it in the list (no key material, no tokens)."""

    id: str
    email: str
    role: str
    state: str  # ACTIVE or DISABLED
    created_at: float
    disabled_at: float | None
    key_thumbprint: str  # RFC 7638: public, and what the policy roster names


class DisabledOperatorView(BaseModel):
    """``POST /v1/operators/{id}/disable``: who, and what the disable took away (ids)."""

    operator: OperatorView
    already_disabled: bool
    revoked_api_keys: list[str]
    revoked_registration_keys: list[str]
    revoked_invites: list[str]
    withdrawn_approval_requests: int
    # Set while the team's signed roster still names the operator's key: what to run.
    roster_pending: str | None
    # Set when no active admin of the signed roster is left (a --freeze-roster disable).
    roster_frozen: str | None = None


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


@router.post(OPERATORS_PATH + "/{operator_id}/disable", response_model=DisabledOperatorView)
async def disable_operator(
    operator_id: str, caller: Caller, ctx: Context, freeze_roster: bool = False
) -> DisabledOperatorView:
    """Disable an operator of the caller's team (admin): its tokens die, it cannot log in, its
    API keys, unused registration keys and invites are revoked, its pending approval requests
    are withdrawn, and its open sessions end. A repeat withdraws and ends again (no new record).
    ``freeze_roster`` accepts leaving the signed roster without an active admin."""
    try:
        authorize(caller, Permission.OPERATORS_WRITE)
    except Forbidden:
        await _record_disable_refused(ctx, caller, operator_id, {"reason": REFUSED_NOT_PERMITTED})
        raise
    operator = await ctx.store.get_operator(caller.team_id, operator_id)
    if operator is None:
        await _record_disable_refused(ctx, caller, operator_id, {"reason": REFUSED_NOT_FOUND})
        raise NotFound(NO_SUCH_OPERATOR)
    audited = False
    current = await current_team_policy(ctx, caller.team_id)
    # The keys a next bundle can be signed with: one of them must stay with an active admin.
    signer_keys = (
        None if freeze_roster or current is None
        else frozenset(current.content.roster.admin_keys())
    )  # fmt: skip
    if operator.is_active():
        if operator.role == ADMIN_ROLE and not await _another_active_admin(ctx, operator):
            await _record_disable_refused(ctx, caller, operator.id, {
                "email": operator.email, "role": operator.role, "reason": "last_active_admin"
            })  # fmt: skip
            raise Conflict(LAST_ADMIN_MESSAGE.format(email=operator.email))
        freezes = current is not None and await freezes_signed_roster(ctx, current, operator)
        if freezes and not freeze_roster:
            await _record_disable_refused(ctx, caller, operator.id, {
                "email": operator.email, "role": operator.role, "reason": FROZEN_REASON
            })  # fmt: skip
            raise _roster_would_freeze(operator)
        # No audit, no action: the record is durable before the key stops working. It is the
        # disable's one statement of what it takes away: the holdings read just now (revoked
        # unless used in the meantime; a key made meanwhile is refused at use, its creator
        # being disabled). Nothing is recorded per key after the commit.
        holdings = await ctx.store.operator_holdings(caller.team_id, operator.id, ctx.now())
        await ctx.audit.record(
            caller.team_id,
            actor=caller_actor(caller),
            action=Action.OPERATOR_REVOKED,
            target=f"operator:{operator.id}",
            details={"email": operator.email, "role": operator.role,
                     **holdings_context(holdings), **freeze_marks(freeze_roster, freezes)},
        )  # fmt: skip
        audited = True
    try:
        disabled = await ctx.store.disable_operator_and_holdings(
            caller.team_id, operator.id, ctx.now(), keep_an_active_admin=True,
            keep_a_signer=signer_keys,
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
    except LastRosterSigner:
        # Another roster admin was disabled between the check above and this one.
        if audited:
            await _record_revoke_failed(ctx, caller, operator, FROZEN_REASON)
        raise _roster_would_freeze(operator) from None
    if audited and disabled.already_disabled:
        # A concurrent disable committed between this one's read and its transaction: that
        # one's operator.revoked stands, and this one's, which revoked nothing, is withdrawn.
        await _record_revoke_failed(ctx, caller, operator, "already_disabled")
    try:
        withdrawn = await withdraw_requests_of_disabled(
            ctx, caller_actor(caller), disabled.operator,
            withdrawn_by=await ctx.store.get_operator(caller.team_id, caller.subject),
        )  # fmt: skip
    except (ServiceUnavailable, StoreError) as error:
        logger.warning("completing the disable of operator %s failed: %s",
                       operator.id, type(error).__name__)  # fmt: skip
        incomplete = DISABLED_BUT_INCOMPLETE_MESSAGE.format(email=operator.email)
        raise ServiceUnavailable(incomplete) from None
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
    return DisabledOperatorView(
        operator=operator_view(disabled.operator),
        already_disabled=disabled.already_disabled,
        revoked_api_keys=list(disabled.revoked_api_keys),
        revoked_registration_keys=list(disabled.revoked_registration_keys),
        revoked_invites=list(disabled.revoked_invites),
        withdrawn_approval_requests=withdrawn,
        roster_pending=await _roster_pending(ctx, disabled.operator),
        roster_frozen=await roster_frozen_message(ctx, caller.team_id),
    )


def freeze_marks(freeze_roster: bool, roster_frozen: bool) -> dict[str, bool]:
    """operator.revoked's marks of a disable told to accept a freeze (``freeze_roster``) and of
    one that leaves no active admin of the signed roster (``roster_frozen``); absent when not."""
    marks = {}
    if freeze_roster:
        marks["freeze_roster"] = True
    if roster_frozen:
        marks["roster_frozen"] = True
    return marks


def holdings_context(holdings: OperatorHoldings) -> dict[str, list[str]]:
    """operator.revoked's context: what the operator held that the disable revokes (ids)."""
    return {"api_keys": list(holdings.api_keys),
            "registration_keys": list(holdings.registration_keys),
            "invites": list(holdings.invites)}  # fmt: skip


async def _roster_pending(ctx: ServiceContext, operator: Operator) -> str | None:
    """What to run while the team's signed roster still names ``operator``'s key, else None."""
    team_policy = await current_team_policy(ctx, operator.team_id)
    if team_policy is None or team_policy.content.roster.entry_for(operator.key_thumbprint) is None:
        return None
    return ROSTER_STILL_NAMES_MESSAGE.format(email=operator.email)


async def roster_frozen_message(ctx: ServiceContext, team_id: str) -> str | None:
    """What recovers the team when no active admin of its signed roster is left, else None."""
    current = await current_team_policy(ctx, team_id)
    if current is None or signing_admins(current, await ctx.store.list_operators(team_id)):
        return None
    return ROSTER_FROZEN_MESSAGE


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


async def _record_disable_refused(
    ctx: ServiceContext, caller: Principal, operator_id: str, details: dict[str, str]
) -> None:
    """Record, in the caller's own team log, a disable refused before anything was done (the
    answer does not depend on whether the record could be appended)."""
    await ctx.audit.record_refusal(
        caller.team_id, actor=caller_actor(caller), action=Action.OPERATOR_REVOKE_FAILED,
        target=f"operator:{refused_id(operator_id)}", details=details,
    )  # fmt: skip


def _roster_would_freeze(operator: Operator) -> RosterWouldFreeze:
    return RosterWouldFreeze(
        FROZEN_ROSTER_MESSAGE.format(email=operator.email, roster_sign=ROSTER_SIGN_COMMAND)
    )


async def freezes_signed_roster(
    ctx: ServiceContext, current: TeamPolicy, operator: Operator
) -> bool:
    """Whether disabling ``operator`` leaves the team's signed roster ``current`` without an
    active admin (a team that never signed a policy has none: its active admins sign the first
    one)."""
    if current.content.roster.admin_keys().get(operator.key_thumbprint) is None:
        return False  # not a signer now: disabling it changes nothing about who can sign
    operators = await ctx.store.list_operators(operator.team_id)
    return not signing_admins(current, operators, excluding=operator.id)


async def _another_active_admin(ctx: ServiceContext, operator: Operator) -> bool:
    operators = await ctx.store.list_operators(operator.team_id)
    return any(
        other.role == ADMIN_ROLE and other.is_active() and other.id != operator.id
        for other in operators
    )
