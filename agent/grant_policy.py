"""Local enforcement: every session grant is ruled on again by the agent's own signed policy.

docs/sessions.md §6 "Enforcement on the agent". The rendezvous signed the grant, but it is only
trusted to broker: who the operator is (email, role) comes from the admin-signed roster, the
agent's tags from the admin-signed bundle, and ``decide`` runs here on the cached policy. A grant
the cached policy denies is refused even though its signature is valid; approvals are verified
against the signed roster and each is used for one session only. With no bundle at all (a team
that never signed one) only keys pinned as admins at enrollment may open sessions.

Every refusal raises GrantPolicyRefused with a reason the operator can act on; reasons never
repeat the command, which may hold secrets.
"""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass

from agent.policy_cache import PolicyCache, PolicyRefusal
from protocol.errors import ProtocolError
from protocol.nonce_cache import NonceCache
from protocol.policy import (
    AccessRequest,
    Action,
    ApprovalContext,
    ApprovalError,
    Decision,
    Outcome,
    PolicyError,
    decide,
    verify_approval,
)
from protocol.policy.approval import DEFAULT_CLOCK_SKEW_SECONDS, MAX_APPROVAL_LIFETIME_SECONDS
from protocol.session_grant import SessionGrant

logger = logging.getLogger("tucdesk.agent.policy")

# An approval's request id is remembered for as long as the approval could still be accepted.
APPROVAL_MEMORY_SECONDS = MAX_APPROVAL_LIFETIME_SECONDS + 2 * DEFAULT_CLOCK_SKEW_SECONDS
ADMIN_ONLY_RULE_ID = "no-signed-policy"
MAX_SHOWN_REFUSAL_REASON = 120  # characters of the agent's reason for refusing a newer policy


class GrantPolicyRefused(Exception):
    """The agent's own policy refuses a grant; ``reason`` is shown to the operator and audited."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class LocalDecision:
    """What the agent decided for a grant it lets through, and under which policy version."""

    result: Outcome
    rule_id: str | None
    reason: str
    policy_version: int
    approval_request_id: str | None = None


class GrantPolicy:
    """Rules on session grants with the agent's cached policy and roster (see module docstring)."""

    def __init__(self, cache: PolicyCache, agent_id: str, team_id: str, agent_name: str) -> None:
        self._cache = cache
        self._agent_id = agent_id
        self._team_id = team_id
        self._agent_name = agent_name
        self._used_approvals = NonceCache(ttl=APPROVAL_MEMORY_SECONDS)

    @property
    def cache(self) -> PolicyCache:
        """The cached policy this enforcer reads."""
        return self._cache

    def check(self, grant: SessionGrant, operator_thumbprint: str, now: float) -> LocalDecision:
        """Allow ``grant`` (already signature-checked) for the key proven in the handshake.

        Returns the decision when the session may run; raises GrantPolicyRefused otherwise.
        """
        cache = self._cache
        trust = cache.trust
        if trust is None or (cache.accepted is None and cache.problem is not None):
            raise GrantPolicyRefused(f"refused by the agent: {cache.problem}")
        accepted = cache.accepted
        if accepted is None:
            if not any(
                hmac.compare_digest(operator_thumbprint.encode(), pinned.encode())
                for pinned in trust.admin_keys
            ):
                raise GrantPolicyRefused(_not_a_pinned_admin(grant, len(trust.admin_keys)))
            return LocalDecision(
                Outcome.ALLOW, ADMIN_ONLY_RULE_ID, "a pinned admin key (no signed policy yet)", 0
            )
        version = accepted.bundle.content.version
        if grant.policy_version is not None and grant.policy_version > version:
            raise GrantPolicyRefused(_out_of_date(grant.policy_version, version, cache.refusal))
        action = Action(grant.mode.value)
        try:
            request = accepted.access_request(
                operator_thumbprint, self._agent_id, self._agent_name, action, grant.command
            )
        except PolicyError:
            raise GrantPolicyRefused(
                f"refused by the agent: your key is not in the team roster signed by an admin "
                f"(policy version {version}) with a role that may open sessions; ask an admin "
                "to run 'tucdesk roster sign'"
            ) from None
        decision = decide(accepted.policy, request, now)
        if decision.result is Outcome.DENY:
            raise GrantPolicyRefused(_denied(decision, version))
        if decision.result is Outcome.APPROVAL_REQUIRED:
            request_id = self._check_approval(grant, request, decision, version, now)
            return LocalDecision(decision.result, decision.rule_id, decision.reason, version,
                                 request_id)
        return LocalDecision(decision.result, decision.rule_id, decision.reason, version)

    def check_terminal(self, operator_thumbprint: str, now: float) -> None:
        """Allow ``exec -t`` for a grant ``check`` let through, or raise GrantPolicyRefused.

        On a terminal an interactive program (a pager, an editor) can start a shell, so running
        a command there is as strong as a shell: the policy must allow this operator a shell on
        this agent outright (no approval, since the approval the grant may carry is for the
        command). The grant and the rendezvous's decision do not say whether a terminal is
        wanted; the agent, which runs the session, decides it.
        """
        accepted = self._cache.accepted
        if accepted is None:
            return  # no signed policy: only pinned admin keys got this far, and they may
        version = accepted.bundle.content.version
        try:
            request = accepted.access_request(
                operator_thumbprint, self._agent_id, self._agent_name, Action.SHELL, None
            )
        except PolicyError:
            raise GrantPolicyRefused(
                "refused by the agent: exec -t needs a shell to be allowed, and your key is not "
                "in the signed roster with a role that may open one"
            ) from None
        decision = decide(accepted.policy, request, now)
        if decision.result is not Outcome.ALLOW:
            ruling = "needs approval" if decision.result is Outcome.APPROVAL_REQUIRED else "denied"
            raise GrantPolicyRefused(
                "refused by the agent: exec -t runs the command on a terminal, where an "
                "interactive program can start a shell, so it needs the policy to allow you a "
                f"shell on this agent without approval; a shell here is {ruling} ("
                f"{_rule(decision)}, policy version {version}); run the command without -t"
            )

    def _check_approval(
        self,
        grant: SessionGrant,
        request: AccessRequest,
        decision: Decision,
        version: int,
        now: float,
    ) -> str:
        accepted = self._cache.accepted
        assert accepted is not None
        needs = f"policy version {version} requires approval ({_rule(decision)}): " + (
            decision.reason
        )
        if grant.approval is None:
            raise GrantPolicyRefused(
                f"refused by the agent: {needs}; the grant carries no approval"
            )
        statement = grant.approval.get("statement")
        request_id = statement.get("request_id") if isinstance(statement, dict) else None
        if not isinstance(request_id, str):
            raise GrantPolicyRefused("refused by the agent: the grant's approval is malformed")
        context = ApprovalContext(
            request_id=request_id,
            team_id=self._team_id,
            agent_id=self._agent_id,
            action=request.action,
            command=request.command,
            requester_thumbprint=request.operator.key_thumbprint,
            policy_version=version,
        )
        try:
            verify_approval(dict(grant.approval), context, accepted.roster, now)
        except (ApprovalError, ValueError, TypeError) as error:
            raise GrantPolicyRefused(
                f"refused by the agent: {needs}; the approval is not valid here: {error}"
            ) from None
        try:
            self._used_approvals.check_and_remember(request_id, now)
        except ProtocolError:
            raise GrantPolicyRefused(
                "refused by the agent: this approval was already used for another session"
            ) from None
        return request_id


