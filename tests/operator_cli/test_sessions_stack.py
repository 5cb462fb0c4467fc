"""`tucdesk exec`, `tucdesk connect` and `tucdesk agents trust` through the whole real stack.

One LocalStack per module (rendezvous on TLS, relay and agent as real processes on loopback);
the CLI runs as a subprocess exactly as a user would run it, and `connect` runs in a real PTY
driven by pexpect.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pexpect
import pytest

from operator_cli.known_agents import KnownAgents
from operator_cli.local_stack import LocalStack
from protocol.identity import SigningIdentity

pytestmark = pytest.mark.slow

EXPECT_TIMEOUT_SECONDS = 20
EXIT_CONNECTION_FAILED = 255


@contextmanager
def pinned_stack(directory: Path) -> Iterator[LocalStack]:
    """A started LocalStack (its logs printed if it fails to start) whose agent key the CLI has
    already pinned (that first session says so on stderr), so later sessions are ordinary
    pinned ones."""
    with LocalStack(directory) as started:
        try:
            started.start()
        except BaseException:
            for log in sorted(started.log_dir.glob("*.log")):
                print(f"--- {log.name}\n{log.read_text(errors='replace')[-3000:]}")
            raise
        assert started.run_tucdesk("exec", started.agent_name, "--", "true").returncode == 0
        yield started


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with pinned_stack(tmp_path_factory.mktemp("sessions-stack")) as started:
        yield started


def spawn_connect(stack: LocalStack, *extra: str) -> pexpect.spawn:
    argv = stack.tucdesk_command("connect", *extra, stack.agent_name)
    env = dict(stack.cli_env(), TERM="xterm", PS1="$ ")
    return pexpect.spawn(
        argv[0], argv[1:], env=env, timeout=EXPECT_TIMEOUT_SECONDS, dimensions=(30, 100)
    )


def wait_for_shell(child: pexpect.spawn) -> None:
    # Typed characters echo before the shell runs anything; the computed result proves it ran.
    child.sendline("echo ready-$((20+22))")
    child.expect("ready-42")


def finish(child: pexpect.spawn) -> int | None:
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def test_exec_separates_stdout_and_stderr_and_returns_the_exit_code(stack: LocalStack) -> None:
    completed = stack.run_tucdesk(
        "exec", stack.agent_name, "--", "sh", "-c", "echo out; echo err >&2; exit 7"
    )
    assert (completed.returncode, completed.stdout, completed.stderr) == (7, b"out\n", b"err\n")


def test_exec_pipes_stdin_through(stack: LocalStack) -> None:
    data = b"".join(b"line %d\n" % number for number in range(20_000))
    completed = stack.run_tucdesk("exec", stack.agent_name, "--", "sha256sum", input=data)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()


def test_exec_of_a_command_killed_by_a_signal_exits_128_plus_the_signal(stack: LocalStack) -> None:
    completed = stack.run_tucdesk("exec", stack.agent_name, "--", "sh", "-c", "kill -TERM $$")
    assert completed.returncode == 128 + 15


def test_exec_on_an_unknown_agent_fails_with_one_line_and_255(stack: LocalStack) -> None:
    completed = stack.run_tucdesk("exec", "no-such-agent", "--", "true")
    assert completed.returncode == EXIT_CONNECTION_FAILED
    lines = completed.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tucdesk: "), lines


def test_connect_runs_commands_and_exits_with_the_shells_status(stack: LocalStack) -> None:
    child = spawn_connect(stack)
    wait_for_shell(child)
    child.sendline("stty size")
    child.expect("30 100")
    child.setwinsize(40, 120)
    child.sendline("stty size")
    child.expect("40 120")
    child.sendline("exit 3")
    assert finish(child) == 3


def test_tilde_dot_after_a_newline_disconnects_with_255(stack: LocalStack) -> None:
    child = spawn_connect(stack)
    wait_for_shell(child)
    child.send("\r~.")
    child.expect("Connection to .* closed")
    assert finish(child) == EXIT_CONNECTION_FAILED


def test_a_changed_agent_key_is_refused_loudly_until_trusted(
    stack: LocalStack, tmp_path: Path
) -> None:
    assert stack.run_tucdesk("exec", stack.agent_name, "--", "true").returncode == 0
    assert stack.agent is not None
    known = KnownAgents.in_home(stack.cli_home)
    real_key = known.pinned_key(stack.agent.id)
    assert real_key is not None
    impostor = SigningIdentity.generate().public
    known.trust(stack.agent.id, impostor)  # as if the key pinned earlier were another one

    marker = tmp_path / "ran"
    refused = stack.run_tucdesk("exec", stack.agent_name, "--", "touch", str(marker))
    message = refused.stderr.decode()
    assert refused.returncode == EXIT_CONNECTION_FAILED
    assert "WARNING" in message and "has changed" in message
    assert impostor.fingerprint in message and real_key.fingerprint in message
    assert f"tucdesk agents trust {stack.agent.id}" in message
    assert not marker.exists()

    unconfirmed = stack.run_tucdesk("agents", "trust", stack.agent_name)
    assert unconfirmed.returncode != 0
    assert known.pinned_key(stack.agent.id) == impostor

    trusted = stack.run_tucdesk("agents", "trust", stack.agent_name, "--yes")
    assert trusted.returncode == 0, trusted.stderr
    assert real_key.fingerprint in trusted.stdout.decode()
    assert known.pinned_key(stack.agent.id) == real_key
    assert stack.run_tucdesk("exec", stack.agent_name, "--", "touch", str(marker)).returncode == 0
    assert marker.exists()
