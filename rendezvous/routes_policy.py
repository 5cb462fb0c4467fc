"""Policy endpoints (docs/sessions.md §6): ``GET/PUT /v1/policy`` and ``POST /v1/policy/test``.

``PUT`` takes a bundle an admin signed on their own machine. The rendezvous checks the signature
against its own view of the team (the admins of the signed roster in force, or the current admins
before the first bundle), that the version is exactly the next one and chains to the bundle in
force, countersigns, audits (``policy.set`` with the old and new hashes, or ``roster.signed`` when
only the roster or agent tags changed), stores, and pushes it to the team's online agents. The
record comes before the store (no audit, no action), so when the store then fails (another admin
stored that version first, or the database failed) a ``policy.set_failed`` record follows it:
the log never claims a bundle took effect that did not. A bundle whose roster names no active
admin as admin (nobody could sign the next one) is refused, 409 ``roster_would_freeze`` and
audited ``policy.set_failed`` with that reason, unless ``?freeze_roster=true`` accepts it.
After ``team reset-policy`` the new chain's first bundle follows the retired chain's last
version (numbering goes on), so no agent, grant or approval can take one chain's version N for
the other's.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import Field

from protocol.exec_limits import MAX_COMMAND_ARGUMENTS
from protocol.policy import (
    AccessRequest,
    Action,
    MalformedBundleError,
    PolicyBundleError,
    RollbackError,
    SignedPolicyBundle,
    TargetAgent,
    TeamMismatchError,
    UntrustedSignerError,
    countersign_policy_bundle,
    decide,
)
from protocol.session_grant import MAX_ARGUMENT_SIZE
from rendezvous.audit_trail import Action as AuditAction
from rendezvous.audit_trail import caller_actor
from rendezvous.auth import Permission, Principal, authorize
from rendezvous.context import ServiceContext
from rendezvous.dependencies import Caller, Context
from rendezvous.errors import BadRequest, Conflict, Forbidden, NotFound, ServiceUnavailable
from rendezvous.policy_distribution import publish_policy
from rendezvous.routes_operators import RosterWouldFreeze
from rendezvous.schemas import StrictModel
from rendezvous.session_decision import INTERIM_RULE_ID, SESSION_ROLES
from rendezvous.store import AlreadyExists, AmbiguousName, StoredPolicyBundle, StoreError
from rendezvous.team_policy import (
    TeamPolicy,
    chain_version,
    current_team_policy,
    pending_agent_tags,
    pending_roster,
    rendezvous_trust,
    roster_signers,
    signing_admins,
)

logger = logging.getLogger("tucdesk.rendezvous.policy")

router = APIRouter(tags=["policy"])

MAX_TARGET_LENGTH = 255
MAX_EMAIL_LENGTH = 254


class PolicyUpload(StrictModel):
    """A bundle an admin signed (not yet countersigned)."""

    bundle: dict[str, Any]


class PolicyTestBody(StrictModel):
    """A what-if question for the policy in force."""

    operator: str = Field(min_length=3, max_length=MAX_EMAIL_LENGTH)
    agent: str = Field(min_length=1, max_length=MAX_TARGET_LENGTH)
    action: Literal["shell", "exec"]
    command: list[str] | None = Field(default=None, max_length=MAX_COMMAND_ARGUMENTS)
    at: datetime | None = None


ROSTER_WOULD_FREEZE_REASON = "roster_would_freeze"
ROSTER_WOULD_FREEZE_MESSAGE = (
    "the roster of version {version} names no active admin as admin: nobody could sign the "
    "version after it, so the team's policy and roster would be frozen (no operator invited "
    "since could open a session) until the server admin's `tucdesk-rendezvous team "
    "reset-policy` and each agent's re-enrollment. Sign a roster that names an active admin "
    "(`tucdesk roster sign` takes the team as it is now); to freeze it on purpose, for a "
    "compromised key, sign it with --freeze-roster"
)


class PolicyVersionRace(Conflict):
    """Another bundle was stored first, or the bundle does not follow the one in force."""

    code = "policy_version_conflict"


@router.get("/policy")
async def get_policy(caller: Caller, ctx: Context) -> dict[str, Any]:
    """The team's bundle in force (or null), its version, and what a new signature would hold."""
    authorize(caller, Permission.AGENTS_READ)
    current = await current_team_policy(ctx, caller.team_id)
    return {
        "bundle": None if current is None else current.bundle.to_json(),
        # Without a bundle in force: 0, or the last version of a retired chain (the new first
        # bundle follows it), so the CLI's "next version = version + 1" holds either way.
        "version": await chain_version(ctx, caller.team_id, current),
        "pending": {
            "roster": await pending_roster(ctx, caller.team_id),
            "agent_tags": await pending_agent_tags(ctx, caller.team_id),
        },
    }


