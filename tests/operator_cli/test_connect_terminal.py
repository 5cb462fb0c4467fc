"""`tucdesk connect` as an operator's terminal sees it, through the whole real stack.

The client runs in a real PTY; where the point is what the operator sees, the screen is rebuilt
with pyte. A terminal that reads slowly is simulated by draining the PTY at a fixed rate.
"""

from __future__ import annotations

import io
import json
import os
import select
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pyte
import pytest

from operator_cli.local_stack import LocalStack
from tests.operator_cli.test_sessions_stack import (
    EXPECT_TIMEOUT_SECONDS,
    pinned_stack,
    spawn_connect,
    wait_for_shell,
)

pytestmark = pytest.mark.slow

EXIT_CONNECTION_FAILED = 255
EXIT_INTERRUPTED = 130
SLOW_TERMINAL_BYTES_PER_SECOND = 1_000_000
DRAIN_SLICE_SECONDS = 0.05


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with pinned_stack(tmp_path_factory.mktemp("connect-terminal")) as started:
        yield started


def drain_slowly(child: pexpect.spawn, seconds: float) -> None:
    """Read the client's output like a terminal that manages only ~1 MB/s."""
    per_slice = int(SLOW_TERMINAL_BYTES_PER_SECOND * DRAIN_SLICE_SECONDS)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if select.select([child.child_fd], [], [], DRAIN_SLICE_SECONDS)[0]:
            try:
                os.read(child.child_fd, per_slice)
            except OSError:
                return  # the client has gone
        time.sleep(DRAIN_SLICE_SECONDS)


def remote_process_running(marker: str) -> bool:
    # The agent runs on this machine: its shell's children are visible here.
    return subprocess.run(["pgrep", "-f", marker], capture_output=True).returncode == 0


def test_ctrl_c_and_tilde_dot_work_while_a_slow_terminal_lags_behind_a_flood(
    stack: LocalStack,
) -> None:
    marker = f"tucflood{os.getpid()}"
    child = spawn_connect(stack)
    wait_for_shell(child)
    child.send(f"yes {marker}\r")
    drain_slowly(child, 1.5)
    assert remote_process_running(marker)

    child.send("\x03")
    deadline = time.monotonic() + 5
    while remote_process_running(marker) and time.monotonic() < deadline:
        drain_slowly(child, 0.25)
    assert not remote_process_running(marker), "Ctrl-C did not reach the remote shell"

    child.send("\r~.")
    deadline = time.monotonic() + 3
    while child.isalive() and time.monotonic() < deadline:
        drain_slowly(child, 0.1)
    assert not child.isalive(), "~. did not end the session while output was pending"
    child.close()
    assert child.exitstatus == EXIT_CONNECTION_FAILED


def test_connect_with_piped_input_runs_it_and_ends_with_the_input(stack: LocalStack) -> None:
    completed = stack.run_tucdesk(
        "connect", stack.agent_name, input=b"echo hi-$((40+2))\n", timeout=30
    )
    assert completed.returncode == 0, completed.stderr
    assert b"hi-42" in completed.stdout
    assert b"\x1b[?2004" not in completed.stdout  # no bracketed-paste codes in piped output
    assert b"stdin is not a terminal" in completed.stderr


def test_connect_with_no_input_ends_at_once(stack: LocalStack) -> None:
    completed = stack.run_tucdesk("connect", stack.agent_name, input=b"", timeout=30)
    assert completed.returncode == 0, completed.stderr


def screen_lines(child: pexpect.spawn, rows: int = 30, cols: int = 100) -> list[str]:
    """What the operator's terminal shows once the client has ended (pyte)."""
    screen = pyte.Screen(cols, rows)
    stream = pyte.ByteStream(screen)
    assert isinstance(child.logfile_read, io.BytesIO)
    stream.feed(child.logfile_read.getvalue())
    return [line.rstrip() for line in screen.display if line.strip()]


@pytest.mark.parametrize("command", ["exec", "connect"])
def test_ctrl_c_while_the_relay_is_slow_to_pair_says_one_line_and_exits_130(
    stack: LocalStack, command: str
) -> None:
    relay = stack.processes["relay"]
    os.kill(relay.pid, signal.SIGSTOP)  # the relay accepts (the kernel does) but never pairs
    try:
        extra = ["--", "true"] if command == "exec" else []
        argv = stack.tucdesk_command(command, stack.agent_name, *extra)
        child = pexpect.spawn(argv[0], argv[1:], env=dict(stack.cli_env(), TERM="xterm"),
                              timeout=EXPECT_TIMEOUT_SECONDS, dimensions=(30, 100))
        child.logfile_read = io.BytesIO()
        child.expect("waiting for the relay to pair")
        child.sendintr()
        child.expect(pexpect.EOF)
        child.close()
    finally:
        os.kill(relay.pid, signal.SIGCONT)
    shown = screen_lines(child)
    assert child.exitstatus == EXIT_INTERRUPTED, shown
    assert shown == [
        "tucdesk: waiting for the relay to pair… (Ctrl-C to give up)",
        "^Ctucdesk: interrupted",  # ^C: the terminal's echo of the key
    ], shown


