"""Usage errors of the session commands in scripts: connect, exec and ssh exit 255 on one (as
ssh does), so a script cannot mistake it for the remote command's own `exit 2`; the other
commands keep argparse's 2. And exec's --parallel and --json: bounded, and only with --tag."""

from __future__ import annotations

from pathlib import Path

import pytest

from operator_cli.main import MAX_PARALLEL_SESSIONS, main

EXIT_USAGE = 2
EXIT_CONNECTION_FAILED = 255


def usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path, *argv: str) -> tuple[
    object, str
]:
    with pytest.raises(SystemExit) as stopped:
        main(["--home", str(tmp_path), *argv])
    return stopped.value.code, capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    # An option exec does not know, before AGENT: the audit's `--timeout 5 h0 -- true` (rc 2).
    (["exec", "--timeout", "5", "h0", "--", "true"], "unrecognized arguments: --timeout"),
    (["--bogus", "exec", "h0", "--", "true"], "unrecognized arguments: --bogus"),
    (["exec"], "the following arguments are required: AGENT"),
    (["exec", "--approval-timeout", "soon", "h0", "--", "true"], "is not a duration"),
    (["ssh", "h0", "-p", "22", "true"], "option -p not recognized after AGENT"),
    (["connect", "-x", "h0"], "unrecognized arguments: -x"),
    (["connect", "h0", "--", "top"], "connect opens a shell"),
])
def test_a_session_command_usage_error_exits_255_with_its_message(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], message: str
) -> None:
    code, err = usage_error(capsys, tmp_path, *argv)
    assert code == EXIT_CONNECTION_FAILED
    assert err.startswith("usage: tucdesk") and message in err


@pytest.mark.parametrize("argv", [["agents", "--bogus"], ["bogus"], ["approvals", "show"],
                                  ["sessions", "--limit", "0"]])
def test_other_commands_keep_exit_2_for_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str]
) -> None:
    assert usage_error(capsys, tmp_path, *argv)[0] == EXIT_USAGE


@pytest.mark.parametrize("count", ["0", str(MAX_PARALLEL_SESSIONS + 1), "x"])
def test_parallel_is_bounded(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, count: str
) -> None:
    code, err = usage_error(capsys, tmp_path, "exec", "--tag", "web", "--parallel", count,
                            "--", "true")
    assert code == EXIT_CONNECTION_FAILED and "--parallel" in err


@pytest.mark.parametrize("flag", [["--parallel", "2"], ["--json"]])
def test_parallel_and_json_are_for_tag_only(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flag: list[str]
) -> None:
    code, err = usage_error(capsys, tmp_path, "exec", *flag, "h0", "--", "true")
    assert code == EXIT_CONNECTION_FAILED and f"{flag[0]} is for --tag" in err


def test_tag_passes_parallel_json_and_the_approval_timeout_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import operator_cli.tagged_exec as tagged_exec

    given: list[dict[str, object]] = []

    def record(home: object, tags: list[str], command: list[str], **options: object) -> int:
        given.append(options)
        return 0

    monkeypatch.setattr(tagged_exec, "exec_on_tagged", record)
    assert main(["--home", str(tmp_path), "exec", "--tag", "web", "-P", "3", "--json",
                 "--approval-timeout", "2m", "--", "true"]) == 0
    assert main(["--home", str(tmp_path), "exec", "--tag", "web", "--", "true"]) == 0
    assert [(options["parallel"], options["as_json"], options["approval_timeout"])
            for options in given] == [(3, True, 120), (8, False, None)]
