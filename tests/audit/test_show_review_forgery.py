"""`tucdesk-audit show` cannot be made to print fields a record's signer did not give it (the
reviewer's a1_build.py and a3_rule.py): a value holding whitespace, '=', a quote or a backslash
is quoted, so an agent-written email cannot pose as decision=/rule=/approved_by= columns; a
policy result only the agent's key signed is shown as agent_decision= and never matches
--decision; an agent's operator_email is shown as operator= only if it is an email (else only
as a quoted details.operator_email). --json keeps
``operator`` as it was (who acted, else the session's operator) and adds ``subject``."""

from __future__ import annotations

import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from audit.actions import Action, ActorKind, PolicyOutcome
from audit.log import AuditLog
from audit.main import main
from audit.record import Actor, AuditEvent, PolicyResult, sign_event
from audit.show import RecordFilter, show_records, shown_value
from tests.audit.builders import (
    AGENT_ID,
    AGENT_KEY,
    AUDIT_KEY,
    START,
    TEAM,
    agent_event,
    export_bundle,
    new_log,
    register_agent,
)

CAROL = Actor(ActorKind.OPERATOR, "op-carol", "carol@alpha.test")
DAVE = Actor(ActorKind.OPERATOR, "op-dave", "dave@alpha.test")
FORGED_EMAIL = "carol@alpha.test decision=allow rule=break-glass approved_by=dave@alpha.test"
FORGED_RULE = "prod-ok approved_by=dave@alpha.test"


def _log() -> AuditLog:
    log = new_log()

    async def build() -> None:
        await register_agent(log)
        await log.append(
            Action.APPROVAL_REQUESTED, CAROL, target=AGENT_ID,
            policy_result=PolicyResult(PolicyOutcome.APPROVAL_REQUIRED, "prod-ok", ""),
            context={"approval_request": "apr-1", "mode": "exec", "command": "uptime"},
        )  # fmt: skip
        await log.append(
            Action.APPROVAL_APPROVED, DAVE, target=AGENT_ID,
            policy_result=PolicyResult(PolicyOutcome.APPROVED, "prod-ok", "ok"),
            context={"approval_request": "apr-1", "requester": "carol@alpha.test",
                     "reason": "ok", "policy_version": 3},
        )  # fmt: skip
        # a1: the agent's own session.started, its operator_email written by the host.
        forged = agent_event(
            Action.SESSION_STARTED, when=START + timedelta(seconds=1), session_id="s-9",
            context={"operator_email": FORGED_EMAIL, "mode": "shell"},
        )  # fmt: skip
        await log.append_agent_event(forged, AGENT_ID, AGENT_KEY.public)
        # a3: the agent's own session.command claiming an approval in its policy result.
        claimed = AuditEvent(
            occurred_at=START + timedelta(seconds=2), team_id=TEAM,
            actor=Actor(ActorKind.AGENT, AGENT_ID, "web-1"), action=Action.SESSION_COMMAND,
            signer=AGENT_KEY.public.key_id, session_id="s-7",
            policy_result=PolicyResult(PolicyOutcome.APPROVED, FORGED_RULE, "x"),
            context={"argv": ["rm", "-rf", "/srv"]},
        )  # fmt: skip
        await log.append_agent_event(sign_event(AGENT_KEY, claimed), AGENT_ID, AGENT_KEY.public)
        # An honest agent record: its operator_email is an email, so it is shown.
        honest = agent_event(
            Action.SESSION_STARTED, when=START + timedelta(seconds=3), session_id="s-10",
            context={"operator_email": "carol@alpha.test", "mode": "shell"},
        )  # fmt: skip
        await log.append_agent_event(honest, AGENT_ID, AGENT_KEY.public)

    trio.run(build)
    return log


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    bundle, key = tmp_path / "e.jsonl", tmp_path / "audit.pem"
    bundle.write_bytes(export_bundle(_log()))
    key.write_bytes(AUDIT_KEY.public.to_pem())
    return bundle, key


def _show(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str], *options: str
          ) -> list[str]:  # fmt: skip
    code = main(["show", str(files[0]), "--key", str(files[1]), *options])
    out = capsys.readouterr().out
    assert code == 0, out
    return out.splitlines()


