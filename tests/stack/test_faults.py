"""Faults with real processes: a state file moved to another machine, the relay killed in the
middle of a session, and a rendezvous restart that the agent must ride out by itself."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.stack.conftest import StackFactory, TappedStack
from tests.stack.test_shell import connect, remote_shell_pid, wait_until_gone

pytestmark = pytest.mark.slow

AGENT_COMMAND_TIMEOUT_SECONDS = 60
SESSION_END_TIMEOUT_SECONDS = 20.0
RECONNECT_TIMEOUT_SECONDS = 45.0


def fake_machine(root: Path, machine_id: str) -> Path:
    """A directory tree whose /etc/machine-id is ``machine_id`` (the agent reads it from here)."""
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "machine-id").write_text(machine_id + "\n")
    return root


def agent_command(
    stack: TappedStack, machine_root: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TUCDESK_AGENT_MACHINE_ROOT=str(machine_root))
    return subprocess.run(
        [sys.executable, "-m", "agent.main", *args],
        capture_output=True, text=True, env=env, timeout=AGENT_COMMAND_TIMEOUT_SECONDS,
        stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip


def test_a_state_file_moved_to_another_machine_refuses_to_open(
    stack: TappedStack, tmp_path: Path
) -> None:
    here = fake_machine(tmp_path / "machine-a", secrets.token_hex(16))
    elsewhere = fake_machine(tmp_path / "machine-b", secrets.token_hex(16))
    state_dir = tmp_path / "agent-state"
    enrolled = agent_command(
        stack, here, "enroll", "--server", stack.server_url,
        "--registration-key", stack.create_registration_key(), "--name", "moved-agent",
        "--state-dir", str(state_dir), "--ca-file", str(stack.ca_file),
    )  # fmt: skip
    assert enrolled.returncode == 0, enrolled.stderr
    assert "SHA256:" in enrolled.stdout  # the agent's key fingerprint, for the admin to pin

    at_home = agent_command(stack, here, "status", "--state-dir", str(state_dir))
    assert at_home.returncode == 3, at_home.stderr  # enrolled; LSB "not running": no daemon yet
    assert "Enrolled:     yes" in at_home.stdout

    for command in ("status", "run"):
        moved = agent_command(stack, elsewhere, command, "--state-dir", str(state_dir))
        assert moved.returncode != 0
        assert "another machine" in moved.stderr
        assert "re-enroll" in moved.stderr
        assert "Traceback" not in moved.stderr


def test_killing_the_relay_mid_session_ends_both_sides_with_a_message(
    stack_factory: StackFactory,
) -> None:
    stack = stack_factory()
    program = connect(stack)
    try:
        shell_pid = remote_shell_pid(program)
        program.send("sleep 600\r")
        stack.kill_relay()
        status = program.wait_for_exit(SESSION_END_TIMEOUT_SECONDS)
        assert status != 0
        said = bytes(program.output).decode("utf-8", "replace")
        assert re.search(r"relay|connection", said, re.IGNORECASE), said[-500:]
        assert "Traceback" not in said
        wait_until_gone(shell_pid)  # the agent tore the remote side down too
    finally:
        program.close()
    agent_log = stack.processes["agent"].log_path.read_text()
    assert re.search(r"session \S+ ended", agent_log), agent_log[-1500:]
    assert "Traceback" not in agent_log
    agent = stack.processes["agent"]
    assert agent.is_running(), "losing a relay must not take the agent daemon down"
    assert stack.agent_online()


@pytest.mark.parametrize(
    ("backend", "how"),
    [
        ("sqlite", "stop"),
        ("sqlite", "crash"),
        pytest.param("postgres", "stop", marks=pytest.mark.postgres),
    ],
)
def test_the_agent_comes_back_online_by_itself_after_a_rendezvous_restart(
    stack_factory: StackFactory, backend: str, how: str
) -> None:
    stack = stack_factory(backend)
    assert stack.run_tucdesk("exec", stack.agent_name, "--", "true").returncode == 0
    if how == "stop":
        stack.stop_rendezvous()  # a graceful stop forgets the agent's connection
    else:
        stack.kill_rendezvous()  # SIGKILL: nothing is cleaned up
    stack.start_rendezvous()  # same port, same data
    stack.wait_agent_online(timeout=RECONNECT_TIMEOUT_SECONDS)
    # A session needs the agent's live control channel, so one that runs proves the agent
    # reconnected. After a crash the dead instance's connection row can still say "online"
    # for a while, and the agent may still be backing off: retry "offline" until the deadline.
    deadline = time.monotonic() + RECONNECT_TIMEOUT_SECONDS
    while True:
        completed = stack.run_tucdesk("exec", stack.agent_name, "--", "echo", "back again")
        if completed.returncode == 0 or b"offline" not in completed.stderr:
            break
        assert time.monotonic() < deadline, "the agent did not come back: " + str(completed)
        time.sleep(0.2)
    assert (completed.returncode, completed.stdout) == (0, b"back again\n"), completed.stderr
    assert stack.processes["agent"].is_running()


def test_exec_to_a_stopped_agent_says_it_is_offline(
    stack_factory: StackFactory,
) -> None:
    stack = stack_factory()
    stack.stop_agent()
    deadline = time.monotonic() + SESSION_END_TIMEOUT_SECONDS
    while stack.agent_online():
        assert time.monotonic() < deadline, "the stopped agent still shows as online"
        time.sleep(0.1)
    completed = stack.run_tucdesk("exec", stack.agent_name, "--", "true")
    assert completed.returncode != 0
    assert b"offline" in completed.stderr
    assert b"Traceback" not in completed.stderr