def test_ctrl_c_while_the_server_does_not_answer_says_one_line_and_exits_130(
    stack: LocalStack, tmp_path: Path
) -> None:
    home = tmp_path / "cli"
    shutil.copytree(stack.cli_home, home)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (backlog), never answers
        port = silent.getsockname()[1]
        settings = json.loads((home / "settings.json").read_text())
        settings["server"] = f"https://127.0.0.1:{port}"
        (home / "settings.json").write_text(json.dumps(settings))
        argv = stack.tucdesk_command("agents", home=home)
        child = pexpect.spawn(argv[0], argv[1:], env=dict(stack.cli_env(), TERM="xterm"),
                              timeout=EXPECT_TIMEOUT_SECONDS, dimensions=(30, 100))
        child.logfile_read = io.BytesIO()
        silent.settimeout(EXPECT_TIMEOUT_SECONDS)
        connection, _ = silent.accept()  # the CLI is now waiting for the server's answer
        child.sendintr()
        child.expect(pexpect.EOF)
        child.close()
        connection.close()
    shown = screen_lines(child)
    assert child.exitstatus == EXIT_INTERRUPTED, shown
    assert shown == ["^Ctucdesk: interrupted"], shown


def test_the_first_session_with_an_agent_says_which_key_it_pinned(
    stack: LocalStack, tmp_path: Path
) -> None:
    home = tmp_path / "cli"
    shutil.copytree(stack.cli_home, home)
    (home / "known_agents.json").unlink()
    assert stack.agent is not None
    first = stack.run_tucdesk("exec", stack.agent_name, "--", "true", home=home)
    assert first.returncode == 0, first.stderr
    assert first.stderr.decode().splitlines() == [
        f"Pinned the key of agent {stack.agent_name} ({stack.agent.id}) on first use: "
        f"{stack.agent.fingerprint}"
    ]
    again = stack.run_tucdesk("exec", stack.agent_name, "--", "true", home=home)
    assert (again.returncode, again.stderr) == (0, b"")


def test_exec_of_a_shell_command_line_as_one_argument_suggests_sh_c(stack: LocalStack) -> None:
    line = "echo $HOME | tr a-z A-Z"
    completed = stack.run_tucdesk("exec", stack.agent_name, "--", line)
    assert completed.returncode == 127
    assert completed.stderr.decode().splitlines()[-1] == (
        "tucdesk: (exec runs argv without a shell; for a pipeline use: "
        f"tucdesk exec {stack.agent_name} -- sh -c '{line}')"
    )
    plain = stack.run_tucdesk("exec", stack.agent_name, "--", "no-such-program-here")
    assert plain.returncode == 127
    assert b"without a shell" not in plain.stderr


def test_tilde_ctrl_z_suspends_the_client_with_the_terminal_restored_and_fg_resumes(
    stack: LocalStack,
) -> None:
    # A job-control shell around the client, as the operator has: ~^Z stops the client's job.
    env = dict(stack.cli_env(), TERM="xterm", PS1="local$ ")
    shell = pexpect.spawn("bash", ["--norc", "--noprofile", "-i"], env=env,
                          timeout=EXPECT_TIMEOUT_SECONDS, dimensions=(30, 100))
    shell.expect_exact("local$ ")
    command = shlex.join(stack.tucdesk_command("connect", "-e", "^]", stack.agent_name))
    shell.sendline(command)
    wait_for_shell(shell)
    shell.send("\r\x1d?")
    shell.expect_exact("^]^Z  - suspend tucdesk")
    shell.send("\r\x1d\x1a")
    shell.expect("Stopped")
    shell.expect_exact("local$ ")
    shell.sendline("stty -a | grep -o -- '-\\?icanon' | sed 's/^/mode:/'")
    shell.expect(r"mode:(-?icanon)")
    assert shell.match.group(1) == b"icanon"  # cooked again while the client is stopped
    shell.sendline("fg")
    wait_for_shell(shell)
    shell.sendline("exit 4")
    shell.expect_exact("local$ ")
    shell.sendline("echo client-exit-$?")
    shell.expect("client-exit-4")
    shell.sendline("exit")
    shell.expect(pexpect.EOF)
