"""`tucdesk exec` through the whole stack (rendezvous, relay, agent as real processes), on SQLite
and on PostgreSQL: output streams, stdin, exit codes and signals arrive as `ssh host cmd` would
deliver them."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.stack.conftest import TappedStack

pytestmark = pytest.mark.slow

EXEC_TIMEOUT_SECONDS = 60


def run_exec(stack: TappedStack, *command: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    completed = stack.run_tucdesk(
        "exec", stack.agent_name, "--", *command, input=stdin, timeout=EXEC_TIMEOUT_SECONDS
    )
    return completed.returncode, completed.stdout, completed.stderr


def test_exec_delivers_stdout_and_stderr_separately_and_the_exit_code(
    backend_stack: TappedStack,
) -> None:
    code, out, err = run_exec(
        backend_stack, "sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"
    )
    assert code == 3
    assert out == b"to-stdout\n"
    assert b"to-stderr\n" in err
    assert b"to-stdout" not in err


def test_exec_of_a_succeeding_command_exits_zero(backend_stack: TappedStack) -> None:
    code, out, _ = run_exec(backend_stack, "uname", "-s")
    assert (code, out) == (0, b"Linux\n")


def test_exec_pipes_stdin_through_and_ends_it(backend_stack: TappedStack) -> None:
    data = b"".join(b"line %d of the input\n" % number for number in range(5000))
    code, out, _ = run_exec(backend_stack, "tr", "a-z", "A-Z", stdin=data)
    assert code == 0
    assert out == data.upper()


def test_exec_reports_a_terminating_signal_as_128_plus_the_signal(
    backend_stack: TappedStack,
) -> None:
    code, _, _ = run_exec(backend_stack, "sh", "-c", "kill -TERM $$")
    assert code == 128 + 15


def test_exec_of_a_missing_program_fails_and_says_why(backend_stack: TappedStack) -> None:
    # As `ssh host CMD` through the remote shell: 127 and the reason on stderr.
    code, out, err = run_exec(backend_stack, "no-such-program-here")
    assert code == 127
    assert out == b""
    assert err == (
        b"tucdesk-agent: cannot run 'no-such-program-here': No such file or directory\n"
    )


def test_exec_of_a_file_that_cannot_run_exits_126(
    backend_stack: TappedStack, tmp_path: Path
) -> None:
    not_executable = tmp_path / "notes.txt"  # the agent runs on this machine
    not_executable.write_text("not a program\n")
    not_executable.chmod(0o644)
    code, out, err = run_exec(backend_stack, str(not_executable))
    assert code == 126
    assert out == b""
    assert err == f"tucdesk-agent: cannot run '{not_executable}': Permission denied\n".encode()


def test_exec_carries_binary_output_unchanged(backend_stack: TappedStack) -> None:
    code, out, _ = run_exec(
        backend_stack, "python3", "-c",
        "import sys; sys.stdout.buffer.write(bytes(range(256)) * 4096)",
    )  # fmt: skip
    assert code == 0
    assert out == bytes(range(256)) * 4096


def test_exec_to_an_unknown_agent_fails_with_a_message(backend_stack: TappedStack) -> None:
    completed = backend_stack.run_tucdesk("exec", "no-such-agent", "--", "true")
    assert completed.returncode != 0
    assert b"no-such-agent" in completed.stderr or b"not found" in completed.stderr
    assert b"Traceback" not in completed.stderr


def test_an_interrupt_of_exec_is_forwarded_to_the_remote_command(
    backend_stack: TappedStack, tmp_path: Path
) -> None:
    started = tmp_path / "started"
    process = subprocess.Popen(
        backend_stack.tucdesk_command(
            "exec", backend_stack.agent_name, "--", "sh", "-c",
            f"touch {started}; exec sleep 600",
        ),
        env=backend_stack.cli_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + EXEC_TIMEOUT_SECONDS
        while not started.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the remote command never started"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=EXEC_TIMEOUT_SECONDS)
        assert process.returncode == 128 + signal.SIGINT, err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
