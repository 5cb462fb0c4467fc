"""`tucdesk-audit show` gives each record's details, so an investigator need not grep the raw,
unverified JSONL: why a session ended, which keys a revocation revoked, an API key's id and
scopes, the command an approver approved. On a line they follow the columns as
``details.KEY=VALUE`` (and ``target=``), quoted as every value is, bounded per record; ``--json``
gives the context unchanged. No context key or value can pose as a column or start a line."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.actions import Action, ActorKind, PolicyOutcome
from audit.main import main
from audit.record import MAX_CONTEXT_KEY_LENGTH, Actor, PolicyResult
from audit.show import (
    MAX_SHOWN_DETAIL,
    MAX_SHOWN_DETAILS,
    RecordFilter,
    ShownRecord,
    show_records,
)
from tests.audit.builders import (
    AGENT_ID,
    AGENT_KEY,
    AUDIT_KEY,
    START,
    agent_event,
    export_bundle,
    new_log,
    register_agent,
)

ADMIN = Actor(ActorKind.OPERATOR, "op-admin", "admin@alpha.test")
CAROL = Actor(ActorKind.OPERATOR, "op-carol", "carol@alpha.test")
REVOKED = {"email": "carol@alpha.test", "role": "operator", "api_keys": ["ak_1", "ak_2"],
           "registration_keys": ["rk_9"], "invites": []}  # fmt: skip
API_KEY = {"name": "ci deploy", "scopes": ["sessions:create", "agents:read"]}
APPROVED = {"approval_request": "apr-1", "requester": "carol@alpha.test", "reason": "ok",
            "policy_version": 3, "mode": "exec", "command": "systemctl restart nginx"}  # fmt: skip
ENDED = {"reason": "operator_disabled", "exit_code": None, "signal": 15}
# The columns show has always printed, in --json: scripts read them.
JSON_KEYS = {"seq", "time", "action", "actor", "agent_id", "agent_name", "operator",
             "operator_id", "subject", "subject_id", "session_id", "command", "approved_by",
             "policy_result", "agent_policy_result", "signed_by", "signer_key_id"}  # fmt: skip


def _bundle(tmp_path: Path) -> tuple[Path, Path]:
    log = new_log()

    async def build() -> None:
        await register_agent(log)
        await log.append(Action.OPERATOR_REVOKED, ADMIN, target="operator:op-carol",
                         context=REVOKED)  # fmt: skip
        await log.append(Action.API_KEY_CREATED, ADMIN, target="api_key:ak_7", context=API_KEY)
        await log.append(
            Action.APPROVAL_APPROVED, ADMIN, target=AGENT_ID, context=APPROVED,
            policy_result=PolicyResult(PolicyOutcome.APPROVED, "prod", "ok"),
        )  # fmt: skip
        ended = agent_event(Action.SESSION_ENDED, when=START + timedelta(seconds=1),
                            session_id="s-1", context=ENDED)  # fmt: skip
        await log.append_agent_event(ended, AGENT_ID, AGENT_KEY.public)

    trio.run(build)
    bundle, key = tmp_path / "e.jsonl", tmp_path / "audit.pem"
    bundle.write_bytes(export_bundle(log))
    key.write_bytes(AUDIT_KEY.public.to_pem())
    return bundle, key


def _show(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str], *options: str
          ) -> str:  # fmt: skip
    code = main(["show", str(files[0]), "--key", str(files[1]), *options])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def _line(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str], action: str) -> str:
    [line] = _show(files, capsys, "--action", action).splitlines()
    return line


def test_the_details_an_investigator_needs_are_on_the_lines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _bundle(tmp_path)
    ended = _line(files, capsys, "session.ended")
    assert ended.endswith(" details.exit_code=null details.reason=operator_disabled"
                          " details.signal=15")  # fmt: skip
    revoked = _line(files, capsys, "operator.revoked")
    assert " operator=carol@alpha.test " in revoked and "target=" not in revoked
    # In the order the record holds them (its canonical, sorted encoding).
    assert revoked.endswith(" details.api_keys=[ak_1,ak_2] details.email=carol@alpha.test"
                            " details.invites=[] details.registration_keys=[rk_9]"
                            " details.role=operator")  # fmt: skip
    created = _line(files, capsys, "api_key.created")
    assert created.endswith(' target=api_key:ak_7 details.name="ci deploy"'
                            " details.scopes=[sessions:create,agents:read]")  # fmt: skip
    approved = _line(files, capsys, "approval.approved")
    assert ' details.command="systemctl restart nginx"' in approved
    assert " details.policy_version=3 " in approved
    # The columns before them are as they were.
    assert approved.split(" details.")[0].endswith(
        "by=operator:op-admin (admin@alpha.test) agent=web-1 (agent-1)"
        " operator=carol@alpha.test decision=approved rule=prod"
    )


def test_json_gives_the_details_unchanged_and_keeps_its_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = _bundle(tmp_path)
    records = json.loads(_show(files, capsys, "--json"))["records"]
    by_action = {record["action"]: record for record in records}
    assert by_action["operator.revoked"]["details"] == REVOKED
    assert by_action["api_key.created"]["details"] == API_KEY
    assert by_action["api_key.created"]["target"] == "api_key:ak_7"
    assert by_action["approval.approved"]["details"] == APPROVED
    assert by_action["session.ended"]["details"] == ENDED
    for record in records:
        assert JSON_KEYS <= set(record), record


def _record(details: dict[str, object], action: str = "operator.revoked") -> ShownRecord:
    return ShownRecord(
        seq=1, time="2026-11-26T10:00:00Z", action=action, actor_kind="operator",
        actor_id="op-admin", actor_display="admin@alpha.test", agent_id=None, agent_name=None,
        operator=None, session_id=None, command=None, approved_by=None, signer_key_id="k",
        details=details,  # type: ignore[arg-type]
    )  # fmt: skip


def _tokens(line: str) -> list[str]:
    """A line split as a script would: at spaces outside double quotes (``\\"`` stays in)."""
    tokens, current, quoted, escaped = [], "", False, False
    for char in line:
        if escaped:
            current, escaped = current + char, False
        elif char == "\\" and quoted:
            current, escaped = current + char, True
        elif char == '"':
            current, quoted = current + char, not quoted
        elif char == " " and not quoted:
            tokens.append(current)
            current = ""
        else:
            current += char
    assert not quoted, line
    return [*tokens, current]


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),  # fmt: skip
    max_leaves=8,
)


