"""``status`` and ``check`` tell the truth about a host: the daemon's lock decides whether it
runs; ``check`` fails on what would stop ``run`` or every session; a mistyped [agent] table is
refused rather than ignored."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from agent.daemon_lock import acquire_daemon_lock
from agent.main import EXIT_CONFIG, STATUS_DISCONNECTED, STATUS_NOT_RUNNING
from agent.main import main as agent_main
from agent.state_file import AgentState, save_state
from agent.status import DaemonStatus, write_status
from tests.agent.test_control_client import AGENT_COMMAND, MACHINE, daemon_options


def enrolled_state_dir(tmp_path: Path) -> list[str]:
    """Options for a state dir holding a sealed state (plain HTTP to loopback: no CA)."""
    state_dir = tmp_path / "state"
    common, _ = daemon_options(tmp_path, state_dir)
    state = AgentState(
        agent_id="agt_1", team_id="tm_1", server_url="http://127.0.0.1:9",
        identity_seed=bytes(32), service_keys={},
    )  # fmt: skip
    save_state(state_dir / "agent.state", state, MACHINE)
    return common


def test_status_believes_the_lock_when_the_daemon_cannot_write_its_status_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = enrolled_state_dir(tmp_path)
    state_dir = tmp_path / "state"
    # What an earlier daemon left (its pid long gone), an hour before this one started.
    write_status(
        state_dir / "status.json",
        DaemonStatus(2**22 + 7, "http://127.0.0.1:9", True, time.time() - 3600, None, None),
    )
    with acquire_daemon_lock(state_dir):  # the running daemon (this process) holds the lock
        code = agent_main(["status", *common], environ={})
    out = capsys.readouterr().out
    assert code == STATUS_DISCONNECTED, out
    assert f"Daemon:       running (pid {os.getpid()})" in out
    assert f"the status file is from pid {2**22 + 7}" in out and "not from this daemon" in out
    assert "cannot write the file" in out and "Connected:    unknown" in out
    # No status file at all (the state dir filled up before the first one): running too.
    (state_dir / "status.json").unlink()
    with acquire_daemon_lock(state_dir):
        assert agent_main(["status", *common], environ={}) == STATUS_DISCONNECTED
    assert "there is no status file" in capsys.readouterr().out
    # And with the lock free, not running whatever the file says.
    assert agent_main(["status", *common], environ={}) == STATUS_NOT_RUNNING


def refusing_account() -> pwd.struct_passwd:
    """An account whose login shell is nologin or false (nobody, on most systems)."""
    for account in pwd.getpwall():
        if os.path.basename(account.pw_shell) in ("nologin", "false"):
            return account
    pytest.skip("no account with a nologin or false shell on this host")


def test_check_fails_for_a_session_user_whose_shell_refuses_to_run_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = enrolled_state_dir(tmp_path)
    account = refusing_account()
    assert agent_main(["check", *common, "--user", account.pw_name], environ={}) == 1
    captured = capsys.readouterr()
    assert "Configuration OK" not in captured.out
    assert (
        f"Shell: user {account.pw_name}'s login shell is {account.pw_shell}, which refuses to "
        "run anything: every shell session and every exec command line would fail"
    ) in captured.err
    # A shell setting fixes shell sessions; check says what still goes through the login shell.
    arguments = ["check", *common, "--user", account.pw_name, "--shell", "/bin/sh"]
    assert agent_main(arguments, environ={}) == 0
    assert "exec command lines run through" in capsys.readouterr().out


def in_read_only_state_dir(state_dir: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    """``tucdesk-agent ARGUMENTS`` with ``state_dir`` bind-mounted read-only, in a mount
    namespace of its own (nothing outside it sees the mount)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    namespace = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-rm"]
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TUCDESK_AGENT_")}
    result = subprocess.run(
        [*namespace, "sh", "-c", script, "sh", str(state_dir), AGENT_COMMAND, *arguments],
        capture_output=True, text=True, check=False, env=environment, timeout=60,
    )  # fmt: skip
    if "mount" in result.stderr and "tucdesk-agent" not in result.stderr:
        pytest.skip(f"cannot make a read-only mount here: {result.stderr.strip()}")
    return result


def test_a_read_only_state_dir_stops_run_with_78_and_fails_check(tmp_path: Path) -> None:
    common = enrolled_state_dir(tmp_path)
    state_dir = tmp_path / "state"
    run = in_read_only_state_dir(state_dir, "run", *common)
    assert run.returncode == EXIT_CONFIG, run.stderr
    assert run.stderr.strip() == (
        f"tucdesk-agent: {state_dir}: the state directory is not writable (Read-only file "
        "system); the daemon keeps its lock, status and audit spool there: make it writable (a "
        "read-only mount? ReadWritePaths= in the systemd unit? its owner?)"
    )
    check = in_read_only_state_dir(state_dir, "check", *common)
    assert check.returncode == 1
    assert "Configuration OK" not in check.stdout
    assert f"State dir: {state_dir}: the state directory is not writable" in check.stderr


def test_a_mistyped_agent_table_is_refused_and_other_tools_tables_are_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = enrolled_state_dir(tmp_path)
    config = tmp_path / "agent.toml"
    for table in ("agentt", "Agent"):
        config.write_text(f"[agent]\nmax_sessions = 8\n\n[{table}]\nrecord_sessions = true\n")
        assert agent_main(["--config", str(config), "check", *common], environ={}) == 1
        assert capsys.readouterr().err.strip() == (
            f"tucdesk-agent: {config}: unknown table [{table}]; did you mean [agent]?"
        )
    # run refuses to start on it, with the status systemd does not restart on.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TUCDESK_AGENT_")}
    run = subprocess.run(
        [AGENT_COMMAND, "--config", str(config), "run", *common],
        capture_output=True, text=True, check=False, env=environment, timeout=30,
    )  # fmt: skip
    assert run.returncode == EXIT_CONFIG, run.stderr
    assert "unknown table [Agent]; did you mean [agent]?" in run.stderr
    # Alone, without [agent] beside it, too.
    config.write_text("[agnet]\nrecord_sessions = true\n")
    assert agent_main(["--config", str(config), "check", *common], environ={}) == 1
    assert "did you mean [agent]?" in capsys.readouterr().err
    # A file shared with the relay: its table is its own business.
    config.write_text("[agent]\nmax_sessions = 8\n\n[relay]\nlisten = '0.0.0.0:7000'\n")
    assert agent_main(["--config", str(config), "check", *common], environ={}) == 0
    assert "Max sessions:  8" in capsys.readouterr().out
