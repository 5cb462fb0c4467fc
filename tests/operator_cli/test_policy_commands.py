"""The pure parts of `tucdesk policy` and `tucdesk roster`: version bumps, roster diffs, parsing.

The commands themselves run against the real stack in test_policy_stack.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from operator_cli.main import build_parser, policy_drift
from operator_cli.policy_commands import (
    PolicyCommandError,
    TeamPolicy,
    parse_instant,
    roster_changes,
    tag_changes,
    with_version,
)
from protocol.identity import SigningIdentity, b64url
from protocol.policy import (
    PolicyBundleContent,
    PolicyDocumentError,
    Roster,
    RosterEntry,
    parse_policy,
    sign_policy_bundle,
)
from protocol.policy.roster import Role

ADMIN = SigningIdentity.generate()
OPERATOR = SigningIdentity.generate()
APPROVER = SigningIdentity.generate()

POLICY = """# team policy
version = 3   # raised on every change
mode = "allowlist"
high_risk = ["*rm -rf*"]

[[rules]]
id = "ops"
outcome = "allow"
operators = { roles = ["operator", "admin"] }
description = "version = 99 in a rule is not the document's version"
"""


def entry(identity: SigningIdentity, email: str, role: Role) -> RosterEntry:
    return RosterEntry(identity.public, email, role)


def test_with_version_changes_only_the_number_and_keeps_the_comment() -> None:
    bumped = with_version(POLICY, 4)
    assert parse_policy(bumped).version == 4
    assert bumped.replace("version = 4   #", "version = 3   #", 1) == POLICY


@settings(max_examples=60, deadline=None)
@given(
    old=st.integers(min_value=1, max_value=10**9),
    new=st.integers(min_value=1, max_value=10**9),
    key=st.sampled_from(["version", '"version"', "'version'"]),
    spacing=st.sampled_from(["=", " = ", "  =\t"]),
    comment=st.sampled_from(["", "  # note", " # version = 7"]),
    preamble=st.sampled_from(["", "# header\n", 'description = "x"\n\n']),
)
def test_with_version_sets_any_version_whatever_the_layout(
    old: int, new: int, key: str, spacing: str, comment: str, preamble: str
) -> None:
    text = f'{preamble}{key}{spacing}{old}{comment}\nmode = "blocklist"\n'
    bumped = with_version(text, new)
    assert parse_policy(bumped).version == new
    assert bumped.splitlines()[-1] == 'mode = "blocklist"'
    assert bumped.count("\n") == text.count("\n")


def test_with_version_refuses_a_document_without_a_top_level_version_line() -> None:
    with pytest.raises(PolicyCommandError, match="version = N"):
        with_version('mode = "allowlist"\n[[rules]]\nid = "a"\noutcome = "allow"\n', 2)


def test_roster_changes_name_added_removed_and_changed_keys() -> None:
    signed = Roster.of([
        entry(ADMIN, "admin@x.test", Role.ADMIN),
        entry(OPERATOR, "op@x.test", Role.OPERATOR),
    ])
    current = Roster.of([
        entry(ADMIN, "admin@x.test", Role.ADMIN),
        entry(APPROVER, "appr@x.test", Role.APPROVER),
        # OPERATOR's key removed; and a promoted admin shows as changed:
    ])
    changes = {(change.kind, change.email) for change in roster_changes(signed, current)}
    assert changes == {("added", "appr@x.test"), ("removed", "op@x.test")}

    promoted = Roster.of([
        entry(ADMIN, "admin@x.test", Role.ADMIN), entry(OPERATOR, "op@x.test", Role.ADMIN),
    ])
    [change] = roster_changes(signed, promoted)
    assert (change.kind, change.email, change.detail) == ("changed", "op@x.test",
                                                          "operator -> admin")


def test_an_unchanged_roster_has_no_pending_changes() -> None:
    roster = Roster.of([entry(ADMIN, "admin@x.test", Role.ADMIN)])
    assert roster_changes(roster, roster) == []
    assert tag_changes({"agt_1": frozenset({"prod"})}, {"agt_1": frozenset({"prod"})}) == []


def test_tag_changes_show_old_and_new_tags_of_each_agent() -> None:
    lines = tag_changes({"agt_1": frozenset({"prod"})},
                        {"agt_1": frozenset({"prod", "db"}), "agt_2": frozenset({"web"})})
    assert len(lines) == 2
    assert "agt_1" in lines[0] and "prod -> db,prod" in lines[0]
    assert "agt_2" in lines[1] and "(none) -> web" in lines[1]


def test_team_policy_parses_the_contracts_answer_with_and_without_a_bundle() -> None:
    pending = {
        "roster": [
            {"public_key": b64url(ADMIN.public.raw), "email": "admin@x.test", "role": "admin",
             "operator_id": "opr_1"},
        ],
        "agent_tags": {"agt_1": ["prod"]},
    }
    empty = TeamPolicy.from_response({"bundle": None, "version": 0, "pending": pending})
    assert empty.bundle is None and empty.version == 0 and empty.signed_roster is None
    assert empty.current_roster.may_approve(ADMIN.public.key_id)
    assert empty.current_tags == {"agt_1": frozenset({"prod"})}

    content = PolicyBundleContent(
        team_id="team_1", version=3, issued_at=1_800_000_000, policy_text=POLICY,
        roster=empty.current_roster, agent_tags={}, previous_sha256=None,
    )
    signed = sign_policy_bundle(content, ADMIN)
    state = TeamPolicy.from_response({"bundle": signed.to_json(), "version": 3,
                                      "pending": pending})
    assert state.bundle == signed and state.signed_tags == {}


def test_team_policy_refuses_a_malformed_answer_with_one_line() -> None:
    with pytest.raises(PolicyCommandError, match="malformed"):
        TeamPolicy.from_response({"bundle": {"content": {}}, "version": 1, "pending": {}})
    with pytest.raises(PolicyCommandError):
        TeamPolicy.from_response(["not", "an", "object"])


def test_a_policy_document_error_names_the_file_and_line() -> None:
    with pytest.raises(PolicyDocumentError, match=r"team\.toml line 2"):
        parse_policy('version = 1\nmode = "maybe"\n', source_name="team.toml")


def test_parse_instant_needs_an_offset() -> None:
    assert parse_instant("2026-03-29T02:30:00+02:00") == datetime(
        2026, 3, 29, 0, 30, tzinfo=UTC
    )
    assert parse_instant("2026-11-01T06:30:00Z").utcoffset() == timedelta(0)
    with pytest.raises(PolicyCommandError, match="offset"):
        parse_instant("2026-03-29T02:30:00")
    with pytest.raises(PolicyCommandError, match="not a time"):
        parse_instant("yesterday")


def test_policy_drift_marks_agents_behind_the_team_version() -> None:
    assert policy_drift(4, 4) == "v4"
    assert policy_drift(3, 4) == "v3 (!= v4)"
    assert policy_drift(None, 2) == "none (!= v2)"
    assert policy_drift(None, 0) == "none"


def test_the_parser_knows_the_policy_roster_and_approval_commands() -> None:
    parser = build_parser()
    args = parser.parse_args(["policy", "test", "--operator", "a@x.test", "--agent", "web-1",
                              "--action", "exec", "--command", "rm -rf /tmp/x",
                              "--at", "2026-03-29T02:30:00Z"])
    assert (args.action, args.command) == ("exec", "rm -rf /tmp/x")
    assert parser.parse_args(["roster", "sign", "--yes"]).yes
    assert parser.parse_args(["approve", "apr_1", "--reason", "ok"]).reason == "ok"
    assert parser.parse_args(["deny", "apr_1"]).request_id == "apr_1"
    exec_args = parser.parse_args(["exec", "--no-wait", "--approval", "apr_2", "web-1", "--",
                                   "true"])
    assert exec_args.no_wait and exec_args.approval == "apr_2"
    assert parser.parse_args(["connect", "--no-wait", "web-1"]).no_wait


KEYS = [SigningIdentity.generate() for _ in range(5)]
ROSTER_ENTRIES = st.lists(
    st.tuples(st.integers(0, len(KEYS) - 1), st.sampled_from(["a@x.test", "b@x.test"]),
              st.sampled_from(list(Role))),
    max_size=len(KEYS), unique_by=lambda item: item[0],
).map(lambda items: Roster.of(RosterEntry(KEYS[i].public, email, role)
                              for i, email, role in items))


@settings(max_examples=80, deadline=None)
@given(signed=ROSTER_ENTRIES, current=ROSTER_ENTRIES)
def test_roster_changes_list_exactly_the_keys_that_differ(signed: Roster, current: Roster) -> None:
    changes = roster_changes(signed, current)
    before = {entry.thumbprint: entry for entry in signed.entries}
    after = {entry.thumbprint: entry for entry in current.entries}
    assert {c.thumbprint for c in changes if c.kind == "added"} == set(after) - set(before)
    assert {c.thumbprint for c in changes if c.kind == "removed"} == set(before) - set(after)
    assert {c.thumbprint for c in changes if c.kind == "changed"} == {
        key for key in set(before) & set(after) if before[key] != after[key]
    }
    assert (changes == []) == (signed == current)
