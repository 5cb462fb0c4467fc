"""decide(): each rule kind, precedence, defaults, failing closed, and a reference model."""

from __future__ import annotations

import fnmatch
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.policy.decide import EVALUATION_FAILED, Decision, decide
from protocol.policy.document import HIGH_RISK_RULE_ID, Outcome, Policy, parse_policy
from protocol.policy.matching import MAX_COMMAND_LENGTH, OperatorSelector
from protocol.policy.request import AccessRequest, Action, RequestingOperator, TargetAgent

NOW = datetime(2027, 6, 2, 12, 0, tzinfo=UTC)  # a Wednesday
ALICE = RequestingOperator("alice@example.com", "operator", "thumb-alice")
BOB = RequestingOperator("bob@example.com", "auditor", "thumb-bob")
WEB_ID, DB_ID = "agt_" + "w" * 16, "agt_" + "d" * 16  # as new_id makes them
WEB = TargetAgent(WEB_ID, "web-1", frozenset({"prod", "eu"}))
DB = TargetAgent(DB_ID, "db-1", frozenset({"prod", "db"}))


def _policy(rules: str, mode: str = "allowlist", extra: str = "") -> Policy:
    return parse_policy(f'version = 1\nmode = "{mode}"\n{extra}\n{rules}')


def _rule(rule_id: str, outcome: str, body: str = "") -> str:
    return f'[[rules]]\nid = "{rule_id}"\noutcome = "{outcome}"\n{body}\n'


def _shell(operator: RequestingOperator = ALICE, agent: TargetAgent = WEB) -> AccessRequest:
    return AccessRequest(operator, agent, Action.SHELL)


def _exec(*argv: str, operator: RequestingOperator = ALICE,
          agent: TargetAgent = WEB) -> AccessRequest:
    return AccessRequest(operator, agent, Action.EXEC, tuple(argv))


def _result(policy: Policy, request: AccessRequest, now: datetime | float = NOW) -> str:
    return decide(policy, request, now).result.value


# --- each rule kind -----------------------------------------------------------------------------


def test_a_rule_matches_operators_by_email_case_insensitively() -> None:
    policy = _policy(_rule("a", "allow", 'operators = { emails = ["ALICE@example.com"] }'))
    assert _result(policy, _shell(ALICE)) == "allow"
    assert _result(policy, _shell(BOB)) == "deny"


def test_a_rule_matches_operators_by_role() -> None:
    policy = _policy(_rule("a", "allow", 'operators = { roles = ["operator"] }'))
    assert _result(policy, _shell(ALICE)) == "allow"
    assert _result(policy, _shell(BOB)) == "deny"


def test_a_rule_matches_agents_by_id() -> None:
    policy = _policy(_rule("a", "allow", f'agents = {{ ids = ["{DB_ID}"] }}'))
    assert _result(policy, _shell(agent=DB)) == "allow"
    assert _result(policy, _shell(agent=WEB)) == "deny"


def test_a_rule_matches_agents_by_name_glob_case_insensitively() -> None:
    policy = _policy(_rule("a", "allow", 'agents = { names = ["WEB-*"] }'))
    assert _result(policy, _shell(agent=WEB)) == "allow"
    assert _result(policy, _shell(agent=DB)) == "deny"


def test_a_rule_on_tags_needs_the_agent_to_carry_every_listed_tag() -> None:
    policy = _policy(_rule("a", "allow", 'agents = { tags = ["prod", "db"] }'))
    assert _result(policy, _shell(agent=DB)) == "allow"
    assert _result(policy, _shell(agent=WEB)) == "deny"


def test_agent_selectors_are_alternatives() -> None:
    policy = _policy(_rule("a", "allow", f'agents = {{ ids = ["{WEB_ID}"], tags = ["db"] }}'))
    assert _result(policy, _shell(agent=WEB)) == "allow"
    assert _result(policy, _shell(agent=DB)) == "allow"
    assert _result(policy, _shell(agent=TargetAgent("x", "x", frozenset()))) == "deny"


def test_a_rule_matches_by_action() -> None:
    policy = _policy(_rule("a", "allow", 'actions = ["exec"]'))
    assert _result(policy, _exec("uptime")) == "allow"
    assert _result(policy, _shell()) == "deny"


