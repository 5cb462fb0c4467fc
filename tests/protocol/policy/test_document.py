"""The policy document parser: what it accepts, and errors that name the offending line."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.policy.document import (
    MAX_POLICY_SIZE,
    MAX_RULES,
    Mode,
    Outcome,
    parse_policy,
)
from protocol.policy.errors import PolicyDocumentError
from protocol.policy.matching import MAX_PATTERN_LENGTH
from protocol.policy.request import Action
from protocol.policy.time_window import MINUTES_PER_DAY

EXAMPLE = """\
# The ops team's policy.
version = 12
mode = "allowlist"
description = "production access"
high_risk = ["*rm -rf*", "mkfs*", "shutdown*", "dd * of=/dev/*"]

[[rules]]
id = "ops-business-hours"
outcome = "allow"
operators = { roles = ["operator", "admin"] }
agents = { tags = ["prod"] }
actions = ["shell", "exec"]
[rules.when]
days = ["mon", "tue", "wed", "thu", "fri"]
hours = "08:00-18:00"
timezone = "Europe/Berlin"

[[rules]]
id = "contractors-never-prod-db"
outcome = "deny"
operators = { emails = ["Contractor@Example.com"] }
agents = { names = ["db-*"], ids = ["agt_mfrggzdfmztwq2lk"] }

