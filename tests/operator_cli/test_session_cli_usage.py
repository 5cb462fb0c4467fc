"""What `tucdesk connect` and `tucdesk exec` say about arguments ssh users bring along."""

from __future__ import annotations

from pathlib import Path

import pytest

from operator_cli.main import main

# connect, exec and ssh exit 255 on a usage error, as ssh does for its own: argparse's 2 would
# read as the remote command's `exit 2` in a script (every test here is about these three).
EXIT_USAGE = 255


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
    assert "connect opens a shell; for one command use exec (-t for a terminal" in err
    assert "tucdesk exec -t AGENT -- CMD" in err


def test_an_option_after_the_agent_is_still_an_option(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # Not taken for a remote command: the escape character is checked (and refused) instead.
    assert main(["--home", str(tmp_path), "connect", "db-1", "-e", "~~"]) == 255
    assert "escape character" in capsys.readouterr().err


def test_exec_t_after_the_agent_is_taken_as_an_option_before_the_double_dash(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # tmp_path is no CLI home: the session fails to start, but -t was read as exec's option
    # (stdin is no terminal under pytest: it says so), not sent as the command "-t".
    assert main(["--home", str(tmp_path), "exec", "db-1", "-t", "--", "top"]) == 255
    err = capsys.readouterr().err
    assert "no terminal for the command: stdin is not a terminal (-tt forces one)" in err


def test_a_word_between_the_agent_and_the_double_dash_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, err = run_main(capsys, "--home", str(tmp_path), "exec", "db-1", "-n", "ls", "--", "x")
    assert code == EXIT_USAGE
    assert "between AGENT and -- only options go, not 'ls'" in err


def test_a_command_too_long_for_a_session_is_refused_before_contacting_anyone(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # tmp_path is no CLI home (not logged in): any request would fail with "not logged in".
    numbers = [str(number) for number in range(1, 3001)]
    assert main(["--home", str(tmp_path), "exec", "web-1", "--", "echo", *numbers]) == 255
    err = capsys.readouterr().err
    assert err.startswith("tucdesk: the command has 3001 arguments; at most 256 fit")
    assert "tucdesk exec web-1 -- sh -s < script.sh" in err
    assert main(["--home", str(tmp_path), "exec", "web-1", "--", "echo", "x" * 5000]) == 255
    assert "the command is 5011 bytes as sent" in capsys.readouterr().err


def test_ssh_refuses_a_login_user_and_an_empty_command(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["--home", str(tmp_path), "ssh", "-l", "root", "web-1", "ls"]) == 255
    assert "-l root: there is no login choice" in capsys.readouterr().err
    assert main(["--home", str(tmp_path), "ssh", "web-1"]) == 255
    assert "for an interactive shell use tucdesk connect AGENT" in capsys.readouterr().err


def test_ssh_fails_gits_option_probe_so_git_uses_the_simple_variant(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # git runs `SSH -G HOST` to tell OpenSSH from the rest: a failure means "simple".
    code, _ = run_main(capsys, "--home", str(tmp_path), "ssh", "-G", "web-1")
    assert code != 0


def test_ssh_runs_the_joined_words_through_sh_c(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import operator_cli.session_commands as session_commands

    sent: list[list[str]] = []

    def fake_exec(home: object, agent: str, argv: list[str], **options: object) -> int:
        sent.append(argv)
        return 0

    monkeypatch.setattr(session_commands, "exec_command", fake_exec)
    words = ["rsync", "--server", "-logDtpre.iLsfxCIvu", ".", "/tmp/x/sp\\ dst/"]
    assert main(["--home", str(tmp_path), "ssh", "web-1", *words]) == 0
    assert main(["--home", str(tmp_path), "ssh", "web-1", "--", "git-upload-pack '/p'"]) == 0
    assert sent == [["sh", "-c", "rsync --server -logDtpre.iLsfxCIvu . /tmp/x/sp\\ dst/"],
                    ["sh", "-c", "git-upload-pack '/p'"]]


def test_exec_help_states_the_limits_the_grant_enforces() -> None:
    from operator_cli import main as cli
    from protocol.exec_limits import MAX_COMMAND_ARGUMENTS, MAX_COMMAND_SIZE

    assert (cli.EXEC_MAX_ARGUMENTS, cli.EXEC_MAX_COMMAND_BYTES) == (
        MAX_COMMAND_ARGUMENTS, MAX_COMMAND_SIZE
    )


def test_exec_with_an_agent_and_a_tag_after_it_is_refused_not_run_on_the_agent(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, err = run_main(capsys, "--home", str(tmp_path), "exec", "web-1", "--tag", "db", "--",
                         "echo", "x")
    assert code == EXIT_USAGE
    assert "--tag runs on every agent carrying the tag, instead of AGENT ('web-1')" in err


def _sent_by_ssh(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *argv: str
) -> tuple[int, list[tuple[list[str], object]]]:
    import operator_cli.session_commands as session_commands

    sent: list[tuple[list[str], object]] = []

    def fake_exec(home: object, agent: str, command: list[str], **options: object) -> int:
        sent.append((command, options["no_stdin"]))
        return 0

    monkeypatch.setattr(session_commands, "exec_command", fake_exec)
    return main(["--home", str(tmp_path), "ssh", *argv]), sent


def test_ssh_reads_options_after_the_agent_as_ssh_does(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert _sent_by_ssh(monkeypatch, tmp_path, "web-1", "-n", "-T", "-q", "echo", "-n") == (
        0, [(["sh", "-c", "echo -n"], True)]
    )
    assert _sent_by_ssh(monkeypatch, tmp_path, "-Tq", "web-1", "-nT", "id") == (
        0, [(["sh", "-c", "id"], True)]
    )
    # After --, or once the command began, an option is the command's.
    assert _sent_by_ssh(monkeypatch, tmp_path, "web-1", "--", "-l", "x") == (
        0, [(["sh", "-c", "-l x"], False)]
    )
    assert _sent_by_ssh(monkeypatch, tmp_path, "web-1", "ls", "-l", "/") == (
        0, [(["sh", "-c", "ls -l /"], False)]
    )


def test_ssh_refuses_a_login_user_or_an_ssh_option_after_the_agent_too(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _sent_by_ssh(monkeypatch, tmp_path, "web-1", "-l", "root", "id") == (255, [])
    assert "-l root: there is no login choice" in capsys.readouterr().err
    assert _sent_by_ssh(monkeypatch, tmp_path, "web-1", "-lroot", "id") == (255, [])
    assert "-l root: there is no login choice" in capsys.readouterr().err
    for argv in (["-o", "BatchMode=yes", "web-1", "id"], ["web-1", "-o", "BatchMode=yes", "id"]):
        assert _sent_by_ssh(monkeypatch, tmp_path, *argv) == (255, [])
        assert "-o BatchMode=yes: tucdesk ssh takes no ssh configuration options" in (
            capsys.readouterr().err
        )
    with pytest.raises(SystemExit) as stopped:
        _sent_by_ssh(monkeypatch, tmp_path, "web-1", "-x", "id")
    assert stopped.value.code == EXIT_USAGE
    assert "option -x not recognized after AGENT" in capsys.readouterr().err


def test_ssh_after_a_double_dash_before_the_agent_reads_no_more_options(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # OpenSSH: a -- before the host ends the options for good (opt_terminated).
    assert _sent_by_ssh(monkeypatch, tmp_path, "--", "web-1", "-l", "x", "id") == (
        0, [(["sh", "-c", "-l x id"], False)]
    )
    assert _sent_by_ssh(monkeypatch, tmp_path, "-n", "--", "web-1", "-o", "A=b", "id") == (
        0, [(["sh", "-c", "-o A=b id"], True)]
    )


def test_ssh_t_is_counted_before_and_after_the_agent_and_T_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import operator_cli.session_commands as session_commands

    asked: list[object] = []

    def fake_exec(home: object, agent: str, command: list[str], **options: object) -> int:
        asked.append(options["pty"])
        return 0

    monkeypatch.setattr(session_commands, "exec_command", fake_exec)
    for argv in (["web-1", "id"], ["-t", "web-1", "id"], ["-t", "web-1", "-t", "id"],
                 ["web-1", "-tt", "id"], ["-t", "web-1", "-T", "id"]):  # fmt: skip
        assert main(["--home", str(tmp_path), "ssh", *argv]) == 0
    assert asked == [0, 1, 2, 2, 0]


def test_ssh_usage_error_after_the_agent_lists_every_option_it_reads_there(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        _sent_by_ssh(monkeypatch, tmp_path, "web-1", "-p", "22", "id")
    assert stopped.value.code == EXIT_USAGE
    assert "tucdesk ssh takes -n, -t, -l USER, -T, -q, -o OPTION;" in capsys.readouterr().err


class TaggedRuns:
    """The commands `exec --tag` would have run on the tagged agents."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        import operator_cli.tagged_exec as tagged_exec

        self.home = tmp_path
        self.sent: list[tuple[list[str], list[str]]] = []
        monkeypatch.setattr(tagged_exec, "exec_on_tagged", self._record)

    def _record(self, home: object, tags: list[str], command: list[str], **_: object) -> int:
        self.sent.append((list(tags), list(command)))
        return 0

    def run(self, *argv: str) -> int:
        return main(["--home", str(self.home), "exec", *argv])


def test_exec_by_tag_sends_everything_after_the_double_dash_as_typed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    runs = TaggedRuns(monkeypatch, tmp_path)
    assert runs.run("--tag", "web", "--", "grep", "--", "-v", "f") == 0
    assert runs.run("-n", "--tag", "web", "--tag", "db", "--", "-n", "x") == 0
    assert runs.run("--tag=web", "--", "--", "x") == 0
    assert runs.sent == [(["web"], ["grep", "--", "-v", "f"]),
                         (["web", "db"], ["-n", "x"]),
                         (["web"], ["--", "x"])]


@pytest.mark.parametrize(("argv", "word"), [
    # argparse would take the first word for AGENT and drop the -- after it: grep -v f, rm -rf.
    (["--tag", "web", "grep", "--", "-v", "f"], "grep"),
    (["--tag", "web", "rm", "--", "-rf"], "rm"),
    # An AGENT beside --tag is not run as the first word of the command.
    (["--tag", "web", "web-1", "--", "uptime"], "web-1"),
    (["--tag", "web", "-n", "web-1", "-n", "--", "uptime"], "web-1"),
])
def test_exec_by_tag_refuses_a_word_before_the_double_dash(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    argv: list[str], word: str,
) -> None:
    runs = TaggedRuns(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as stopped:
        runs.run(*argv)
    assert (stopped.value.code, runs.sent) == (EXIT_USAGE, [])
    err = capsys.readouterr().err
    assert err.startswith("usage: tucdesk exec ")
    assert f"with --tag there is no AGENT: {word!r} stands before the --" in err
    assert err.rstrip().endswith("tucdesk exec --tag TAG -- CMD [ARGS...]")


def test_exec_by_tag_requires_the_double_dash_before_the_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = TaggedRuns(monkeypatch, tmp_path)
    with pytest.raises(SystemExit) as stopped:
        runs.run("--tag", "web", "uptime")
    assert (stopped.value.code, runs.sent) == (EXIT_USAGE, [])
    assert "--tag needs -- before the command: tucdesk exec --tag TAG -- CMD [ARGS...]" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "command",
    [["-n", "--", "x"], ["--approval", "a", "--", "z"], ["--", "x"], ["-n", "x"]],
)
def test_exec_agent_double_dash_sends_a_command_that_starts_with_an_option_as_typed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: list[str]
) -> None:
    # As each `exec --tag` child is run: options, AGENT, --, then the user's command as typed.
    import operator_cli.session_commands as session_commands

    sent: list[tuple[list[str], object]] = []

    def fake_exec(home: object, agent: str, argv: list[str], **options: object) -> int:
        sent.append((argv, options["approval_id"]))
        return 0

    monkeypatch.setattr(session_commands, "exec_command", fake_exec)
    assert main(["--home", str(tmp_path), "exec", "-n", "agt_1", "--", *command]) == 0
    assert sent == [(command, None)]


def test_exec_t_refused_by_an_agent_that_predates_it_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from operator_cli.connect import ConnectOutcome
    from operator_cli.session_commands import _terminal_exit

    # An agent from before exec -t closes the session with its decoder's words for the field.
    older = "start message fields are wrong (missing [], extra ['pty'])"
    outcome = ConnectOutcome(message=f"the agent ended the session (protocol-error): {older}")
    assert _terminal_exit(outcome, ["top"], "web 1") == 255
    err = " ".join(capsys.readouterr().err.split())
    assert f"(protocol-error): {older} — the agent predates exec -t: upgrade it, or run the " \
        "command inside tucdesk connect 'web 1'" in err
