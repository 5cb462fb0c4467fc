"""`tucdesk sessions end` and `agents remove`: what they print of the service's answers, and the
arguments `sessions end` takes (the whole flow runs in test_session_end_stack.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from operator_cli.agent_removal import removal_sessions_line
from operator_cli.home import CliHome
from operator_cli.main import build_parser
from operator_cli.session_end import EXIT_FAILURE, ended_line, sessions_end


def _view(**fields: object) -> dict[str, object]:
    return {"session_id": "ses_1", "state": "ended", "reason": "ended_by_admin", **fields}


def test_an_ended_session_says_whether_the_agent_was_reached() -> None:
    here = ended_line({"session": _view(), "already_ended": False, "agent_reached": "here"})
    # Told, not confirmed: a compromised agent may ignore it (docs/security-model.md).
    assert here == "ended session ses_1 (recorded as ended_by_admin): the agent was told to " \
        "end it now"
    away = ended_line({"session": _view(), "already_ended": False,
                       "agent_reached": "not_connected"})  # fmt: skip
    assert "not connected now" in away and "when it reconnects" in away


def test_a_session_ended_already_is_said_so_with_its_reason_escaped() -> None:
    line = ended_line({"session": _view(reason="normal\x1b[2J"), "already_ended": True})
    assert line == "session ses_1 was already ended (normal\\e[2J)"


def test_the_removal_says_how_many_sessions_it_ended_and_whether_the_agent_heard() -> None:
    assert removal_sessions_line({"ended_sessions": []}) == "open sessions ended: 0"
    told = removal_sessions_line({"ended_sessions": ["a", "b"], "agent_reached": "here"})
    assert told.startswith("open sessions ended: 2 (recorded as agent_removed); the agent was")
    offline = removal_sessions_line({"ended_sessions": ["a"], "agent_reached": "not_connected"})
    assert "not connected" in offline and "record only" in offline


@pytest.mark.parametrize(
    "given",
    [
        (None, None, None),
        ("ses_1", "web-1", None),
        (None, "web-1", "alice@example.com"),
    ],
)
def test_sessions_end_takes_exactly_one_of_an_id_an_agent_or_an_operator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], given: tuple[str | None, ...]
) -> None:
    session_id, agent, operator = given
    code = sessions_end(CliHome(tmp_path), session_id, agent=agent, operator=operator,
                        assume_yes=True)  # fmt: skip
    assert code == EXIT_FAILURE
    assert "give one SESSION_ID, or --agent, or --operator" in capsys.readouterr().err


def test_sessions_end_parses_its_options() -> None:
    args = build_parser().parse_args(["sessions", "end", "--agent", "web-2", "--yes"])
    assert (args.session_id, args.agent, args.operator, args.yes) == (None, "web-2", None, True)
