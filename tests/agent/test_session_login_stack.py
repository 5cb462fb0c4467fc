"""Sessions through a real agent daemon look like sshd's logins on the host: the agent runs under
the systemd unit's umask 0077 and root, yet an exec session gets session_umask (022) and the
session user's audit login uid, and a shell session is in ``who`` while it runs and in ``last``
as ended once it is over. The agent's utmp and wtmp go to files under the test's directory
(utmp_file, wtmp_file), never the host's."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.login_records import LoginRecordFiles
from operator_cli.local_stack import DEFAULT_OPERATOR_EMAIL, LocalStack
from tests.stack.screen import TerminalProgram

pytestmark = pytest.mark.slow

SESSION_USER = "nobody"
EXEC_TIMEOUT_SECONDS = 60
WAIT_SECONDS = 20.0


@pytest.fixture(scope="module")
def agent_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[
    tuple[LocalStack, LoginRecordFiles]
]:
    """A stack whose agent runs as root under umask 0077, sessions as ``nobody`` with /bin/sh."""
    if os.geteuid() != 0:
        pytest.skip("the agent writes login uids and login records when it runs as root")
    missing = [name for name in ("who", "last") if shutil.which(name) is None]
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{', '.join(missing)} not installed")
        pytest.skip(f"{', '.join(missing)} not installed")
    base = tmp_path_factory.mktemp("login-stack")
    files = LoginRecordFiles(base / "utmp", base / "wtmp")
    files.utmp.touch()
    files.wtmp.touch()
    stack = LocalStack(
        base / "stack",
        extra_env={
            "TUCDESK_AGENT_UTMP_FILE": str(files.utmp),
            "TUCDESK_AGENT_WTMP_FILE": str(files.wtmp),
            "TUCDESK_AGENT_USER": SESSION_USER,
            "TUCDESK_AGENT_SHELL": "/bin/sh",
        },
    )
    try:
        stack.create_certificates()
        stack.init_rendezvous()
        stack.start_relay()
        stack.start_rendezvous()
        stack.create_operator()
        stack.enroll_agent()
        previous = os.umask(0o077)  # the unit's UMask=0077, which the daemon passes on
        try:
            stack.start_agent()
        finally:
            os.umask(previous)
        stack.wait_agent_online()
        yield stack, files
    finally:
        stack.close()


def _agent_log(stack: LocalStack) -> str:
    return (stack.log_dir / "agent.log").read_text(errors="replace")


def test_an_exec_session_gets_the_session_umask_and_the_session_users_login_uid(
    agent_stack: tuple[LocalStack, LoginRecordFiles]
) -> None:
    stack, _ = agent_stack
    # Where the session user can write (pytest's tmp_path is root's alone).
    shared = Path(tempfile.mkdtemp(prefix="tucdesk-umask-"))
    shared.chmod(0o1777)
    completed = stack.run_tucdesk(
        "exec", stack.agent_name, "--", "sh", "-c",
        f"umask; cat /proc/self/loginuid; echo; touch {shared}/f",
        timeout=EXEC_TIMEOUT_SECONDS,
    )
    assert completed.returncode == 0, completed.stderr
    umask, login_uid = completed.stdout.decode().split()
    assert umask == "0022"  # not the daemon's 0077
    assert (shared / "f").stat().st_mode & 0o777 == 0o644
    shutil.rmtree(shared)
    expected = pwd.getpwnam(SESSION_USER).pw_uid
    if int(login_uid) != expected:
        assert "could not set the audit login uid" in _agent_log(stack)
        pytest.skip(
            f"this kernel refused the login uid write (it stayed {login_uid}); the agent's "
            "warning was checked instead"
        )
    assert int(login_uid) == expected


def _who(files: LoginRecordFiles) -> str:
    return subprocess.run(
        ["who", str(files.utmp)], capture_output=True, text=True, check=True
    ).stdout


def test_a_shell_session_is_in_who_while_it_runs_and_in_last_once_it_ended(
    agent_stack: tuple[LocalStack, LoginRecordFiles],
) -> None:
    stack, files = agent_stack
    env = dict(stack.cli_env(), TERM="xterm-256color", LANG="C.UTF-8")
    program = TerminalProgram(stack.tucdesk_command("connect", stack.agent_name), env=env)
    try:
        program.send("echo tty=$(tty).'end'\r")
        end = program.wait_for_output(b".end", 0)
        found = re.findall(rb"tty=/dev/(pts/\d+)\.end", bytes(program.output[:end]))
        assert found, bytes(program.output[:end])
        line = found[-1].decode()
        # The agent writes it in the background, without holding the session up.
        pattern = re.compile(
            rf"^{SESSION_USER}\s+{line}\s.*\(tucdesk:{re.escape(DEFAULT_OPERATOR_EMAIL)}\)$",
            re.MULTILINE,
        )
        deadline = time.monotonic() + WAIT_SECONDS
        while not pattern.search(listed := _who(files)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pattern.search(listed), listed
        program.send("exit\r")
        program.wait_for_exit()
    finally:
        program.close()
    deadline = time.monotonic() + WAIT_SECONDS
    while _who(files).strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _who(files).strip() == ""
    ended = subprocess.run(
        ["last", "-w", "-f", str(files.wtmp)], capture_output=True, text=True, check=True
    ).stdout
    (record,) = [row for row in ended.splitlines() if f" {line} " in row]
    assert record.startswith(SESSION_USER)
    assert f"tucdesk:{DEFAULT_OPERATOR_EMAIL}" in record
    assert "logged in" not in record and "no logout" not in record


def _open_shell(stack: LocalStack) -> tuple[TerminalProgram, str]:
    env = dict(stack.cli_env(), TERM="xterm-256color", LANG="C.UTF-8")
    program = TerminalProgram(stack.tucdesk_command("connect", stack.agent_name), env=env)
    program.send("echo tty=$(tty).'end'\r")
    end = program.wait_for_output(b".end", 0)
    found = re.findall(rb"tty=/dev/(pts/\d+)\.end", bytes(program.output[:end]))
    assert found, bytes(program.output[:end])
    return program, found[-1].decode()


def _utmp_rows(files: LoginRecordFiles) -> list[str]:
    dumped = subprocess.run(
        ["utmpdump", str(files.utmp)], capture_output=True, text=True, check=True
    ).stdout
    return [row for row in dumped.splitlines() if row.startswith("[7]")]


def _wait_for_who(files: LoginRecordFiles, listed: bool, line: str) -> str:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        shown = _who(files)
        if (f" {line} " in shown) == listed or time.monotonic() > deadline:
            return shown


def test_a_stopped_agent_ends_its_logins_and_a_killed_ones_are_ended_at_the_next_start(
    agent_stack: tuple[LocalStack, LoginRecordFiles],
) -> None:
    # Last in this module: it restarts the agent.
    stack, files = agent_stack
    program, line = _open_shell(stack)
    try:
        assert f" {line} " in _wait_for_who(files, True, line)
        stack.stop_agent()  # SIGTERM: the session is ended and its logout written before exit
        assert _who(files).strip() == ""
    finally:
        program.close()
    stack.start_agent()
    stack.wait_agent_online()
    program, line = _open_shell(stack)
    try:
        assert f" {line} " in _wait_for_who(files, True, line)
        (shell,) = [row.split()[1] for row in _utmp_rows(files) if f"[{line}" in row]
        stack.kill_agent()  # no logout: the shell dies with its terminal, its login stays
        assert f" {line} " in _who(files)
    finally:
        program.close()
    # systemd restarts it RestartSec=5 later; by then the hung-up shell has exited.
    deadline = time.monotonic() + WAIT_SECONDS
    while os.path.exists(f"/proc/{int(shell.strip('[]'))}") and time.monotonic() < deadline:
        time.sleep(0.05)
    stack.start_agent()
    stack.wait_agent_online()
    assert _wait_for_who(files, False, line).strip() == ""
    assert "ended 1 login(s)" in _agent_log(stack)