[[rules]]
id = "service-restarts"
outcome = "approval_required"
commands = [
    "systemctl restart *",
    "systemctl stop *",
]
"""


def test_the_example_policy_parses_into_its_rules() -> None:
    policy = parse_policy(EXAMPLE)
    assert policy.version == 12
    assert policy.mode is Mode.ALLOWLIST
    assert [pattern.text for pattern in policy.high_risk][:2] == ["*rm -rf*", "mkfs*"]
    ops, contractors, restarts = policy.rules
    assert ops.rule_id == "ops-business-hours" and ops.outcome is Outcome.ALLOW
    assert ops.operators is not None and ops.operators.roles == {"operator", "admin"}
    assert ops.agents is not None and ops.agents.tags == {"prod"}
    assert ops.when is not None and ops.when.days == frozenset(range(5))
    assert (ops.when.start_minute, ops.when.end_minute) == (8 * 60, 18 * 60)
    assert ops.when.timezone.key == "Europe/Berlin"
    assert contractors.operators is not None
    assert contractors.operators.emails == {"contractor@example.com"}
    assert contractors.agents is not None and contractors.agents.names == ("db-*",)
    assert restarts.outcome is Outcome.APPROVAL_REQUIRED
    assert restarts.actions == {Action.EXEC}
    assert restarts.commands is not None and len(restarts.commands) == 2


def test_the_example_in_the_policy_reference_parses() -> None:
    reference = Path(__file__).parents[3] / "docs" / "policy.md"
    example = reference.read_text().split("```toml\n", 1)[1].split("```", 1)[0]
    policy = parse_policy(example)
    assert [rule.rule_id for rule in policy.rules] == [
        "ops-business-hours", "contractors-never-prod-db", "service-restarts", "night-shift"
    ]


def test_bytes_and_text_parse_the_same() -> None:
    assert parse_policy(EXAMPLE.encode()) == parse_policy(EXAMPLE)


def test_a_policy_without_rules_is_valid() -> None:
    policy = parse_policy('version = 1\nmode = "blocklist"\n')
    assert policy.rules == () and policy.mode is Mode.BLOCKLIST


def test_a_window_without_hours_covers_the_whole_day_in_utc() -> None:
    policy = parse_policy(
        'version = 1\nmode = "allowlist"\n[[rules]]\nid = "a"\noutcome = "allow"\n'
        '[rules.when]\ndays = ["sat"]\n'
    )
    window = policy.rules[0].when
    assert window is not None
    assert (window.start_minute, window.end_minute) == (0, MINUTES_PER_DAY)
    assert window.timezone.key == "UTC"


HEAD = 'version = 1\nmode = "allowlist"\n'
RULE = '[[rules]]\nid = "r"\noutcome = "allow"\n'

# (document, expected line, fragment of the message)
BAD_DOCUMENTS = [
    pytest.param('mode = "allowlist"\n', None, "version is required", id="missing-version"),
    pytest.param('version = 1\n', None, "mode is required", id="missing-mode"),
    pytest.param('version = "1"\nmode = "allowlist"\n', 1, "version must be a whole number",
                 id="version-as-text"),
    pytest.param('version = 0\nmode = "allowlist"\n', 1, "version must be", id="version-zero"),
    pytest.param('version = 1\nmode = "allow"\n', 2, "mode must be one of allowlist, blocklist",
                 id="unknown-mode"),
    pytest.param(HEAD + 'modes = "x"\n', 3, "modes is not a known key", id="unknown-top-key"),
    pytest.param(HEAD + "\n" + RULE + RULE.replace('"r"', '"s"') + 'outcome = "maybe"\n', None,
                 "", id="duplicate-key-is-a-toml-error"),
    pytest.param(HEAD + RULE + '[[rules]]\nid = "x"\n\n\n\noutcome = "alow"\n', 11,
                 "rules[1].outcome must be one of allow, deny, approval_required",
                 id="unknown-outcome"),
    pytest.param(HEAD + '[[rules]]\noutcome = "allow"\n', 3, "rules[0] lacks the required key 'id'",
                 id="missing-id"),
    pytest.param(HEAD + '[[rules]]\nid = "r"\n', 3, "lacks the required key 'outcome'",
                 id="missing-outcome"),
    pytest.param(HEAD + RULE + RULE, 7, "rules[1].id 'r' is used by another rule",
                 id="duplicate-id"),
    pytest.param(HEAD + '[[rules]]\nid = "has space"\noutcome = "deny"\n', 4, "rules[0].id must be",
                 id="bad-id"),
    pytest.param(HEAD + '[[rules]]\nid = "high_risk"\noutcome = "deny"\n', 4, "reserved",
                 id="reserved-id"),
    pytest.param(HEAD + RULE + 'outcom = "deny"\n', 6, "rules[0].outcom is not a known key",
                 id="typo-in-rule-key"),
    pytest.param(HEAD + RULE + 'actions = ["shell", "ssh"]\n', 6,
                 "rules[0].actions[1]: 'ssh' must be one of shell, exec", id="unknown-action"),
    pytest.param(HEAD + RULE + "actions = []\n", 6, "rules[0].actions must not be empty",
                 id="empty-actions"),
    pytest.param(HEAD + RULE + 'actions = "shell"\n', 6, "must be a list of strings",
                 id="actions-not-a-list"),
    pytest.param(HEAD + RULE + 'actions = ["shell"]\ncommands = ["ls"]\n', 7,
                 "rules[0].commands apply to exec only", id="commands-on-shell"),
    pytest.param(HEAD + RULE + 'commands = ["ls", ""]\n', 6, "rules[0].commands[1]: ",
                 id="blank-pattern"),
    pytest.param(HEAD + RULE + 'commands = [\n  "ls",\n  "' + "x" * (MAX_PATTERN_LENGTH + 1)
                 + '",\n]\n', 8, f"at most {MAX_PATTERN_LENGTH} characters", id="long-pattern"),
    pytest.param(HEAD + RULE + 'commands = ["a\\u0007b"]\n', 6, "control characters",
                 id="control-character-in-pattern"),
    pytest.param(HEAD + RULE + "operators = {}\n", 6, "rules[0].operators must set at least one",
                 id="empty-operators"),
    pytest.param(HEAD + RULE + 'operators = { emails = ["not-an-email"] }\n', 6,
                 "rules[0].operators.emails[0]: 'not-an-email' is not an email address",
                 id="bad-email"),
    pytest.param(HEAD + RULE + 'operators = { roles = ["root"] }\n', 6,
                 "'root' must be one of admin, operator, approver, auditor", id="unknown-role"),
    pytest.param(HEAD + RULE + 'operators = { groups = ["x"] }\n', 6,
                 "rules[0].operators.groups is not a known key", id="unknown-operator-key"),
    pytest.param(HEAD + RULE + '[rules.agents]\ntags = ["prod", 3]\n', 7,
                 "rules[0].agents.tags[1] must be a string", id="tag-not-text"),
    pytest.param(HEAD + RULE + '[rules.agents]\nlabels = ["prod"]\n', 7,
                 "rules[0].agents.labels is not a known key", id="unknown-agent-key"),
    pytest.param(HEAD + RULE + 'when = "always"\n', 6, "rules[0].when must be a table",
                 id="when-not-a-table"),
    pytest.param(HEAD + RULE + '[rules.when]\ndays = ["mon", "tues"]\n', 7,
                 "rules[0].when.days[1]: day 'tues' must be one of mon, tue", id="unknown-day"),
    pytest.param(HEAD + RULE + '[rules.when]\nhours = "9-17"\n', 7,
                 "rules[0].when.hours: hours '9-17' must look like", id="hours-format"),
    pytest.param(HEAD + RULE + '[rules.when]\nhours = "09:00-25:00"\n', 7, "does not exist",
                 id="hours-past-midnight"),
    pytest.param(HEAD + RULE + '[rules.when]\nhours = "24:00-08:00"\n', 7, "does not exist",
                 id="hours-start-at-24"),
    pytest.param(HEAD + RULE + '[rules.when]\nhours = "09:00-09:00"\n', 7, "are empty",
                 id="hours-empty"),
    pytest.param(HEAD + RULE + '[rules.when]\ntimezone = "Mars/Olympus"\n', 7,
                 "rules[0].when.timezone: timezone 'Mars/Olympus' is not a known",
                 id="unknown-timezone"),
    pytest.param(HEAD + RULE + '[rules.when]\ntimezone = "../../etc/passwd"\n', 7,
                 "is not an IANA time zone name", id="timezone-path"),
    pytest.param(HEAD + RULE + '[rules.when]\ntimezone = "localtime"\n', 7,
                 "is not an IANA time zone name", id="host-dependent-timezone"),
    pytest.param(HEAD + RULE + '[rules.when]\nzone = "UTC"\n', 7,
                 "rules[0].when.zone is not a known key", id="unknown-when-key"),
    pytest.param(HEAD + 'high_risk = ["rm -rf *", 7]\n', 3, "high_risk[1] must be a string",
                 id="high-risk-not-text"),
    pytest.param(HEAD + "rules = 5\n", 3, "rules must be a list of [[rules]] tables",
                 id="rules-not-tables"),
    pytest.param(HEAD + "[rules]\nid = 1\n", 3, "rules must be a list", id="rules-as-one-table"),
    pytest.param(HEAD + 'description = """\n' + "x" * 2000 + '\n"""\n', 3, "longer than",
                 id="long-description"),
]


@pytest.mark.parametrize(("document", "line", "fragment"), BAD_DOCUMENTS)
def test_a_bad_document_is_refused_with_its_line(
    document: str, line: int | None, fragment: str
) -> None:
    with pytest.raises(PolicyDocumentError) as caught:
        parse_policy(document)
    message = str(caught.value)
    assert fragment in message
    if line is not None:
        assert caught.value.line == line
        assert message.startswith(f"policy.toml line {line}: ")


def test_the_error_message_reads_file_line_field_and_what_is_expected() -> None:
    document = HEAD + RULE + RULE.replace('"r"', '"s"') + RULE.replace('"r"', '"t"').replace(
        '"allow"', '"permit"'
    )
    with pytest.raises(PolicyDocumentError) as caught:
        parse_policy(document, source_name="team.toml")
    assert str(caught.value) == (
        "team.toml line 11: rules[2].outcome must be one of allow, deny, approval_required"
    )
    assert caught.value.field == "rules[2].outcome"


def test_a_toml_syntax_error_names_its_line_and_column() -> None:
    with pytest.raises(PolicyDocumentError) as caught:
        parse_policy(HEAD + RULE + "actions = [shell]\n")
    assert caught.value.line == 6
    assert str(caught.value).startswith("policy.toml line 6: is not valid TOML")


def test_an_oversized_document_is_refused_before_parsing() -> None:
    padding = "# " + "x" * MAX_POLICY_SIZE + "\n"
    for source in (HEAD + padding, (HEAD + padding).encode()):
        with pytest.raises(PolicyDocumentError, match="larger than"):
            parse_policy(source)


def test_more_rules_than_the_limit_are_refused() -> None:
    rules = "".join(f'[[rules]]\nid = "r{n}"\noutcome = "deny"\n' for n in range(MAX_RULES + 1))
    with pytest.raises(PolicyDocumentError, match=f"more than {MAX_RULES} rules"):
        parse_policy(HEAD + rules)


def test_a_document_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(PolicyDocumentError, match="not UTF-8"):
        parse_policy(b'version = 1\nmode = "\xff"\n')


def test_a_document_that_is_neither_text_nor_bytes_is_refused() -> None:
    with pytest.raises(PolicyDocumentError, match="must be text"):
        parse_policy(12)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None)
@given(
    rule_count=st.integers(min_value=1, max_value=6),
    bad_rule=st.data(),
    blank_lines=st.lists(st.integers(min_value=0, max_value=3), min_size=6, max_size=6),
)
def test_the_reported_line_is_where_the_bad_value_is(
    rule_count: int, bad_rule: st.DataObject, blank_lines: list[int]
) -> None:
    target = bad_rule.draw(st.integers(min_value=0, max_value=rule_count - 1))
    field = bad_rule.draw(st.sampled_from(["outcome", "hours", "tag", "pattern"]))
    lines = [*HEAD.splitlines()]
    expected_line = 0
    for index in range(rule_count):
        bad = index == target
        lines += [""] * blank_lines[index % len(blank_lines)]
        lines += ["[[rules]]", f'id = "rule-{index}"']
        lines.append('outcome = "sometimes"' if bad and field == "outcome" else 'outcome = "deny"')
        if bad and field == "outcome":
            expected_line = len(lines)
        lines += ["commands = [", '  "ls *",']
        lines.append('  "",' if bad and field == "pattern" else '  "cat *",')
        if bad and field == "pattern":
            expected_line = len(lines)
        lines.append("]")
        lines += ["[rules.agents]", "tags = ["]
        lines.append("  42," if bad and field == "tag" else '  "prod",')
        if bad and field == "tag":
            expected_line = len(lines)
        lines.append("]")
        lines += ["[rules.when]", 'days = ["mon"]  # a comment with "quotes" and [[rules]]']
        hours = "17:00-09:00:00" if bad and field == "hours" else "09:00-17:00"
        lines.append(f'hours = "{hours}"')
        if bad and field == "hours":
            expected_line = len(lines)
    with pytest.raises(PolicyDocumentError) as caught:
        parse_policy("\n".join(lines) + "\n")
    assert caught.value.line == expected_line
    assert caught.value.field is not None and caught.value.field.startswith(f"rules[{target}].")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=400))
def test_arbitrary_text_is_parsed_or_refused_with_a_document_error(text: str) -> None:
    try:
        parse_policy(text)
    except PolicyDocumentError:
        pass


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                'version = 1', 'mode = "allowlist"', 'mode = "blocklist"', "[[rules]]",
                'id = "a"', 'id = "b"', 'outcome = "deny"', 'outcome = "allow"', "[rules.when]",
                'hours = "22:00-06:00"', 'days = ["sun"]', 'timezone = "Asia/Tokyo"',
                'commands = ["x*"]', 'actions = ["exec"]', "[rules.agents]", 'tags = ["t"]',
                'operators = { roles = ["admin"] }', 'high_risk = ["rm *"]', "x = 1", "[x]",
            ]
        ),
        max_size=20,
    )
)
def test_shuffled_policy_lines_are_parsed_or_refused_with_a_document_error(
    lines: list[str],
) -> None:
    try:
        parse_policy("\n".join(lines))
    except PolicyDocumentError as error:
        assert str(error).startswith("policy.toml")
