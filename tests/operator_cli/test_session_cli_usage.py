"""What `tucdesk connect` and `tucdesk exec` say about arguments ssh users bring along."""

from __future__ import annotations

from pathlib import Path

import pytest

from operator_cli.main import main

EXIT_USAGE = 2


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stopped:
        main(list(argv))
    code = stopped.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().err


def test_connect_with_a_command_points_to_exec_with_the_connect_usage(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, err = run_main(capsys, "--home", str(tmp_path), "connect", "db-1", "--", "top")
    assert code == EXIT_USAGE
    assert err.startswith("usage: tucdesk connect ")
    assert "connect opens a shell; for one command use exec (no PTY yet)" in err


def test_exec_t_says_there_is_no_pty_for_one_command_yet_with_the_exec_usage(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, err = run_main(capsys, "--home", str(tmp_path), "exec", "-t", "db-1", "--", "top")
    assert code == EXIT_USAGE
    assert err.startswith("usage: tucdesk exec ")
    assert "no PTY for one command yet" in err


def test_an_option_after_the_agent_is_still_an_option(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Not taken for a remote command: the escape character is checked (and refused) instead.
    assert main(["--home", str(tmp_path), "connect", "db-1", "-e", "~~"]) == 255
    assert "escape character" in capsys.readouterr().err