@settings(max_examples=300)
@given(st.dictionaries(st.text(min_size=1, max_size=MAX_CONTEXT_KEY_LENGTH), _values,
                       max_size=8))  # fmt: skip
def test_no_context_can_fake_a_column_or_a_line(details: dict[str, object]) -> None:
    line = _record(details).line()
    assert "\n" not in line and "\r" not in line and line.isprintable()
    tokens = _tokens(line)
    assert tokens[:3] == ["2026-11-26T10:00:00Z", "operator.revoked",
                          "by=operator:op-admin"]  # fmt: skip
    # Everything after the columns is the record's details (or the count of those cut).
    rest = tokens[4:]
    assert all(token.startswith("details.") or token.startswith("details_omitted=")
               for token in rest), line  # fmt: skip


def test_a_forged_context_key_reads_as_a_detail_not_a_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    line = _record({"decision": "allow", "by": "x", "x approved_by": "dave"}).line()
    assert line.endswith(' details.decision=allow details.by=x details."x approved_by"=dave')
    assert " decision=" not in line and " approved_by=" not in line


def test_details_are_bounded_per_record_with_markers() -> None:
    long_value = "a" * 5000
    line = _record({"long": long_value, "then": "b"}).line()
    shown_long = line.split("details.long=")[1].split(" ")[0]
    assert shown_long == "a" * (MAX_SHOWN_DETAIL - 1) + "…"
    assert " details.then=b" in line
    many = {f"key{index}": "v" * 150 for index in range(40)}
    line = _record(many).line()
    details = line[line.index(" details."):]
    assert len(details) <= MAX_SHOWN_DETAILS + len(" details_omitted=40")
    shown = details.count(" details.")
    assert shown >= 1 and line.endswith(f" details_omitted={40 - shown}")


def test_a_session_records_command_is_its_column_not_repeated_as_a_detail() -> None:
    record = _record({"argv": ["ls", "-l"], "command": "ls -l", "operator_email": "x y",
                      "exit_code": 0}, action="session.command")  # fmt: skip
    # Only the fields its columns were built from are left out (tests/audit/test_review10_*).
    line = dataclasses.replace(record, column_fields=frozenset({"argv", "operator_email"})).line()
    assert line.endswith(' details.command="ls -l" details.exit_code=0')


def test_a_string_that_would_pass_for_another_type_is_quoted() -> None:
    line = _record({"n": 3, "s": "3", "t": "true", "list": ["a", "b"], "text": "[a,b]"}).line()
    assert line.endswith(' details.n=3 details.s="3" details.t="true" details.list=[a,b]'
                         ' details.text="[a,b]"')  # fmt: skip


def test_show_records_keeps_the_context_for_callers(tmp_path: Path) -> None:
    bundle, _ = _bundle(tmp_path)
    shown = show_records(bundle, [AUDIT_KEY.public], RecordFilter(action_prefix="api_key."))
    [record] = shown.records
    assert dict(record.details) == API_KEY and record.target == "api_key:ak_7"
