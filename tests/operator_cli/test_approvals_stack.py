"""The approval gate through the whole real stack, driven with the `tucdesk` command line.

An exec the policy marks approval_required waits for an approver; the approver's CLI signs the
exact request; the grant carries that signature and the agent checks it before running. Nobody
approves their own request, and an approval is good for one command once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pyte
import pytest

from operator_cli.client import ApiError, Session
from operator_cli.home import CliHome
from operator_cli.session_client import request_session
from tests.operator_cli.policy_stack_support import (
    APPROVER_EMAIL,
    OPERATOR_EMAIL,
    PolicyStack,
    policy_stack,
)

pytestmark = pytest.mark.slow

EXIT_CONNECTION_FAILED = 255
WAIT_TIMEOUT_SECONDS = 30.0
POLL_SECONDS = 0.2


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyStack]:
    with policy_stack(tmp_path_factory.mktemp("approvals-stack")) as started:
        yield started


def last_line(result: subprocess.CompletedProcess[bytes]) -> str:
    lines = result.stderr.decode().strip().splitlines()
    assert lines and lines[-1].startswith("tucdesk: "), result.stderr
    return lines[-1]


def park(team: PolicyStack, *command: str) -> str:
    """Ask for an exec that needs approval with --no-wait; return the request id it prints."""
    result = team.tucdesk("exec", "--no-wait", team.stack.agent_name, "--", *command,
                          home=team.operator_home)
    assert result.returncode == 0, result.stderr
    request_id = result.stdout.decode().strip()
    assert request_id.startswith("apr_"), result.stdout
    assert "waiting for approval by" in result.stderr.decode()
    return request_id


def wait_for_text(path: Path, text: str, process: subprocess.Popen[bytes]) -> str:
    deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
    while True:
        content = path.read_text(errors="replace") if path.exists() else ""
        if text in content:
            return content
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"never saw {text!r}; stderr so far:\n{content}")
        time.sleep(POLL_SECONDS)


def test_an_exec_needing_approval_waits_for_an_approver_then_runs(
    team: PolicyStack, tmp_path: Path
) -> None:
    stderr_path = tmp_path / "requester.err"
    argv = team.stack.tucdesk_command("exec", team.stack.agent_name, "--", "echo", "restart",
                                      "web", home=team.operator_home)
    with stderr_path.open("wb") as stderr:
        requester = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            env=team.stack.cli_env(team.operator_home),
        )
    try:
        waiting = wait_for_text(stderr_path, "waiting for approval by", requester)
        assert APPROVER_EMAIL in waiting and "restarts-need-approval" in waiting
        assert OPERATOR_EMAIL not in waiting.split("waiting for approval by", 1)[1]

        listed = team.tucdesk("approvals", home=team.approver_home)
        assert listed.returncode == 0, listed.stderr
        assert OPERATOR_EMAIL in listed.stdout.decode()
        assert "echo restart web" in listed.stdout.decode()
        [pending] = [item for item in json.loads(team.tucdesk(
            "approvals", "--json", home=team.approver_home).stdout)
            if item["command"] == ["echo", "restart", "web"]]

        approved = team.tucdesk("approve", "--yes", pending["id"], "--reason", "planned change",
                                home=team.approver_home)
        assert approved.returncode == 0, approved.stderr
        stdout, _ = requester.communicate(timeout=WAIT_TIMEOUT_SECONDS)
    finally:
        if requester.poll() is None:
            requester.kill()
            requester.wait()
    assert (requester.returncode, stdout) == (0, b"restart web\n"), stderr_path.read_text()
    assert f"approved by {APPROVER_EMAIL}" in stderr_path.read_text()


def test_nobody_approves_their_own_request(team: PolicyStack) -> None:
    request_id = park(team, "echo", "restart", "db")
    own = team.tucdesk("approve", "--yes", request_id, home=team.operator_home)
    assert own.returncode == 1
    assert "own request" in last_line(own)
    state = team.api_get(f"/v1/approvals/{request_id}", home=team.operator_home)["state"]
    assert state == "pending"


def test_a_denied_request_tells_the_requester_who_denied_it_and_why(team: PolicyStack) -> None:
    request_id = park(team, "echo", "restart", "cache")
    denied = team.tucdesk("deny", request_id, "--reason", "not during the sale",
                          home=team.approver_home)
    assert denied.returncode == 0, denied.stderr
    result = team.tucdesk("exec", "--approval", request_id, team.stack.agent_name, "--", "echo",
                          "restart", "cache", home=team.operator_home)
    assert result.returncode == EXIT_CONNECTION_FAILED
    line = last_line(result)
    assert APPROVER_EMAIL in line and "not during the sale" in line
    assert result.stdout == b""


def test_an_approval_cannot_be_replayed_onto_another_command_or_reused(
    team: PolicyStack,
) -> None:
    agent = team.stack.agent_name
    request_id = park(team, "echo", "restart", "api")
    approved = team.tucdesk("approve", "--yes", request_id, home=team.approver_home)
    assert approved.returncode == 0, approved.stderr

    # The CLI will not offer it for another command...
    other = team.tucdesk("exec", "--approval", request_id, agent, "--", "echo", "restart",
                         "everything", home=team.operator_home)
    assert other.returncode == EXIT_CONNECTION_FAILED
    assert "another command" in last_line(other)
    # ...and the rendezvous refuses it when asked directly.
    api = Session.from_home(CliHome(team.operator_home))
    try:
        with pytest.raises(ApiError) as refused:
            request_session(api, agent, "exec", ["echo", "restart", "everything"],
                            approval_id=request_id)
        assert refused.value.status in (400, 403, 409)
    finally:
        api.close()

    used = team.tucdesk("exec", "--approval", request_id, agent, "--", "echo", "restart", "api",
                        home=team.operator_home)
    assert (used.returncode, used.stdout) == (0, b"restart api\n"), used.stderr
    again = team.tucdesk("exec", "--approval", request_id, agent, "--", "echo", "restart",
                         "api", home=team.operator_home)
    assert again.returncode == EXIT_CONNECTION_FAILED
    assert "executed" in last_line(again)


def test_only_approvers_and_admins_see_the_pending_requests(team: PolicyStack) -> None:
    result = team.tucdesk("approvals", home=team.operator_home)
    assert result.returncode == 1
    assert "refused" in last_line(result)


def test_a_shell_needing_approval_opens_with_the_approval_id(team: PolicyStack) -> None:
    agent = team.stack.agent_name
    parked = team.tucdesk("connect", "--no-wait", agent, home=team.operator_home)
    assert parked.returncode == 0, parked.stderr
    request_id = parked.stdout.decode().strip()
    assert f"tucdesk connect --approval {request_id} {agent}" in parked.stderr.decode()
    approved = team.tucdesk("approve", "--yes", request_id, home=team.approver_home)
    assert approved.returncode == 0, approved.stderr

    argv = team.stack.tucdesk_command("connect", "--approval", request_id, agent,
                                      home=team.operator_home)
    env = dict(team.stack.cli_env(team.operator_home), TERM="xterm", PS1="$ ")
    child = pexpect.spawn(argv[0], argv[1:], env=env, timeout=WAIT_TIMEOUT_SECONDS)
    try:
        child.sendline("echo approved-$((40+2))")
        child.expect("approved-42")
        child.sendline("exit 5")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 5


def test_ctrl_c_while_waiting_for_approval_exits_130_and_says_the_request_stays_pending(
    team: PolicyStack, tmp_path: Path
) -> None:
    stderr_path = tmp_path / "requester.err"
    argv = team.stack.tucdesk_command("exec", team.stack.agent_name, "--", "echo", "restart",
                                      "db", home=team.operator_home)
    with stderr_path.open("wb") as stderr:
        requester = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            env=team.stack.cli_env(team.operator_home),
        )
    try:
        wait_for_text(stderr_path, "waiting for approval by", requester)
        requester.send_signal(signal.SIGINT)
        requester.wait(timeout=WAIT_TIMEOUT_SECONDS)
    finally:
        if requester.poll() is None:
            requester.kill()
            requester.wait()
    lines = stderr_path.read_text().strip().splitlines()
    assert requester.returncode == 130, lines
    assert "stays pending" in lines[-1] and "--approval apr_" in lines[-1], lines
    assert "tucdesk approvals withdraw apr_" in lines[-1], lines
    assert not any("Traceback" in line for line in lines), lines


# Started by the interpreter before the CLI: the first time code compiled from a string starts
# while the CLI polls for a decision (a dataclass that a lazy import makes), it sends itself
# SIGINT from the trace hook, so the KeyboardInterrupt is raised inside that code.
INTERRUPT_IN_STRING_CODE = """
import os, signal, sys

