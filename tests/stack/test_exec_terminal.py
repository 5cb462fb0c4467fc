"""`tucdesk exec -t` (and `tucdesk ssh -t`) through the whole stack, as `ssh -t host cmd`: the
command runs on a remote terminal of our size and type, keys go through raw (Ctrl-C is a key),
a resize reaches it, its exit status is ours; without a terminal on stdin it runs on pipes and
says so, unless -tt forces a terminal."""

from __future__ import annotations

import re
import time

import pytest

from tests.stack.conftest import TappedStack
from tests.stack.screen import TerminalProgram

pytestmark = pytest.mark.slow

RESIZE_TIMEOUT_SECONDS = 15.0


def exec_t(stack: TappedStack, *command: str, rows: int = 24, columns: int = 80,
           flag: str = "-t") -> TerminalProgram:  # fmt: skip
    env = dict(stack.cli_env(), TERM="xterm-256color", LANG="C.UTF-8")
    return TerminalProgram(
        stack.tucdesk_command("exec", flag, stack.agent_name, "--", *command),
        env=env, rows=rows, columns=columns,
    )  # fmt: skip


def test_the_command_runs_on_a_terminal_of_our_size_and_type(stack: TappedStack) -> None:
    program = exec_t(
        stack, "sh", "-c", 'tty; stty size; echo "term=$TERM"; exit 3', rows=30, columns=100
    )
    try:
        assert program.wait_for_exit() == 3
        output = bytes(program.output).decode(errors="replace")
    finally:
        program.close()
    assert re.search(r"^/dev/pts/\d+\r$", output, re.MULTILINE), output
    assert "30 100\r\n" in output
    assert "term=xterm-256color\r\n" in output
    assert f"Connection to {stack.agent_name} closed." in output


def test_keys_go_through_raw_and_a_resize_reaches_the_command(stack: TappedStack) -> None:
    program = exec_t(stack, "sh", "-c", 'while read line; do echo "got:$line"; stty size; done')
    try:
        program.send("first\r")
        program.wait_for_output(b"got:first")
        program.wait_for_output(b"24 80")  # stty size, printed after the echo
        program.resize(40, 120)
        deadline = time.monotonic() + RESIZE_TIMEOUT_SECONDS
        while b"40 120" not in bytes(program.output):
            assert time.monotonic() < deadline, "the remote terminal never became 40x120"
            start = len(program.output)
            program.send("again\r")
            program.wait_for_output(b"got:again", start)
        program.send("\x03")  # Ctrl-C is a key on the remote terminal: it ends sh
        assert program.wait_for_exit() == 130
    finally:
        program.close()


def test_a_missing_program_exits_127_saying_why(stack: TappedStack) -> None:
    program = exec_t(stack, "no-such-program-here")
    try:
        assert program.wait_for_exit() == 127
        output = bytes(program.output)
    finally:
        program.close()
    assert b"cannot run 'no-such-program-here': No such file or directory" in output


def test_without_a_terminal_on_stdin_it_runs_on_pipes_unless_forced(stack: TappedStack) -> None:
    piped = stack.run_tucdesk("exec", "-t", stack.agent_name, "--", "tty")
    assert piped.returncode == 1  # tty(1): "not a tty"
    assert piped.stdout == b"not a tty\n"
    assert b"no terminal for the command: stdin is not a terminal (-tt forces one)" in (
        piped.stderr
    )
    forced = stack.run_tucdesk("ssh", "-tt", stack.agent_name, "tty")
    assert forced.returncode == 0, forced.stderr
    assert re.fullmatch(rb"/dev/pts/\d+\r\n", forced.stdout), forced.stdout
