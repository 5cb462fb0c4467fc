"""Who may open which session: the one place the rendezvous decides on a session request.

With a signed policy bundle in force the decision is ``protocol.policy.decide`` on exactly the
inputs the agent will use (docs/sessions.md §6): the operator's email and role from the SIGNED
roster (found by the key the access token is bound to), the agent's tags from the SIGNED
``agent_tags``. So the rendezvous and the agent agree, and an operator an admin has not yet
signed into the roster is refused here with that reason. A team that never signed a bundle keeps
the interim rule: operators and admins of the agent's team may open sessions, nobody else may.
Every outcome carries a rule id and a reason, and nothing is allowed by falling through.
"""

from __future__ import annotations

from dataclasses import dataclass

from audit.actions import PolicyOutcome
from protocol.policy import AccessRequest, Action, PolicyBundleContent, TargetAgent, decide
from rendezvous.auth import Principal
from rendezvous.store import Agent

SESSION_ROLES = frozenset({"operator", "admin"})
INTERIM_RULE_ID = "interim-session-roles"
ROSTER_RULE_ID = "signed-roster"


@dataclass(frozen=True)
class SessionAsk:
    """What the caller asked for, as the decision sees it."""

    target: str
    mode: str  # "shell" or "exec"
    command: tuple[str, ...] | None


@dataclass(frozen=True)
class SessionDecision:
    """The outcome, the rule that decided, why, and the policy version it came from."""

    outcome: PolicyOutcome
    rule_id: str | None
    reason: str
    policy_version: int | None = None

    @property
    def allowed(self) -> bool:
        """Whether the session may go ahead now."""
        return self.outcome is PolicyOutcome.ALLOW


def decide_session(
    principal: Principal,
    agent: Agent | None,
    ask: SessionAsk,
    *,
    policy: PolicyBundleContent | None = None,
    operator_thumbprint: str | None = None,
    now: float = 0.0,
) -> SessionDecision:
    """Decide whether ``principal`` may open ``ask`` on ``agent`` (None: no such agent).

    ``policy`` is the team's signed bundle in force (None: the interim roles rule applies);
    ``operator_thumbprint`` the key the caller's token is bound to; ``now`` Unix seconds.
    """
    if agent is None:
        return SessionDecision(
            PolicyOutcome.DENY, None, f"no agent named {ask.target!r} in this team"
        )
    if agent.team_id != principal.team_id:
        # Cannot happen (agents are looked up inside the caller's team); refuse if it ever does.
        return SessionDecision(PolicyOutcome.DENY, None, "the agent belongs to another team")
    if principal.kind != "operator":
        return SessionDecision(
            PolicyOutcome.DENY,
            INTERIM_RULE_ID,
            "API keys cannot open sessions: a session is bound to an operator key",
        )
    if policy is not None:
        return _decide_by_policy(policy, agent, ask, operator_thumbprint, now)
    if principal.role not in SESSION_ROLES:
        return SessionDecision(
            PolicyOutcome.DENY,
            INTERIM_RULE_ID,
            f"the {principal.role} role may not open sessions (operator or admin may)",
        )
    return SessionDecision(
        PolicyOutcome.ALLOW, INTERIM_RULE_ID, f"the {principal.role} role may open sessions"
    )


def _decide_by_policy(
    policy: PolicyBundleContent,
    agent: Agent,
    ask: SessionAsk,
    operator_thumbprint: str | None,
    now: float,
) -> SessionDecision:
    entry = None if operator_thumbprint is None else policy.roster.entry_for(operator_thumbprint)
    if entry is None or operator_thumbprint is None:
        return SessionDecision(
            PolicyOutcome.DENY,
            ROSTER_RULE_ID,
            "your key is not in the team's signed roster yet; an admin must run "
            "'tucdesk roster sign'",
            policy.version,
        )
    if not policy.roster.may_open_sessions(operator_thumbprint):
        return SessionDecision(
            PolicyOutcome.DENY,
            ROSTER_RULE_ID,
            f"the signed roster gives your key the {entry.role} role, which may not open "
            "sessions (operator or admin may)",
            policy.version,
        )
    request = AccessRequest(
        operator=policy.roster.requesting_operator(operator_thumbprint),
        agent=TargetAgent(agent.id, agent.name, policy.tags_for(agent.id)),
        action=Action(ask.mode),
        command=ask.command,
    )
    decision = decide(policy.policy, request, now)
    return SessionDecision(
        PolicyOutcome(decision.result.value), decision.rule_id, decision.reason, policy.version
    )