@router.put("/policy")
async def put_policy(
    body: PolicyUpload, caller: Caller, ctx: Context, freeze_roster: bool = False
) -> dict[str, Any]:
    """Countersign, store and distribute the next version of the team's signed bundle.
    ``freeze_roster`` accepts a roster naming no active admin (nobody could sign the next)."""
    _require_admin(caller)
    try:
        signed = SignedPolicyBundle.from_json(body.bundle)
    except MalformedBundleError as error:
        raise BadRequest(str(error)) from None
    content = signed.content
    if content.team_id != caller.team_id:
        raise BadRequest("the bundle is for another team; sign one for your own team")
    current = await current_team_policy(ctx, caller.team_id)
    current_version = await chain_version(ctx, caller.team_id, current)
    if content.version != current_version + 1:
        where = (
            f"the team's policy is at version {current_version}" if current is not None
            or current_version == 0
            else f"the team's policy chain was retired at version {current_version} (team "
            "reset-policy); numbering goes on, so agents holding the old chain refuse the new"
        )  # fmt: skip
        raise PolicyVersionRace(
            f"{where}; the next bundle must be version {current_version + 1}, not {content.version}"
        )
    if current is not None and (
        content.previous_sha256 is None
        or not hmac.compare_digest(content.previous_sha256, current.stored.content_sha256)
    ):
        raise PolicyVersionRace(
            f"the bundle does not follow version {current_version} (previous_sha256); "
            "fetch the policy again and re-sign"
        )
    trust = await rendezvous_trust(ctx, caller.team_id, current)
    if trust is None:
        raise Forbidden("the team has no admin who could sign a policy")
    try:
        accepted = countersign_policy_bundle(signed, ctx.keys.policy_signer, trust)
    except UntrustedSignerError as error:
        frozen = "" if current is None else await roster_frozen_hint(ctx, caller.team_id, current)
        raise Forbidden(f"{error}; only an admin of the signed roster may sign{frozen}") from None
    except RollbackError as error:
        raise PolicyVersionRace(str(error)) from None
    except (TeamMismatchError, PolicyBundleError) as error:
        raise BadRequest(str(error)) from None
    countersigned = accepted.bundle
    new_sha = content.sha256()
    roster_only = current is not None and _same_policy(current, countersigned)
    audited_as = AuditAction.ROSTER_SIGNED if roster_only else AuditAction.POLICY_SET
    freezes = not roster_signers(content.roster, await ctx.store.list_operators(caller.team_id))
    if freezes and not freeze_roster:
        await ctx.audit.record_refusal(
            caller.team_id, actor=caller_actor(caller), action=AuditAction.POLICY_SET_FAILED,
            target=f"policy:{caller.team_id}",
            details={"audited_as": audited_as.value, "version": content.version,
                     "sha256": new_sha, "reason": ROSTER_WOULD_FREEZE_REASON},
        )  # fmt: skip
        raise RosterWouldFreeze(ROSTER_WOULD_FREEZE_MESSAGE.format(version=content.version))
    marks = {"freeze_roster": True, "roster_frozen": True} if freezes else {}
    await ctx.audit.record(
        caller.team_id, actor=caller_actor(caller), action=audited_as,
        target=f"policy:{caller.team_id}",
        details={
            "old_version": current_version,
            "new_version": content.version,
            "old_sha256": None if current is None else current.stored.content_sha256,
            "new_sha256": new_sha,
            "policy_sha256": content.policy_sha256,
            "signed_by": signed.admin_key_id,
            "roster_size": len(content.roster.entries),
            **marks,
        },
    )  # fmt: skip
    try:
        await ctx.store.store_policy_bundle(
            StoredPolicyBundle(
                team_id=caller.team_id, version=content.version, content_sha256=new_sha,
                policy_sha256=content.policy_sha256,
                bundle=countersigned.to_bytes().decode("utf-8"),
                admin_key_id=signed.admin_key_id, created_by=caller.subject,
                created_at=ctx.now(),
            )
        )  # fmt: skip
    except AlreadyExists:
        await _record_not_stored(
            ctx, caller, audited_as, content.version, new_sha,
            f"another bundle was stored as version {content.version} first",
        )  # fmt: skip
        raise PolicyVersionRace(
            "another policy version was stored meanwhile; fetch it and re-sign"
        ) from None
    except StoreError as error:
        # The outcome may be unknown (a connection lost mid-commit), hence "not confirmed".
        await _record_not_stored(
            ctx, caller, audited_as, content.version, new_sha,
            f"the store did not confirm it ({type(error).__name__})",
        )  # fmt: skip
        raise
    await publish_policy(ctx, caller.team_id)
    return {
        "version": content.version,
        "sha256": new_sha,
        "kind": "roster" if roster_only else "policy",
        "bundle": countersigned.to_json(),
    }


