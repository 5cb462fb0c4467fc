"""Who may open which session: the one place the rendezvous decides on a session request.

Until the policy issue wires protocol.policy.decide in here, the rule is the interim one the
contract names: operators and admins of the agent's team may open sessions; nobody else may.
Every outcome carries a rule id and a reason, and nothing is allowed by falling through.
"""

from __future__ import annotations

from dataclasses import dataclass

from audit.actions import PolicyOutcome
from rendezvous.auth import Principal
from rendezvous.store import Agent

SESSION_ROLES = frozenset({"operator", "admin"})
INTERIM_RULE_ID = "interim-session-roles"


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


def decide_session(principal: Principal, agent: Agent | None, ask: SessionAsk) -> SessionDecision:
    """Decide whether ``principal`` may open ``ask`` on ``agent`` (None: no such agent)."""
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
    if principal.role not in SESSION_ROLES:
        return SessionDecision(
            PolicyOutcome.DENY,
            INTERIM_RULE_ID,
            f"the {principal.role} role may not open sessions (operator or admin may)",
        )
    return SessionDecision(
        PolicyOutcome.ALLOW, INTERIM_RULE_ID, f"the {principal.role} role may open sessions"
    )