def _interrupt_inside_string_code(frame, event, arg):
    if event != "call" or frame.f_code.co_filename != "<string>" or _sent:
        return None
    caller = frame
    while caller is not None and caller.f_code.co_name != "_poll":
        caller = caller.f_back
    if caller is not None:
        _sent.append(True)
        sys.stderr.write("test: SIGINT inside string-compiled code\\n")
        os.kill(os.getpid(), signal.SIGINT)
    return None

_sent = []
sys.settrace(_interrupt_inside_string_code)
"""


def test_ctrl_c_landing_in_code_compiled_from_a_string_still_exits_130(
    team: PolicyStack, tmp_path: Path
) -> None:
    hook_dir = tmp_path / "hook"
    hook_dir.mkdir()
    (hook_dir / "sitecustomize.py").write_text(INTERRUPT_IN_STRING_CODE)
    env = team.stack.cli_env(team.operator_home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hook_dir), env.get("PYTHONPATH")]))
    argv = team.stack.tucdesk_command("exec", team.stack.agent_name, "--", "echo", "restart",
                                      "cache", home=team.operator_home)
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, env=env,
                            timeout=WAIT_TIMEOUT_SECONDS, check=False)
    lines = result.stderr.decode().strip().splitlines()
    assert "test: SIGINT inside string-compiled code" in lines, lines
    assert result.returncode == 130, lines
    assert "stays pending" in lines[-1], lines
    request_id = lines[-1].split("--approval ")[1].split(";")[0]
    withdrawn = team.tucdesk("approvals", "withdraw", request_id, home=team.operator_home)
    assert withdrawn.returncode == 0, withdrawn.stderr


def test_the_requester_withdraws_a_parked_request_and_nobody_can_approve_it(
    team: PolicyStack,
) -> None:
    request_id = park(team, "echo", "restart", "search")
    someone_else = team.tucdesk("approvals", "withdraw", request_id, home=team.approver_home)
    assert someone_else.returncode == 1
    assert "only the operator who made" in last_line(someone_else)
    withdrawn = team.tucdesk("approvals", "withdraw", request_id, home=team.operator_home)
    assert withdrawn.returncode == 0, withdrawn.stderr
    assert f"withdrew {request_id}" in withdrawn.stdout.decode()
    approve = team.tucdesk("approve", "--yes", request_id, home=team.approver_home)
    assert approve.returncode == 1
    assert "withdrawn, not pending" in last_line(approve)
    used = team.tucdesk("exec", "--approval", request_id, team.stack.agent_name, "--", "echo",
                        "restart", "search", home=team.operator_home)
    assert used.returncode == EXIT_CONNECTION_FAILED
    assert "withdrawn" in last_line(used)


# The red team's trick: printed raw, the escape codes move the cursor back over the first part
# and erase it, so the approver would read `echo restart 'web'` for what really runs.
HIDING_ARGUMENT = "api;: \x1b[6D\x1b[Kweb"
HIDDEN_SHOWN = "echo restart $'api;: \\e[6D\\e[Kweb'"


def on_screen(output: bytes, columns: int = 200) -> str:
    """What a terminal shows after printing ``output``."""
    screen = pyte.Screen(columns, 40)
    pyte.ByteStream(screen).feed(output.replace(b"\n", b"\r\n"))
    return "\n".join(row.rstrip() for row in screen.display if row.strip())


def test_an_approver_sees_escape_codes_in_a_command_escaped_in_list_show_and_approve(
    team: PolicyStack,
) -> None:
    request_id = park(team, "echo", "restart", HIDING_ARGUMENT)
    listed = team.tucdesk("approvals", home=team.approver_home)
    assert listed.returncode == 0, listed.stderr
    assert b"\x1b" not in listed.stdout
    [row] = [line for line in on_screen(listed.stdout).splitlines() if request_id in line]
    assert HIDDEN_SHOWN in row

    shown = team.tucdesk("approvals", "show", request_id, home=team.approver_home)
    assert shown.returncode == 0, shown.stderr
    assert b"\x1b" not in shown.stdout
    assert f"command:   {HIDDEN_SHOWN}" in on_screen(shown.stdout)

    approved = team.tucdesk("approve", "--yes", request_id, home=team.approver_home)
    assert approved.returncode == 0, approved.stderr
    assert b"\x1b" not in approved.stderr
    assert f"command:   {HIDDEN_SHOWN}" in on_screen(approved.stderr)


def test_a_long_command_is_marked_cut_in_the_list_and_shown_whole(team: PolicyStack) -> None:
    padded = "web" + " " * 50 + "; touch /tmp/pwned"
    request_id = park(team, "echo", "restart", padded)
    listed = team.tucdesk("approvals", home=team.approver_home).stdout.decode()
    [row] = [line for line in listed.splitlines() if request_id in line]
    assert "…" in row and "touch" not in row
    assert "tucdesk approvals show ID" in listed.splitlines()[-1]
    shown = team.tucdesk("approvals", "show", request_id, home=team.approver_home)
    assert "touch /tmp/pwned'" in shown.stdout.decode()


def test_approve_without_a_terminal_and_without_yes_approves_nothing(team: PolicyStack) -> None:
    request_id = park(team, "echo", "restart", "queue")
    refused = team.tucdesk("approve", request_id, home=team.approver_home)
    assert refused.returncode == 1
    assert "--yes" in last_line(refused)
    view = team.api_get(f"/v1/approvals/{request_id}", home=team.operator_home)
    assert (view["state"], view["decided_by"]) == ("pending", None)


def test_approve_at_a_terminal_asks_first_and_only_yes_signs(team: PolicyStack) -> None:
    request_id = park(team, "echo", "restart", "mail")
    for answer, state in (("n", "pending"), ("y", "approved")):
        argv = team.stack.tucdesk_command("approve", request_id, home=team.approver_home)
        child = pexpect.spawn(argv[0], argv[1:], env=team.stack.cli_env(team.approver_home),
                              timeout=WAIT_TIMEOUT_SECONDS)
        try:
            child.expect("command:   echo restart mail")
            child.expect(r"Approve\? \[y/N\] ")
            child.sendline(answer)
            child.expect(pexpect.EOF)
        finally:
            child.close(force=True)
        view = team.api_get(f"/v1/approvals/{request_id}", home=team.operator_home)
        assert view["state"] == state, child.before
