"""Review fixes of the CLI for scripts, through the whole real stack (rendezvous, relay, agent,
a signed policy where ``echo restart *`` needs an approver):

* ``-n`` with ``-t``/``-tt`` (exec and ssh): stdin is /dev/null, as ssh -n: -t falls back to pipes,
  -tt still gets a terminal but nothing is read from us;
* a wait that gives up just as the request is approved says so and prints the command that uses
  it, never to withdraw it;
* SIGTERM to the ``exec --tag`` parent alone withdraws its children's requests and ends it by
  SIGTERM;
* a damaged token on a read-only home is ignored and the command signs in again.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from operator_cli import approval_wait
from operator_cli.approval_requests import APPROVED, PENDING, WITHDRAWN
from operator_cli.main import main
from tests.operator_cli.policy_stack_support import PolicyStack, policy_stack
from tests.stack.screen import TerminalProgram
from tests.stack.test_ci_jobs import read_only_command

pytestmark = pytest.mark.slow

WAIT_TIMEOUT_SECONDS = 30.0
READ_AND_SHOW = "read x; echo got:$x; tty >/dev/null && echo on-a-terminal || echo on-pipes"


@pytest.fixture(scope="module")
def team(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PolicyStack]:
    with policy_stack(tmp_path_factory.mktemp("review10-cli")) as started:
        yield started


def request_state(team: PolicyStack, request_id: str) -> str:
    return str(team.api_get(f"/v1/approvals/{request_id}", home=team.operator_home)["state"])


# ---- 1. -n with -t / -tt --------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    ("exec", "-n", "-tt", "{agent}", "--", "sh", "-c", READ_AND_SHOW),
    ("ssh", "-n", "-tt", "{agent}", READ_AND_SHOW),
])  # fmt: skip
def test_no_stdin_with_a_forced_terminal_reads_nothing(
    team: PolicyStack, command: tuple[str, ...]
) -> None:
    argv = [word.format(agent=team.stack.agent_name) for word in command]
    done = team.stack.run_tucdesk(*argv, input=b"secret-from-stdin\n")
    assert done.returncode == 0, done.stderr
    assert b"secret" not in done.stdout
    assert b"got:\r\n" in done.stdout and b"on-a-terminal" in done.stdout, done.stdout


def test_no_stdin_on_a_terminal_leaves_it_alone(team: PolicyStack) -> None:
    # Keys typed at our terminal are not read: the command sees the end of input at once.
    env = dict(team.stack.cli_env(), TERM="xterm-256color", LANG="C.UTF-8")
    program = TerminalProgram(team.stack.tucdesk_command(
        "exec", "-n", "-tt", team.stack.agent_name, "--", "sh", "-c", READ_AND_SHOW), env=env)
    try:
        assert program.wait_for_exit() == 0
        output = bytes(program.output)
    finally:
        program.close()
    # Our terminal stays as it was (not raw, as with ssh -n -tt): it adds its own CR.
    assert re.search(rb"got:\r+\n", output) and b"on-a-terminal" in output, output


def test_no_stdin_with_one_t_on_a_terminal_falls_back_to_pipes(team: PolicyStack) -> None:
    env = dict(team.stack.cli_env(), TERM="xterm-256color", LANG="C.UTF-8")
    program = TerminalProgram(team.stack.tucdesk_command(
        "exec", "-n", "-t", team.stack.agent_name, "--", "sh", "-c", READ_AND_SHOW), env=env)
    try:
        assert program.wait_for_exit() == 0
        output = bytes(program.output)
    finally:
        program.close()
    assert b"no terminal for the command: stdin is not a terminal (-tt forces one)" in output
    assert b"got:" in output and b"on-pipes" in output, output


# ---- 4. a withdrawal racing an approval ---------------------------------------------------


def test_a_wait_giving_up_as_the_request_is_approved_prints_the_command_that_uses_it(
    team: PolicyStack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = team.stack.agent_name
    real_fetch = approval_wait.fetch_request
    reads: list[str] = []

    def fetch_then_approve(api, request_id):  # type: ignore[no-untyped-def]
        # The approver decides right after the wait's last look, before it withdraws.
        view = real_fetch(api, request_id)
        reads.append(view.state)
        if view.state == PENDING and len(reads) >= 2:
            approved = team.tucdesk("approve", "--yes", request_id, home=team.approver_home)
            assert approved.returncode == 0, approved.stderr
        return view

    monkeypatch.setattr(approval_wait, "fetch_request", fetch_then_approve)
    status = main(["--home", str(team.operator_home), "exec", "--approval-timeout", "1s",
                   agent, "--", "echo", "restart", "raced"])
    said = capsys.readouterr().err
    assert status == 255, said
    match = re.search(r"approval of (apr_\S+) after 1s", said)
    assert match, said
    request_id = match.group(1)
    assert request_state(team, request_id) == APPROVED
    last = said.strip().splitlines()[-1]  # the wait's first line says how to withdraw it
    assert last.startswith(f"tucdesk: gave up waiting for approval of {request_id}"), said
    assert "before it could be withdrawn; nothing ran" in last
    command = f"tucdesk exec --approval {request_id} {agent} -- echo restart raced"
    assert last.endswith(f"to run it now, use: {command}"), said
    assert "withdraw " not in last
    # The command printed is the one that runs it.
    monkeypatch.undo()
    ran = team.tucdesk(*command.split()[1:], home=team.operator_home)
    assert (ran.returncode, ran.stdout) == (0, b"restart raced\n"), ran.stderr


# ---- 5. SIGTERM to the exec --tag parent ---------------------------------------------------


def test_sigterm_to_the_tagged_exec_parent_withdraws_its_childrens_requests(
    team: PolicyStack, tmp_path: Path
) -> None:
    agent = team.stack.agent_name
    assert team.tucdesk("agents", "tag", agent, "--add", "review10").returncode == 0
    stderr_path = tmp_path / "tagged.err"
    argv = team.stack.tucdesk_command("exec", "--tag", "review10", "--approval-timeout", "120s",
                                      "--", "echo", "restart", "tagged", home=team.operator_home)
    with stderr_path.open("wb") as stderr:
        job = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=stderr, env=team.stack.cli_env(team.operator_home),
                               start_new_session=True)
    try:
        deadline = time.monotonic() + WAIT_TIMEOUT_SECONDS
        while "approvals withdraw apr_" not in stderr_path.read_text():
            assert job.poll() is None and time.monotonic() < deadline, stderr_path.read_text()
            time.sleep(0.2)
        request_id = stderr_path.read_text().split("approvals withdraw ", 1)[1].split()[0]
        request_id = request_id.rstrip(")")
        os.kill(job.pid, signal.SIGTERM)  # the parent alone, as `kill PID` or a supervisor
        job.communicate(timeout=WAIT_TIMEOUT_SECONDS)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
        leftovers = subprocess.run(["pgrep", "-s", str(job.pid)], capture_output=True,
                                   text=True, check=False).stdout.split()
        for pid in leftovers:
            os.kill(int(pid), signal.SIGKILL)
        team.tucdesk("agents", "tag", agent, "--remove", "review10")
    said = stderr_path.read_text()
    assert job.returncode == -signal.SIGTERM, said
    assert leftovers == [], said
    assert request_state(team, request_id) == WITHDRAWN, said
    assert f"withdrew request {request_id}" in said


# ---- 7. a damaged token on a read-only home ------------------------------------------------


def test_a_damaged_token_on_a_read_only_home_is_ignored_and_the_command_signs_in(
    team: PolicyStack, tmp_path: Path
) -> None:
    home = tmp_path / "ci"
    subprocess.run(["cp", "-a", str(team.admin_home), str(home)], check=True)
    token_file = home / "token.json"
    token_file.write_text("{not json")
    token_file.chmod(0o600)
    command = read_only_command(home, team.stack.tucdesk_command(
        "exec", team.stack.agent_name, "--", "echo", "hi", home=home))
    done = subprocess.run(command, input=b"", capture_output=True, timeout=60,
                          env=team.stack.cli_env(home), check=False)
    said = done.stderr.decode()
    assert (done.returncode, done.stdout) == (0, b"hi\n"), said
    assert f"the cached token in {token_file} is damaged and cannot be removed" in said
    assert "cannot cache the new access token" in said
    assert token_file.read_text() == "{not json"  # nothing written
    assert "Traceback" not in said