@router.post("/policy/test")
async def test_policy(body: PolicyTestBody, caller: Caller, ctx: Context) -> dict[str, Any]:
    """What the policy in force decides for an operator, agent, action and command (and why)."""
    authorize(caller, Permission.AGENTS_READ)
    command = _command(body.action, body.command)
    try:
        agent = await ctx.store.find_agent(caller.team_id, body.agent)
    except AmbiguousName:
        raise Conflict(f"several agents are named {body.agent!r}; use the agent id") from None
    if agent is None:
        raise NotFound(f"no agent named {body.agent!r} in your team")
    when = ctx.now() if body.at is None else body.at
    if isinstance(when, datetime) and when.tzinfo is None:
        raise BadRequest("give --at with a time zone offset, e.g. 2026-11-26T09:00:00+01:00")
    email = body.operator.lower()
    current = await current_team_policy(ctx, caller.team_id)
    if current is None:
        return _interim_answer(await _operator_role(ctx, caller, email))
    roster = current.content.roster
    entries = [entry for entry in roster.entries if entry.email == email]
    if not entries:
        return _answer("deny", "signed-roster", f"{email} is not in the signed roster", current)
    answers = []
    for entry in entries:
        if not roster.may_open_sessions(entry.thumbprint):
            answers.append(
                _answer("deny", "signed-roster",
                        f"the signed roster gives {email} the {entry.role} role, which may not "
                        "open sessions", current)
            )  # fmt: skip
            continue
        request = AccessRequest(
            operator=roster.requesting_operator(entry.thumbprint),
            agent=TargetAgent(agent.id, agent.name, current.content.tags_for(agent.id)),
            action=Action(body.action),
            command=command,
        )
        decision = decide(current.content.policy, request, when)
        answers.append(_answer(decision.result.value, decision.rule_id, decision.reason, current))
    # One person with several keys: show the most permissive answer any of their keys gets.
    order = {"allow": 0, "approval_required": 1, "deny": 2}
    return min(answers, key=lambda answer: order.get(answer["result"], 3))


async def roster_frozen_hint(ctx: ServiceContext, team_id: str, current: TeamPolicy) -> str:
    """A refusal's recovery step when no active admin of the signed roster is left, else ""."""
    if signing_admins(current, await ctx.store.list_operators(team_id)):
        return ""
    return (
        ", and none of them is active: the server admin runs `tucdesk-rendezvous team "
        "reset-policy`, then each agent is re-enrolled (docs/policy.md)"
    )


def _require_admin(caller: Principal) -> None:
    if caller.kind != "operator" or caller.role != "admin":
        raise Forbidden("only an admin may set the team's policy, with their own operator key")


async def _record_not_stored(
    ctx: ServiceContext,
    caller: Principal,
    audited_as: AuditAction,
    version: int,
    sha256: str,
    reason: str,
) -> None:
    """Follow the ``policy.set``/``roster.signed`` record of a bundle that was not stored.

    Best effort: if the log is unreachable now, the caller still gets the store's answer.
    """
    try:
        await ctx.audit.record(
            caller.team_id, actor=caller_actor(caller), action=AuditAction.POLICY_SET_FAILED,
            target=f"policy:{caller.team_id}",
            details={
                "audited_as": audited_as.value, "version": version, "sha256": sha256,
                "reason": reason,
            },
        )  # fmt: skip
    except ServiceUnavailable:
        logger.error("could not record that policy version %d was not stored", version)


def _same_policy(current: TeamPolicy, new: SignedPolicyBundle) -> bool:
    """Whether only the roster or agent tags changed (the policy differs in its version only)."""
    old_policy = current.content.policy
    new_policy = new.content.policy
    return dataclasses.replace(new_policy, version=old_policy.version) == old_policy


def _command(action: str, command: list[str] | None) -> tuple[str, ...] | None:
    if action == "shell":
        if command:
            raise BadRequest("a shell takes no command; use action exec")
        return None
    if not command:
        raise BadRequest("an exec test needs a command")
    for argument in command:
        if len(argument.encode("utf-8")) > MAX_ARGUMENT_SIZE:
            raise BadRequest(f"command arguments are at most {MAX_ARGUMENT_SIZE} bytes")
    return tuple(command)


def _answer(result: str, rule_id: str | None, reason: str, current: TeamPolicy) -> dict[str, Any]:
    return {"result": result, "rule_id": rule_id, "reason": reason, "version": current.version}


async def _operator_role(ctx: ServiceContext, caller: Principal, email: str) -> str | None:
    roles = [
        operator.role
        for operator in await ctx.store.list_operators(caller.team_id)
        if operator.is_active() and operator.email.lower() == email
    ]
    return next((role for role in roles if role in SESSION_ROLES), roles[0] if roles else None)


def _interim_answer(role: str | None) -> dict[str, Any]:
    if role is None:
        result, reason = "deny", "no active operator of your team has this email"
    elif role in SESSION_ROLES:
        result, reason = "allow", f"no signed policy yet: the {role} role may open sessions"
    else:
        result, reason = "deny", f"no signed policy yet: the {role} role may not open sessions"
    return {"result": result, "rule_id": INTERIM_RULE_ID, "reason": reason, "version": 0}