def test_a_rule_matches_exec_commands_by_pattern_after_whitespace_normalisation() -> None:
    policy = _policy(_rule("a", "allow", 'commands = ["systemctl  status *"]'))
    assert _result(policy, _exec("systemctl", "status", "nginx")) == "allow"
    assert _result(policy, _exec("systemctl", "  status\t", "nginx ")) == "allow"
    assert _result(policy, _exec("systemctl", "restart", "nginx")) == "deny"
    assert _result(policy, _shell()) == "deny"


def test_a_rule_matches_only_inside_its_time_window() -> None:
    policy = _policy(_rule("a", "allow", '[rules.when]\ndays = ["wed"]\nhours = "09:00-17:00"\n'
                                         'timezone = "Europe/Berlin"'))
    berlin = ZoneInfo("Europe/Berlin")
    assert _result(policy, _shell(), datetime(2027, 6, 2, 9, 0, tzinfo=berlin)) == "allow"
    assert _result(policy, _shell(), datetime(2027, 6, 2, 17, 0, tzinfo=berlin)) == "deny"
    assert _result(policy, _shell(), datetime(2027, 6, 3, 10, 0, tzinfo=berlin)) == "deny"
    # Unix seconds are the same instant as the aware datetime.
    assert _result(policy, _shell(), datetime(2027, 6, 2, 9, 0, tzinfo=berlin).timestamp()) == (
        "allow"
    )


def test_every_criterion_of_a_rule_must_hold() -> None:
    policy = _policy(_rule("a", "allow", 'operators = { roles = ["operator"] }\n'
                                         'agents = { tags = ["db"] }'))
    assert _result(policy, _shell(ALICE, DB)) == "allow"
    assert _result(policy, _shell(ALICE, WEB)) == "deny"
    assert _result(policy, _shell(BOB, DB)) == "deny"


# --- precedence and defaults -------------------------------------------------------------------


@pytest.mark.parametrize("deny_first", [True, False])
def test_a_matching_deny_beats_a_matching_allow_in_either_order(deny_first: bool) -> None:
    allow = _rule("allow-all", "allow")
    deny = _rule("no-db", "deny", 'agents = { tags = ["db"] }')
    policy = _policy(deny + allow if deny_first else allow + deny)
    decision = decide(policy, _shell(agent=DB), NOW)
    assert decision == Decision(Outcome.DENY, "no-db", "rule 'no-db' denies this request")
    assert _result(policy, _shell(agent=WEB)) == "allow"


def test_a_matching_deny_beats_approval_required_which_beats_allow() -> None:
    rules = _rule("ok", "allow") + _rule("ask", "approval_required", 'actions = ["exec"]')
    policy = _policy(rules)
    assert decide(policy, _exec("ls"), NOW).rule_id == "ask"
    assert decide(policy, _shell(), NOW).rule_id == "ok"
    denied = _policy(rules + _rule("no", "deny", 'commands = ["ls"]'))
    assert decide(denied, _exec("ls"), NOW).rule_id == "no"


OTHER_AGENT = 'agents = { ids = ["agt_oooooooooooooooo"] }'


def test_allowlist_denies_when_no_rule_matches() -> None:
    decision = decide(_policy(_rule("a", "allow", OTHER_AGENT)), _shell(), NOW)
    assert decision.result is Outcome.DENY and decision.rule_id is None
    assert "allowlist" in decision.reason


def test_blocklist_allows_when_no_rule_matches() -> None:
    decision = decide(_policy(_rule("a", "deny", OTHER_AGENT), "blocklist"),
                      _shell(), NOW)
    assert decision.result is Outcome.ALLOW and decision.rule_id is None
    assert decision.allowed


# --- high-risk commands -----------------------------------------------------------------------

HIGH_RISK = 'high_risk = ["*rm -rf*", "mkfs*", "*shutdown*", "dd * of=/dev/*"]'


@pytest.mark.parametrize(
    "argv",
    [("rm", "-rf", "/var/tmp"), ("sudo", "rm", "-rf", "/"), ("mkfs.ext4", "/dev/sdb1"),
     ("shutdown", "-h", "now"), ("dd", "if=/dev/zero", "of=/dev/sda", "bs=1M")],
)
def test_a_high_risk_command_that_would_be_allowed_needs_approval(argv: tuple[str, ...]) -> None:
    for policy in (_policy(_rule("ok", "allow"), extra=HIGH_RISK),
                   _policy("", "blocklist", extra=HIGH_RISK)):
        decision = decide(policy, _exec(*argv), NOW)
        assert decision.result is Outcome.APPROVAL_REQUIRED
        assert decision.rule_id == HIGH_RISK_RULE_ID


