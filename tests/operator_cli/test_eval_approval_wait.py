"""An exec that needs approval, run without a terminal, says at once (and then every so often)
that it waits, for whom, until when and how to take the request back; --no-wait says that
nothing ran yet. Through the whole real stack."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from operator_cli.approval_wait import ApprovalRefused, wait_for_decision
from operator_cli.client import Session
from operator_cli.home import CliHome
from tests.operator_cli.policy_stack_support import APPROVER_EMAIL, PolicyStack, policy_stack

pytestmark = pytest.mark.slow

WAIT_TIMEOUT_SECONDS = 30.0


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyStack]:
    with policy_stack(tmp_path_factory.mktemp("eval-approval-wait")) as started:
        yield started


def park(team: PolicyStack, *command: str) -> tuple[str, str]:
    result = team.tucdesk("exec", "--no-wait", team.stack.agent_name, "--", *command,
                          home=team.operator_home)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip(), result.stderr.decode()


def test_no_wait_says_nothing_ran_yet_and_how_to_run_it(team: PolicyStack) -> None:
    request_id, said = park(team, "echo", "restart", "eval")
    assert request_id.startswith("apr_")
    assert f"not run yet: approval request {request_id} submitted" in said
    assert f"run: tucdesk exec --approval {request_id} " in said


def test_a_waiting_exec_without_a_terminal_says_so_at_once_with_expiry_and_withdrawal(
    team: PolicyStack, tmp_path: Path
) -> None:
    stderr_path = tmp_path / "requester.err"
    argv = team.stack.tucdesk_command("exec", team.stack.agent_name, "--", "echo", "restart",
                                      "eval-wait", home=team.operator_home)
    with stderr_path.open("wb") as stderr:
        requester = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            env=team.stack.cli_env(team.operator_home),
        )
    try:
        deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
        while "approvals withdraw apr_" not in stderr_path.read_text():
            assert requester.poll() is None and time.monotonic() < deadline, \
                stderr_path.read_text()
            time.sleep(0.2)
        said = stderr_path.read_text()
        assert f"waiting for approval by {APPROVER_EMAIL}" in said
        assert " until " in said and " UTC" in said
        request_id = said.split("approvals withdraw ", 1)[1].split()[0]
        withdrawn = team.tucdesk("approvals", "withdraw", request_id, home=team.operator_home)
        assert withdrawn.returncode == 0, withdrawn.stderr
        requester.communicate(timeout=WAIT_TIMEOUT_SECONDS)
    finally:
        if requester.poll() is None:
            requester.kill()
            requester.wait()
    assert requester.returncode != 0
    assert "withdrawn" in stderr_path.read_text()


def test_the_wait_keeps_saying_it_still_waits(team: PolicyStack) -> None:
    request_id, _ = park(team, "echo", "restart", "eval-remind")
    said: list[str] = []
    api = Session.from_home(CliHome(team.operator_home))
    try:
        with pytest.raises(ApprovalRefused, match="gave up waiting"):
            wait_for_decision(api, request_id, said.append, poll_seconds=0.1,
                              remind_seconds=0.3, max_wait_seconds=1.5)
    finally:
        api.close()
    reminders = [line for line in said if line.startswith(f"still waiting for approval of "
                                                          f"{request_id}")]
    assert len(reminders) >= 2, said
    assert all(" until " in line and f"approvals withdraw {request_id}" in line
               for line in reminders)
