"""Disabling an operator ends the sessions they have open, through the whole real stack.

The red-team finding this pins: an operator's open session kept working after an admin disabled
them. Now `tucdesk operators disable` has the agent end it within seconds; the operator sees why
and `tucdesk sessions show` says so, while other operators' sessions run on.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.operator_cli.policy_stack_support import OPERATOR_EMAIL, PolicyStack, policy_stack
from tests.stack.screen import TerminalProgram

pytestmark = pytest.mark.slow

READY_TIMEOUT_SECONDS = 30.0
# The session must end this fast after the disable returns (the finding saw it live 12 s on).
ENDED_WITHIN_SECONDS = 5.0
ROW_TIMEOUT_SECONDS = 15.0
EXIT_CONNECTION_FAILED = 255


class RunningExec:
    """`tucdesk exec` in the background, its output collected as it comes."""

    def __init__(self, team: PolicyStack, home: Path, script: str) -> None:
        stack = team.stack
        command = stack.tucdesk_command("exec", stack.agent_name, "--", "sh", "-c", script,
                                        home=home)  # fmt: skip
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=stack.cli_env(home),
        )  # fmt: skip
        self.stdout = bytearray()
        self.stderr = bytearray()
        self._readers = [
            threading.Thread(target=self._drain, args=(stream, sink), daemon=True)
            for stream, sink in ((self.process.stdout, self.stdout),
                                 (self.process.stderr, self.stderr))
        ]  # fmt: skip
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _drain(stream: IO[bytes] | None, sink: bytearray) -> None:
        assert stream is not None
        while chunk := stream.read1(4096):  # type: ignore[attr-defined]
            sink += chunk

    def wait_for(self, marker: bytes) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while marker not in self.stdout:
            if self.process.poll() is not None or time.monotonic() > deadline:
                seen = (bytes(self.stdout), bytes(self.stderr))
                raise AssertionError(f"no {marker!r} in what it printed: {seen!r}")
            time.sleep(0.05)

    def finish(self, timeout: float) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        for reader in self._readers:
            reader.join(timeout=5)
        return code


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _session_of(team: PolicyStack, email: str) -> str:
    sessions = team.api_get("/v1/sessions?limit=50")["sessions"]
    [session] = [s for s in sessions if s.get("operator_email") == email]
    return str(session["session_id"])


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyStack]:
    with policy_stack(tmp_path_factory.mktemp("operators-stack")) as started:
        yield started


def _assert_shown_as_ended_by_the_disable(team: PolicyStack, email: str) -> None:
    session_id = _session_of(team, email)
    deadline = time.monotonic() + ROW_TIMEOUT_SECONDS
    while True:
        shown = team.tucdesk("sessions", "show", session_id)
        assert shown.returncode == 0, shown.stderr.decode()
        if b"ended (operator_disabled)" in shown.stdout or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert b"State:    ended (operator_disabled)" in shown.stdout, shown.stdout.decode()


def test_disabling_an_operator_ends_their_open_exec_within_seconds_and_says_why(
    team: PolicyStack,
) -> None:
    theirs = RunningExec(team, team.operator_home, "echo READY $$; exec sleep 60")
    mine = RunningExec(team, team.admin_home, "echo READY; sleep 4; echo STILL HERE")
    theirs.wait_for(b"\n")
    mine.wait_for(b"READY")
    remote_pid = int(bytes(theirs.stdout).split()[1])
    assert _alive(remote_pid)

    disabled = team.tucdesk("operators", "disable", OPERATOR_EMAIL, "--yes")
    assert disabled.returncode == 0, disabled.stderr.decode()
    assert b"  open sessions that will end: 1\n" in disabled.stdout  # theirs, not mine
    asked_at = time.monotonic()
    code = theirs.finish(timeout=ENDED_WITHIN_SECONDS + 5)
    assert time.monotonic() - asked_at < ENDED_WITHIN_SECONDS
    assert code == EXIT_CONNECTION_FAILED
    said = bytes(theirs.stderr).decode()
    assert said.strip().splitlines()[-1] == (
        "tucdesk: the agent ended the session (revoked): the operator was disabled by an admin"
    ), said
    deadline = time.monotonic() + ENDED_WITHIN_SECONDS
    while _alive(remote_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(remote_pid), "the remote command outlived its session"

    # The admin's own session was not touched.
    assert mine.finish(timeout=30) == 0, bytes(mine.stderr)
    assert b"STILL HERE" in mine.stdout

    _assert_shown_as_ended_by_the_disable(team, OPERATOR_EMAIL)

    # And the operator cannot come back with the old login.
    again = team.tucdesk("exec", team.stack.agent_name, "--", "true", home=team.operator_home)
    assert again.returncode != 0 and b"disabled" in again.stderr


def test_disabling_an_operator_ends_their_open_shell_within_seconds_and_says_why(
    team: PolicyStack,
) -> None:
    email, home = "carol@demo.localhost", team.base / "carol"
    team.stack.create_operator(email, "operator", home=home)
    signed = team.tucdesk("roster", "sign", "--yes")  # the agent accepts her key from now on
    assert signed.returncode == 0, signed.stderr.decode()
    team.wait_applied(team.team_version())
    env = dict(team.stack.cli_env(home), TERM="xterm-256color", LANG="C.UTF-8")
    program = TerminalProgram(
        team.stack.tucdesk_command("connect", team.stack.agent_name, home=home), env=env,
        rows=24, columns=80,
    )  # fmt: skip
    try:
        program.send("echo shell-pid=$$.'end'\r")
        end = program.wait_for_output(b".end")
        [pid] = re.findall(rb"shell-pid=(\d+)\.end", bytes(program.output[:end]))
        program.send("sleep 600\r")
        disabled = team.tucdesk("operators", "disable", email, "--yes")
        assert disabled.returncode == 0, disabled.stderr.decode()
        asked_at = time.monotonic()
        assert program.wait_for_exit(timeout=ENDED_WITHIN_SECONDS + 5) == EXIT_CONNECTION_FAILED
        assert time.monotonic() - asked_at < ENDED_WITHIN_SECONDS
        said = bytes(program.output).replace(b"\r\n", b"")  # the line wraps at 80 columns
        assert b"the operator was disabled by an admin" in said, bytes(program.output)[-400:]
        deadline = time.monotonic() + ENDED_WITHIN_SECONDS
        while _alive(int(pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(int(pid)), "the remote shell outlived its session"
    finally:
        program.close()
    _assert_shown_as_ended_by_the_disable(team, email)