def test_high_risk_never_turns_a_denial_into_an_approval() -> None:
    assert _result(_policy("", extra=HIGH_RISK), _exec("rm", "-rf", "/")) == "deny"
    explicit = _policy(_rule("ok", "allow") + _rule("no", "deny", 'commands = ["rm *"]'),
                       extra=HIGH_RISK)
    assert _result(explicit, _exec("rm", "-rf", "/")) == "deny"


def test_an_ordinary_command_is_not_high_risk() -> None:
    assert _result(_policy(_rule("ok", "allow"), extra=HIGH_RISK), _exec("ls", "-la")) == "allow"


def test_a_reason_never_repeats_the_command_which_may_hold_secrets() -> None:
    policy = _policy(_rule("ok", "allow"), extra='high_risk = ["*--password*"]')
    decision = decide(policy, _exec("mysql", "--password=hunter2"), NOW)
    assert decision.result is Outcome.APPROVAL_REQUIRED
    assert "hunter2" not in decision.reason


# --- failing closed -------------------------------------------------------------------------


BLOCKLIST_ALLOW_ALL = parse_policy('version = 1\nmode = "blocklist"\n')


@pytest.mark.parametrize(
    ("request_", "now"),
    [
        (_shell(), datetime(2027, 6, 2, 12, 0)),  # noqa: DTZ001 (naive on purpose)
        (_shell(), float("nan")),
        (_shell(), "2027-06-02"),
        (AccessRequest(ALICE, WEB, Action.EXEC, ()), NOW),
        (AccessRequest(ALICE, WEB, Action.EXEC, None), NOW),
        (AccessRequest(ALICE, WEB, Action.EXEC, ("x" * (MAX_COMMAND_LENGTH + 1),)), NOW),
        (AccessRequest(ALICE, WEB, Action.EXEC, "rm -rf /"), NOW),  # type: ignore[arg-type]
        (AccessRequest(ALICE, WEB, Action.SHELL, ("ls",)), NOW),
        (AccessRequest(ALICE, WEB, "reboot"), NOW),  # type: ignore[arg-type]
        (AccessRequest(ALICE, TargetAgent("a", "a", {"prod"}), Action.SHELL), NOW),  # type: ignore[arg-type]
        (AccessRequest(None, WEB, Action.SHELL), NOW),  # type: ignore[arg-type]
        ({"operator": "alice"}, NOW),
    ],
)
def test_a_request_that_cannot_be_evaluated_is_denied_even_in_blocklist_mode(
    request_: Any, now: Any
) -> None:
    decision = decide(BLOCKLIST_ALLOW_ALL, request_, now)
    assert decision.result is Outcome.DENY
    assert decision.rule_id is None
    assert decision.reason.startswith(EVALUATION_FAILED)


def test_a_policy_that_fails_to_evaluate_denies() -> None:
    good = parse_policy('version = 1\nmode = "blocklist"\n' + _rule("r", "deny",
                        'operators = { roles = ["auditor"] }'))
    broken_rule = replace(good.rules[0], operators=OperatorSelector(None, None))  # type: ignore[arg-type]
    broken = replace(good, rules=(broken_rule,))
    decision = decide(broken, _shell(), NOW)
    assert decision.result is Outcome.DENY
    assert decision.reason == f"{EVALUATION_FAILED}: TypeError"


def test_something_that_is_not_a_policy_denies() -> None:
    assert _result(None, _shell()) == "deny"  # type: ignore[arg-type]
    assert _result(replace(BLOCKLIST_ALLOW_ALL, mode="open"), _shell()) == "deny"  # type: ignore[arg-type]


# --- the specification as an independent model ---------------------------------------------------

EMAILS = ["alice@example.com", "bob@example.com", "carol@example.com"]
ROLES = ["admin", "operator", "approver", "auditor"]
AGENT_IDS = ["agt_" + letter * 16 for letter in "abc"]
AGENT_NAMES = ["web-1", "web-2", "db-1"]
NAME_PATTERNS = ["web-*", "db-1", "*-2"]
TAGS = ["prod", "db", "eu"]
COMMANDS = [("ls", "-la"), ("rm", "-rf", "/tmp/x"), ("sudo", "reboot"), ("cat", "a"),
            ("systemctl", "restart", "nginx")]
