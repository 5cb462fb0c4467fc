"""How `tucdesk connect` ends is what the session list says, through the whole stack: the CLI
leaving as asked (`~.`) sends CLOSE first and is ``operator-disconnected`` (everything in the
session torn down); a CLI that dies without one (SIGKILL: to the agent, a lost connection) is
``connection-lost``, and the remote shell is hung up as sshd's dead connection would, leaving
what ignores SIGHUP (a nohup job) running."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from typing import Any

import pytest

from tests.stack.conftest import TappedStack
from tests.stack.test_shell import connect, remote_shell_pid, run_and_wait, wait_until_gone

pytestmark = pytest.mark.slow

ENDED_TIMEOUT_SECONDS = 20.0
_JOB = re.compile(rb"job=(\d+)\.end")


def _newest_session_once_ended(stack: TappedStack) -> dict[str, Any]:
    deadline = time.monotonic() + ENDED_TIMEOUT_SECONDS
    while True:
        listed = stack.run_tucdesk("sessions", "--json", "--limit", "1")
        assert listed.returncode == 0, listed.stderr
        newest: dict[str, Any] = json.loads(listed.stdout)[0]
        if newest["state"] == "ended" and newest["reason"] is not None:
            return newest
        assert time.monotonic() < deadline, f"the session did not end: {newest}"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _start_nohup_job(program: Any) -> int:
    end = run_and_wait(program, "nohup sleep 1000 >/dev/null 2>&1 & echo job=$!.'end'", b".end")
    return int(_JOB.findall(bytes(program.output[:end]))[-1])


def test_tilde_dot_is_the_operator_disconnecting_and_tears_the_session_down(
    stack: TappedStack,
) -> None:
    program = connect(stack)
    job = None
    try:
        job = _start_nohup_job(program)
        program.send("\r~.")
        assert program.wait_for_exit() == 255
    finally:
        program.close()
    try:
        assert _newest_session_once_ended(stack)["reason"] == "operator-disconnected"
        wait_until_gone(job)
    finally:
        if _alive(job):
            os.kill(job, signal.SIGKILL)


def test_a_cli_killed_mid_session_is_a_lost_connection_and_hangs_the_shell_up(
    stack: TappedStack,
) -> None:
    program = connect(stack)
    job = None
    try:
        shell = remote_shell_pid(program)
        job = _start_nohup_job(program)
        os.kill(program.child.pid, signal.SIGKILL)  # no CLOSE: the socket just goes away
        program.wait_for_exit()
        ended = _newest_session_once_ended(stack)
        assert ended["reason"] == "connection-lost"
        wait_until_gone(shell)
        assert _alive(job), "the nohup job was killed with the session"
    finally:
        program.close()
        if job is not None and _alive(job):
            os.kill(job, signal.SIGKILL)
