"""decide(): the one pure function that rules on a request, at the rendezvous and on the agent.

Precedence, after every rule has been evaluated:

1. any matching ``deny`` rule denies;
2. else any matching ``approval_required`` rule requires approval;
3. else any matching ``allow`` rule allows;
4. else the mode decides: allowlist denies, blocklist allows.

Then, if the result is ``allow`` and the exec command matches a ``high_risk`` pattern, approval
is required instead. High-risk patterns only ever tighten: they never turn a denial into
something an approver could let through. Anything that fails to evaluate denies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from protocol.policy.document import HIGH_RISK_RULE_ID, Mode, Outcome, Policy, Rule
from protocol.policy.errors import RequestError
from protocol.policy.matching import normalise_command
from protocol.policy.request import AccessRequest, Action, RequestingOperator, TargetAgent

EVALUATION_FAILED = "policy evaluation failed"
_PRECEDENCE = (Outcome.DENY, Outcome.APPROVAL_REQUIRED, Outcome.ALLOW)


@dataclass(frozen=True)
class Decision:
    """The result, the id of the rule that decided (None for the mode default), and why."""

    result: Outcome
    rule_id: str | None
    reason: str

    @property
    def allowed(self) -> bool:
        """Whether the request may go ahead without approval."""
        return self.result is Outcome.ALLOW


def decide(policy: Policy, request: AccessRequest, now: datetime | float) -> Decision:
    """Rule on ``request`` under ``policy`` at ``now`` (aware datetime or Unix seconds).

    Never raises: a malformed policy, request or time is a denial whose reason says so.
    """
    try:
        return _decide(policy, request, _instant(now))
    except RequestError as error:
        return Decision(Outcome.DENY, None, f"{EVALUATION_FAILED}: {error}")
    except Exception as error:  # noqa: BLE001 (anything that fails to evaluate denies)
        return Decision(Outcome.DENY, None, f"{EVALUATION_FAILED}: {type(error).__name__}")


def _decide(policy: Policy, request: AccessRequest, now: datetime) -> Decision:
    if not isinstance(policy, Policy):
        raise RequestError("no valid policy")
    command_text = _check_request(request)
    matched = [rule for rule in policy.rules if _rule_matches(rule, request, command_text, now)]
    decision = _by_precedence(matched) or _mode_default(policy.mode)
    if decision.result is Outcome.ALLOW and command_text is not None:
        for pattern in policy.high_risk:
            if pattern.matches(command_text):
                return Decision(
                    Outcome.APPROVAL_REQUIRED,
                    HIGH_RISK_RULE_ID,
                    f"the command matches the high-risk pattern {pattern.text!r}; "
                    "an approver must confirm it",
                )
    return decision


def _by_precedence(matched: list[Rule]) -> Decision | None:
    for outcome in _PRECEDENCE:
        for rule in matched:
            if rule.outcome is outcome:
                return Decision(outcome, rule.rule_id, _rule_reason(rule))
    return None


def _rule_reason(rule: Rule) -> str:
    verb = {
        Outcome.DENY: "denies this request",
        Outcome.APPROVAL_REQUIRED: "requires an approver to confirm this request",
        Outcome.ALLOW: "allows this request",
    }[rule.outcome]
    return f"rule {rule.rule_id!r} {verb}"


def _mode_default(mode: Mode) -> Decision:
    if mode is Mode.ALLOWLIST:
        return Decision(Outcome.DENY, None, "no rule allows this request (allowlist mode)")
    if mode is Mode.BLOCKLIST:
        return Decision(Outcome.ALLOW, None, "no rule denies this request (blocklist mode)")
    raise RequestError("the policy has no valid mode")


def _rule_matches(
    rule: Rule, request: AccessRequest, command_text: str | None, now: datetime
) -> bool:
    # Every criterion present must hold; a missing one matches anything.
    if request.action not in rule.actions:
        return False
    if rule.commands is not None:
        if command_text is None or not any(p.matches(command_text) for p in rule.commands):
            return False
    if rule.operators is not None and not rule.operators.matches(request.operator):
        return False
    if rule.agents is not None and not rule.agents.matches(request.agent):
        return False
    return rule.when is None or rule.when.contains(now)


def _check_request(request: AccessRequest) -> str | None:
    """Check the request's shape; return the normalised exec command (None for a shell)."""
    if not isinstance(request, AccessRequest):
        raise RequestError("the request is not an AccessRequest")
    operator, agent = request.operator, request.agent
    if not isinstance(operator, RequestingOperator) or not all(
        isinstance(value, str) for value in (operator.email, operator.role, operator.key_thumbprint)
    ):
        raise RequestError("the request names no valid operator")
    if (
        not isinstance(agent, TargetAgent)
        or not isinstance(agent.agent_id, str)
        or not isinstance(agent.name, str)
        or not isinstance(agent.tags, frozenset)
        or not all(isinstance(tag, str) for tag in agent.tags)
    ):
        raise RequestError("the request names no valid agent")
    if request.action is Action.SHELL:
        if request.command is not None:
            raise RequestError("a shell request carries no command")
        return None
    if request.action is Action.EXEC:
        if request.command is None:
            raise RequestError("an exec request needs a command")
        return normalise_command(request.command)
    raise RequestError("the request's action is neither shell nor exec")


def _instant(now: datetime | float) -> datetime:
    if isinstance(now, datetime):
        if now.tzinfo is None or now.utcoffset() is None:
            raise RequestError("the time must be timezone-aware")
        return now
    if isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
        raise RequestError("the time must be an aware datetime or finite Unix seconds")
    return datetime.fromtimestamp(now, UTC)