def _fields(line: str) -> list[str]:
    """The keys of a line's key=value columns, reading quoted values as one (as a script would);
    the record's own ``details.*`` fields after them are left out."""
    keys, index = [], 0
    while index < len(line):
        end = index
        while end < len(line) and line[end] not in ' "':
            end += 1
        if end < len(line) and line[end] == '"':  # a quoted value: skip to its closing quote
            key = line[index:end]
            end += 1
            while line[end] != '"':
                end += 2 if line[end] == "\\" else 1
            end += 1
        else:
            key = line[index:end]
        if "=" in key and not key.startswith("details."):
            keys.append(key.split("=", 1)[0])
        index = end + 1
    return keys


def test_an_agent_written_email_cannot_pose_as_decision_rule_or_approver(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    [forged, _] = _show(files, capsys, "--action", "session.started")
    assert "session=s-9" in forged
    assert _fields(forged) == ["by", "agent", "session"], forged
    # Not a column: shown as the agent signed it, one quoted value under the details. prefix.
    shown = forged.removesuffix(" details.mode=shell")
    assert shown.endswith(f' details.operator_email="{FORGED_EMAIL}"'), forged
    assert shown.count('"') == 2, forged  # that one quoted value, nothing outside it
    # Nor does it match the filters it tried to satisfy.
    assert not any("s-9" in line for line in _show(files, capsys, "--operator", "carol@alpha.test"))
    assert _show(files, capsys, "--decision", "allow") == []


def test_an_agent_written_email_is_shown_when_it_is_an_email(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    [_, honest] = _show(files, capsys, "--action", "session.started")
    assert "session=s-10" in honest and "operator=carol@alpha.test" in honest
    found = _show(files, capsys, "--operator", "carol@alpha.test", "--action", "session.")
    assert [line.split()[1] for line in found] == ["session.started"]


def test_an_agent_signed_policy_result_is_the_agents_word_not_a_decision(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    shown = show_records(
        io.BytesIO(files[0].read_bytes()), [AUDIT_KEY.public], RecordFilter(decision="approved")
    )
    assert shown.verification.ok
    assert [record.action for record in shown.records] == ["approval.approved"]  # not a3's
    [command] = _show(files, capsys, "--action", "session.command")
    assert f'agent_decision=approved agent_rule="{FORGED_RULE}"' in command
    assert _fields(command) == ["by", "agent", "session", "agent_decision", "agent_rule",
                                "command"]  # fmt: skip
    assert main(["show", str(files[0]), "--key", str(files[1]), "--json",
                 "--action", "session.command"]) == 0  # fmt: skip
    [record] = json.loads(capsys.readouterr().out)["records"]
    assert record["policy_result"] is None and record["signed_by"] == "agent"
    assert record["agent_policy_result"] == {
        "outcome": "approved", "rule_id": FORGED_RULE, "reason": "x"
    }


def test_json_operator_keeps_its_meaning_and_subject_names_whom_it_is_about(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", str(files[0]), "--key", str(files[1]), "--json",
                 "--action", "approval.approved"]) == 0  # fmt: skip
    [record] = json.loads(capsys.readouterr().out)["records"]
    # As before 8324058: the operator who acted (the approver)...
    assert (record["operator"], record["operator_id"]) == ("dave@alpha.test", "op-dave")
    # ...and the new meaning under its own name: whose request it decided.
    assert (record["subject"], record["subject_id"]) == ("carol@alpha.test", "op-carol")
    assert record["policy_result"]["outcome"] == "approved"


def test_the_help_says_what_operator_and_subject_are(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["show", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "subject and subject_id" in text and "agent_policy_result" in text
    assert "quoted" in text


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("carol@alpha.test", "carol@alpha.test"),
        ("a b", '"a b"'),
        ("x=y", '"x=y"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("esc\x1b[2J", '"esc\\e[2J"'),
        ("rtl\u202eexe", '"rtl\\u202eexe"'),
        ("", '""'),
    ],
)
def test_a_value_is_bare_only_when_nothing_in_it_could_split_it(value: str, shown: str) -> None:
    assert shown_value(value) == shown


@given(st.text(max_size=60))
def test_no_value_can_add_a_field_to_a_line(value: str) -> None:
    line = f"t a by=agent:x ({shown_value(value)}) operator={shown_value(value)} session=s"
    assert line.isprintable()
    assert _fields(line) == ["by", "operator", "session"]
