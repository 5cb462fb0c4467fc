"""Approvals in jobs and scripts, through the whole real stack (the CLI as a subprocess):
`approvals show --json`, and a wait for an approver that a job bounds (--approval-timeout) or
ends (timeout(1)'s SIGTERM, Ctrl-C) without leaving its request pending for the approvers."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.operator_cli.policy_stack_support import OPERATOR_EMAIL, PolicyStack, policy_stack

pytestmark = pytest.mark.slow

EXIT_CONNECTION_FAILED = 255
EXIT_INTERRUPTED = 130
EXIT_TIMED_OUT = 124  # timeout(1)'s, once its SIGTERM ended the command
WAIT_TIMEOUT_SECONDS = 30.0
POLL_SECONDS = 0.2


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyStack]:
    with policy_stack(tmp_path_factory.mktemp("scripting-approvals")) as started:
        yield started


def park(team: PolicyStack, *command: str) -> str:
    """An exec that needs approval, parked with --no-wait; its request id."""
    result = team.tucdesk("exec", "--no-wait", team.stack.agent_name, "--", *command,
                          home=team.operator_home)
    assert result.returncode == 0, result.stderr
    return result.stdout.decode().strip()


def shown(team: PolicyStack, *argv: str) -> Any:
    """`tucdesk approvals ... --json` as the requester, parsed (it must be one JSON document)."""
    result = team.tucdesk("approvals", *argv, home=team.operator_home)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def request_id_said(stderr: str) -> str:
    return stderr.split("approvals withdraw ", 1)[1].split()[0]


def start_waiting(team: PolicyStack, tmp_path: Path, *argv: str) -> tuple[
    subprocess.Popen[bytes], Path
]:
    """A requester waiting for approval (until it says so on stderr, kept in a file)."""
    stderr_path = tmp_path / "requester.err"
    with stderr_path.open("wb") as stderr:
        requester = subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            env=team.stack.cli_env(team.operator_home),
        )
    deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
    while "waiting for approval by" not in stderr_path.read_text():
        if requester.poll() is not None or time.monotonic() > deadline:
            requester.kill()
            raise AssertionError(f"never waited: {stderr_path.read_text()}")
        time.sleep(POLL_SECONDS)
    return requester, stderr_path


def test_approvals_show_with_json_prints_the_request_as_one_document(team: PolicyStack) -> None:
    request_id = park(team, "echo", "restart", "json")
    for argv in (["--json", "show", request_id], ["show", "--json", request_id]):
        document = shown(team, *argv)
        assert document["id"] == request_id
        assert document["state"] == "pending"
        assert document["requester"] == OPERATOR_EMAIL
        assert document["command"] == ["echo", "restart", "json"]
        assert document["agent_name"] == team.stack.agent_name
    # The same fields as one entry of `approvals --json` (the approver's list).
    listed = team.tucdesk("approvals", "--json", home=team.approver_home)
    [entry] = [item for item in json.loads(listed.stdout) if item["id"] == request_id]
    assert entry == document
    assert team.tucdesk("approvals", "withdraw", request_id,
                        home=team.operator_home).returncode == 0


def test_approval_timeout_stops_waiting_withdraws_the_request_and_exits_255(
    team: PolicyStack,
) -> None:
    started = time.monotonic()
    result = team.tucdesk("exec", "--approval-timeout", "2s", team.stack.agent_name, "--",
                          "echo", "restart", "bounded", home=team.operator_home)
    waited = time.monotonic() - started
    err = result.stderr.decode()
    assert result.returncode == EXIT_CONNECTION_FAILED, err
    assert waited < WAIT_TIMEOUT_SECONDS
    request_id = request_id_said(err)
    last = err.strip().splitlines()[-1]
    assert last == (f"tucdesk: gave up waiting for approval of {request_id} after 2s "
                    f"(--approval-timeout): withdrew request {request_id}: nobody can approve "
                    "it now"), err
    assert shown(team, "show", "--json", request_id)["state"] == "withdrawn"
    pending = json.loads(team.tucdesk("approvals", "--json", home=team.approver_home).stdout)
    assert request_id not in [item["id"] for item in pending]


def test_a_job_killed_by_timeout_while_waiting_withdraws_its_request(
    team: PolicyStack, tmp_path: Path
) -> None:
    timeout = shutil.which("timeout")
    if timeout is None:
        pytest.skip("timeout(1) is not installed")
    argv = team.stack.tucdesk_command("exec", team.stack.agent_name, "--", "echo", "restart",
                                      "killed", home=team.operator_home)
    # Long enough to be waiting (not still starting up) when timeout's SIGTERM lands, even on a
    # loaded machine: start_waiting returns once it says it waits.
    requester, stderr_path = start_waiting(team, tmp_path, timeout, "20", *argv)
    requester.wait(timeout=WAIT_TIMEOUT_SECONDS)
    err = stderr_path.read_text()
    assert requester.returncode == EXIT_TIMED_OUT, err
    request_id = request_id_said(err)
    assert (f"tucdesk: SIGTERM while waiting for approval: withdrew request {request_id}"
            in err), err
    assert "Traceback" not in err
    assert shown(team, "show", "--json", request_id)["state"] == "withdrawn"


def test_ctrl_c_with_an_approval_timeout_withdraws_the_request(
    team: PolicyStack, tmp_path: Path
) -> None:
    argv = team.stack.tucdesk_command("exec", "--approval-timeout", "10m",
                                      team.stack.agent_name, "--", "echo", "restart",
                                      "interrupted", home=team.operator_home)
    requester, stderr_path = start_waiting(team, tmp_path, *argv)
    requester.send_signal(signal.SIGINT)
    requester.wait(timeout=WAIT_TIMEOUT_SECONDS)
    err = stderr_path.read_text()
    assert requester.returncode == EXIT_INTERRUPTED, err
    request_id = request_id_said(err)
    assert err.strip().splitlines()[-1] == (
        f"tucdesk: interrupted: withdrew request {request_id}: nobody can approve it now"
    ), err
    assert shown(team, "show", "--json", request_id)["state"] == "withdrawn"


def test_approval_timeout_with_no_wait_is_a_usage_error(team: PolicyStack) -> None:
    result = team.tucdesk("exec", "--no-wait", "--approval-timeout", "1m",
                          team.stack.agent_name, "--", "true", home=team.operator_home)
    assert result.returncode == EXIT_CONNECTION_FAILED
    assert "--approval-timeout bounds a wait; --no-wait does not wait" in result.stderr.decode()
