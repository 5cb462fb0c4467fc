"""`tucdesk-audit show`: the records of a bundle that verified, one line each, filtered, joined
with who approved a session, and never a raw control character on the terminal."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import trio

from audit.actions import Action, ActorKind, PolicyOutcome
from audit.log import AuditLog
from audit.main import main
from audit.record import Actor, PolicyResult
from tests.audit.builders import (
    AGENT_ID,
    AGENT_KEY,
    AUDIT_KEY,
    START,
    StepClock,
    agent_event,
    export_bundle,
    new_log,
    register_agent,
)

ALICE = Actor(ActorKind.OPERATOR, "op-1", "alice@example.com")
BOB = Actor(ActorKind.OPERATOR, "op-2", "bob@example.com")
# What a hostile requester may put in a command: a terminal escape, a bidi override, a newline.
HOSTILE = ["sh", "-c", "echo \x1b[2Jrm -rf / \u202egnp.exe\nid"]


def _approved_session_log() -> AuditLog:
    clock = StepClock()
    log = new_log(clock=clock)

    async def build() -> None:
        await register_agent(log)
        await log.append(
            Action.APPROVAL_APPROVED, BOB, target=AGENT_ID,
            policy_result=PolicyResult(PolicyOutcome.APPROVED, "rule-1", "ok"),
            context={"approval_request": "apr-1", "requester": "alice@example.com"},
        )  # fmt: skip
        await log.append(
            Action.SESSION_REQUESTED, ALICE, target=AGENT_ID, session_id="s-1",
            context={"command": "sh -c 'echo \x1b[2J'", "approval_request": "apr-1"},
        )  # fmt: skip
        steps: list[tuple[Action, dict[str, object]]] = [
            (Action.SESSION_STARTED, {"operator_email": "alice@example.com",
                                      "approval_request_id": "apr-1", "mode": "exec"}),
            (Action.SESSION_COMMAND, {"argv": HOSTILE, "truncated": False, "argc": 3}),
        ]  # fmt: skip
        for action, context in steps:
            await log.append_agent_event(
                agent_event(action, when=clock.now, context=context), AGENT_ID, AGENT_KEY.public
            )
        clock.now += timedelta(hours=1)
        await log.append(Action.POLICY_SET, BOB, context={"version": 2})

    trio.run(build)
    return log


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    bundle, key = tmp_path / "e.jsonl", tmp_path / "audit.pem"
    bundle.write_bytes(export_bundle(_approved_session_log()))
    key.write_bytes(AUDIT_KEY.public.to_pem())
    return bundle, key


def show(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str], *options: str
         ) -> tuple[int, list[str]]:  # fmt: skip
    code = main(["show", str(files[0]), "--key", str(files[1]), *options])
    return code, capsys.readouterr().out.splitlines()


def test_every_record_is_shown_one_per_line_with_no_raw_control_character(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = show(files, capsys)
    assert code == 0 and len(lines) == 6
    assert all(line.isprintable() for line in lines)
    assert lines[0].startswith(f"{(START + timedelta(milliseconds=1)).isoformat()[:19]}")
    assert " agent.registered by=service:rendezvous " in lines[0]
    assert "agent=web-1 (agent-1)" in lines[0]


def test_a_started_session_names_who_approved_it(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = show(files, capsys, "--action", "session.started")
    assert code == 0
    [started] = lines
    assert "approved_by=bob@example.com" in started
    assert "operator=alice@example.com" in started and "agent=web-1 (agent-1)" in started
    # The session's requested command, quoted as one value (it holds spaces).
    assert "command=\"sh -c 'echo \\e[2J'\"" in started


def test_the_executed_command_is_quoted_as_it_runs_with_escapes(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = show(files, capsys, "--action", "session.command")
    assert code == 0
    [command] = lines
    # bash's $'…' form, as one quoted value: its own backslashes doubled.
    assert " command=\"sh -c $'echo \\\\e[2Jrm -rf / \\\\u202egnp.exe\\\\nid'\" " in f"{command} "
    assert "operator=alice@example.com" in command  # joined through the session


def test_filters_combine(files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert len(show(files, capsys, "--agent", "web-1")[1]) == 5
    # Alice's session records, and bob's approval of her request (she is whom it is about).
    assert len(show(files, capsys, "--agent", AGENT_ID, "--operator", "alice@example.com")[1]) == 4
    assert len(show(files, capsys, "--operator", "op-2")[1]) == 2
    later = (START + timedelta(minutes=30)).isoformat()
    code, lines = show(files, capsys, "--from", later)
    assert code == 0 and [" policy.set " in line for line in lines] == [True]
    assert len(show(files, capsys, "--to", later)[1]) == 5
    code = main(["show", str(files[0]), "--key", str(files[1]), "--from", "yesterday"])
    assert code == 2 and "is not a time" in capsys.readouterr().err


def test_json_lists_the_records_and_the_verification(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = show(files, capsys, "--action", "session.started", "--json")
    result = json.loads("\n".join(lines))
    assert code == 0 and result["verification"]["code"] == "valid"
    [record] = result["records"]
    assert record["approved_by"] == "bob@example.com" and record["agent_name"] == "web-1"


def test_nothing_is_shown_from_a_bundle_that_does_not_verify(
    files: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    lines = files[0].read_bytes().splitlines(keepends=True)
    files[0].write_bytes(b"".join([*lines[:3], *lines[4:]]))  # a record removed
    code, shown = show(files, capsys)
    assert code == 1 and len(shown) == 1 and shown[0].startswith("INVALID: ")
    code, shown = show(files, capsys, "--json")
    result = json.loads("\n".join(shown))
    assert code == 1 and result["records"] == []