def _rule(decision: Decision) -> str:
    return f"rule {decision.rule_id}" if decision.rule_id else "the policy's mode"


def _not_a_pinned_admin(grant: SessionGrant, pinned: int) -> str:
    """Why a key other than the pinned admins' is refused before the team signed a policy: the
    agent knows only the admins of its enrollment, not those invited (or re-keyed) since."""
    keys = f"{pinned} admin key{'' if pinned == 1 else 's'}"
    later = (
        " (an admin invited, or given a new key, after the agent enrolled is not)"
        if grant.role == "admin" else ""
    )
    return (
        f"refused by the agent: the team has not signed a policy yet, so only the {keys} this "
        f"agent pinned at enrollment may open sessions, and yours is not one of them{later}; "
        "ask one of the admins this agent knew at enrollment to run `tucdesk policy set FILE` "
        "(it takes a first policy signed by none other): the first policy also signs the "
        "current roster, from which this agent learns the current admins"
    )


def _out_of_date(decided_under: int, held: int, refusal: PolicyRefusal | None) -> str:
    """Why a grant decided under a newer policy is refused: the newer one not received yet (it
    will be shortly), or refused by this agent (it never will be: say why and what fixes it)."""
    stale = (f"refused by the agent: policy out of date (the grant was decided under version "
             f"{decided_under}, the agent holds version {held})")
    if refusal is None or (refusal.version is not None and refusal.version <= held):
        return f"{stale}; try again shortly"
    refused = "a newer version" if refusal.version is None else f"version {refusal.version}"
    reason = refusal.reason
    if len(reason) > MAX_SHOWN_REFUSAL_REASON:
        reason = reason[: MAX_SHOWN_REFUSAL_REASON - 1] + "…"
    if refusal.needs_reenrollment:
        return (f"{stale}: the agent refused policy {refused} ({reason}), and refuses every "
                "newer one until re-enrolled: re-enroll it ('tucdesk-agent enroll --force' with "
                "a new registration key), as after a policy-signer rotation (docs/self-hosting"
                ".md, \"Rotating service keys\")")
    return (f"{stale}: the agent refused policy {refused} ({reason}) and will not retry by "
            "itself: fix what its log names ('refusing policy version …'), then restart it")


def _denied(decision: Decision, version: int) -> str:
    return f"refused by the agent: denied by policy version {version} ({_rule(decision)}): " + (
        decision.reason
    )