PATTERNS = ["ls *", "rm -rf *", "*reboot*", "cat ?", "systemctl * nginx", "*"]
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"]
HOURS = ["09:00-17:00", "22:00-06:00", "00:00-24:00", "02:00-03:00", "01:00-02:00", "12:30-12:31"]
DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]


def _optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), strategy)


def _subset(items: list[str]) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(items), min_size=1, max_size=len(items), unique=True)


def _roles_that_can_apply(rule: dict[str, Any]) -> dict[str, Any]:
    """Only admin and operator can open sessions: other roles are refused in non-deny rules."""
    if rule["outcome"] == "deny" or rule["roles"] is None:
        return rule
    roles = [role for role in rule["roles"] if role in ("admin", "operator")]
    return {**rule, "roles": roles or None}


RULE_SPECS = st.fixed_dictionaries(
    {
        "outcome": st.sampled_from(["allow", "deny", "approval_required"]),
        "actions": _optional(_subset(["shell", "exec"])),
        "emails": _optional(_subset(EMAILS)),
        "roles": _optional(_subset(ROLES)),
        "ids": _optional(_subset(AGENT_IDS)),
        "names": _optional(_subset(NAME_PATTERNS)),
        "tags": _optional(_subset(TAGS)),
        "commands": _optional(_subset(PATTERNS)),
        "when": _optional(st.fixed_dictionaries({
            "days": _optional(_subset(DAYS)),
            "hours": _optional(st.sampled_from(HOURS)),
            "timezone": _optional(st.sampled_from(ZONES)),
        })),
    }
).map(_roles_that_can_apply)
POLICY_SPECS = st.fixed_dictionaries(
    {
        "mode": st.sampled_from(["allowlist", "blocklist"]),
        "high_risk": _optional(_subset(PATTERNS[:4])),
        "rules": st.lists(RULE_SPECS, max_size=6),
    }
)
REQUESTS = st.builds(
    lambda email, role, agent_id, name, tags, command: AccessRequest(
        RequestingOperator(email, role, "thumb"),
        TargetAgent(agent_id, name, frozenset(tags)),
        Action.SHELL if command is None else Action.EXEC,
        command,
    ),
    st.sampled_from(EMAILS), st.sampled_from(ROLES), st.sampled_from(AGENT_IDS),
    st.sampled_from(AGENT_NAMES), st.lists(st.sampled_from(TAGS), unique=True),
    _optional(st.sampled_from(COMMANDS)),
)
INSTANTS = st.datetimes(
    min_value=datetime(2026, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC)
)


def _toml(spec: dict[str, Any]) -> str:
    """The policy text for a generated spec."""
    lines = ["version = 1", f'mode = "{spec["mode"]}"']
    if spec["high_risk"] is not None:
        lines.append(f"high_risk = {json.dumps(spec['high_risk'])}")
    for index, rule in enumerate(spec["rules"]):
        lines += ["[[rules]]", f'id = "r{index}"', f'outcome = "{rule["outcome"]}"']
        actions = rule["actions"]
        if rule["commands"] is not None:
            lines.append(f"commands = {json.dumps(rule['commands'])}")
            actions = None  # commands imply exec
        if actions is not None:
            lines.append(f"actions = {json.dumps(actions)}")
        selectors = (("operators", ("emails", "roles")), ("agents", ("ids", "names", "tags")))
        for table, keys in selectors:
            chosen = {key: rule[key] for key in keys if rule[key] is not None}
            if chosen:
                lines.append(f"[rules.{table}]")
                lines += [f"{key} = {json.dumps(value)}" for key, value in chosen.items()]
        when = rule["when"]
        if when is not None and any(value is not None for value in when.values()):
            lines.append("[rules.when]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in when.items()
                      if value is not None]
    return "\n".join(lines) + "\n"


def _reference_in_window(when: dict[str, Any], instant: datetime) -> bool:
    zone = ZoneInfo(when["timezone"] or "UTC")
    offset = zone.utcoffset(instant.astimezone(zone))
    assert offset is not None
    local = instant.replace(tzinfo=None) + offset
    minute = local.hour * 60 + local.minute
    days = [DAYS.index(day) for day in when["days"] or DAYS]
    start_text, end_text = (when["hours"] or "00:00-24:00").split("-")
    start = int(start_text[:2]) * 60 + int(start_text[3:])
    end = int(end_text[:2]) * 60 + int(end_text[3:])
    if start < end:
        return local.weekday() in days and start <= minute < end
    opened = local.date() if minute >= start else (local - timedelta(days=1)).date()
    return (minute >= start or minute < end) and opened.weekday() in days


def _reference_rule_matches(rule: dict[str, Any], request: AccessRequest, now: datetime) -> bool:
    action = request.action.value
    command = " ".join(" ".join(request.command).split()) if request.command else None
    if rule["commands"] is not None:
        if action != "exec" or not any(fnmatch.fnmatchcase(command or "", pattern)
                                       for pattern in rule["commands"]):
            return False
    elif rule["actions"] is not None and action not in rule["actions"]:
        return False
    if rule["emails"] is not None or rule["roles"] is not None:
        if request.operator.email not in (rule["emails"] or []) and (
            request.operator.role not in (rule["roles"] or [])
        ):
            return False
    if rule["ids"] is not None or rule["names"] is not None or rule["tags"] is not None:
        by_id = request.agent.agent_id in (rule["ids"] or [])
        by_name = any(fnmatch.fnmatchcase(request.agent.name, p) for p in rule["names"] or [])
        by_tags = rule["tags"] is not None and set(rule["tags"]) <= request.agent.tags
        if not (by_id or by_name or by_tags):
            return False
    when = rule["when"]
    return when is None or _reference_in_window(when, now)


def _reference_decide(spec: dict[str, Any], request: AccessRequest, now: datetime) -> str:
    outcomes = {
        rule["outcome"] for rule in spec["rules"] if _reference_rule_matches(rule, request, now)
    }
    for outcome in ("deny", "approval_required", "allow"):
        if outcome in outcomes:
            result = outcome
            break
    else:
        result = "deny" if spec["mode"] == "allowlist" else "allow"
    if result == "allow" and request.command is not None:
        command = " ".join(" ".join(request.command).split())
        if any(fnmatch.fnmatchcase(command, pattern) for pattern in spec["high_risk"] or []):
            result = "approval_required"
    return result


@settings(max_examples=300, deadline=None)
@given(spec=POLICY_SPECS, request=REQUESTS, now=INSTANTS)
def test_decide_agrees_with_the_reference_model(
    spec: dict[str, Any], request: AccessRequest, now: datetime
) -> None:
    policy = parse_policy(_toml(spec))
    assert _result(policy, request, now) == _reference_decide(spec, request, now)


@settings(max_examples=150, deadline=None)
@given(spec=POLICY_SPECS, request=REQUESTS, now=INSTANTS)
def test_adding_a_matching_deny_rule_always_denies(
    spec: dict[str, Any], request: AccessRequest, now: datetime
) -> None:
    policy = parse_policy(_toml(spec) + '[[rules]]\nid = "stop"\noutcome = "deny"\n')
    decision = decide(policy, request, now)
    assert decision.result is Outcome.DENY
    denying = {rule.rule_id for rule in policy.rules if rule.outcome is Outcome.DENY}
    assert decision.rule_id in denying


@settings(max_examples=150, deadline=None)
@given(spec=POLICY_SPECS, request=REQUESTS, now=INSTANTS)
def test_an_allowlist_never_allows_what_no_allow_rule_matches(
    spec: dict[str, Any], request: AccessRequest, now: datetime
) -> None:
    spec = {**spec, "mode": "allowlist"}
    policy = parse_policy(_toml(spec))
    decision = decide(policy, request, now)
    if decision.result is Outcome.ALLOW:
        assert decision.rule_id is not None
        rule = spec["rules"][int(decision.rule_id[1:])]
        assert rule["outcome"] == "allow" and _reference_rule_matches(rule, request, now)
    if decision.rule_id is None:
        assert decision.result is Outcome.DENY


@settings(max_examples=100, deadline=None)
@given(spec=POLICY_SPECS, request=REQUESTS, now=INSTANTS)
def test_the_same_instant_in_any_zone_gets_the_same_decision(
    spec: dict[str, Any], request: AccessRequest, now: datetime
) -> None:
    policy = parse_policy(_toml(spec))
    expected = decide(policy, request, now)
    for zone in ("Pacific/Kiritimati", "America/Adak", "Asia/Kathmandu"):
        assert decide(policy, request, now.astimezone(ZoneInfo(zone))) == expected
    assert decide(policy, request, now.timestamp()) == expected
