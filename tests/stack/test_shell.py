"""`tucdesk connect` through the whole stack, driven through a real PTY and checked on a terminal
emulator's screen (pyte): a full-screen editor draws, a resize reaches the remote program, the
remote shell's exit status comes back, `~.` disconnects and tears the remote shell down, and the
relay sees nothing of what was typed or printed."""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.stack.conftest import TappedStack
from tests.stack.screen import TerminalProgram

pytestmark = pytest.mark.slow


def _require_programs(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        message = f"whole-stack shell tests run {', '.join(missing)}, which is not installed"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: install it, e.g. scripts/install-system-deps)")
        pytest.skip(message)


@pytest.fixture(autouse=True)
def _full_screen_programs() -> None:
    _require_programs("vi", "top", "stty")


ROWS, COLUMNS = 24, 80
PROCESS_GONE_TIMEOUT_SECONDS = 15.0
RESIZE_TIMEOUT_SECONDS = 15.0
WAIT_SECONDS = 20.0
_POLL_SECONDS = 0.05


def connect(stack: TappedStack, rows: int = ROWS, columns: int = COLUMNS) -> TerminalProgram:
    """`tucdesk connect AGENT` in a PTY, at a shell prompt that is known to be ready."""
    env = dict(stack.cli_env(), TERM="xterm-256color", LANG="C.UTF-8")
    program = TerminalProgram(
        stack.tucdesk_command("connect", stack.agent_name), env=env, rows=rows, columns=columns
    )
    run_and_wait(program, "PS1='remote$ '; echo shell-ready-'marker'", b"shell-ready-marker")
    return program


def run_and_wait(program: TerminalProgram, command: str, expected: bytes) -> int:
    """Type ``command``; wait until ``expected`` appears after it; return the offset after it."""
    start = len(program.output)
    program.send(command + "\r")
    return program.wait_for_output(expected, start)


def remote_shell_pid(program: TerminalProgram) -> int:
    end = run_and_wait(program, "echo shell-pid=$$.'end'", b".end")
    match = re.findall(rb"shell-pid=(\d+)\.end", bytes(program.output[:end]))
    return int(match[-1])


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(_POLL_SECONDS)


def wait_until_gone(pid: int) -> None:
    deadline = time.monotonic() + PROCESS_GONE_TIMEOUT_SECONDS
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the remote shell (pid {pid}) is still running")
        time.sleep(_POLL_SECONDS)


def test_vi_draws_its_full_screen_through_the_relay(stack: TappedStack, tmp_path: Path) -> None:
    document = tmp_path / "notes.txt"
    document.write_text("first line of the notes\nsecond line\n")
    program = connect(stack)
    try:
        program.send(f"vi {document}\r")
        program.wait_for_screen("second line")
        program.wait_until(
            lambda p: p.display()[2].startswith("~") and "notes.txt" in p.display()[ROWS - 1],
            "vi's empty-line markers and status line",
        )
        lines = program.display()
        assert lines[0] == "first line of the notes"
        assert lines[1] == "second line"
        assert all(line.startswith("~") for line in lines[2 : ROWS - 1])
        program.send("Gohello from the editor\x1b:wq\r")
        wait_for(
            lambda: document.read_text().endswith("second line\nhello from the editor\n"),
            "vi to save what was typed into it",
        )
    finally:
        program.close()


def test_a_resize_reaches_the_remote_shell(stack: TappedStack) -> None:
    program = connect(stack)
    try:
        assert b"24 80" in stty_size(program)
        program.resize(40, 120)
        # The resize travels beside the keystrokes; ask again until it has landed, or time out.
        deadline = time.monotonic() + RESIZE_TIMEOUT_SECONDS
        while b"40 120" not in stty_size(program):
            assert time.monotonic() < deadline, "the remote terminal never became 40x120"
    finally:
        program.close()


def stty_size(program: TerminalProgram) -> bytes:
    start = len(program.output)
    end = run_and_wait(program, "stty size; echo size-'done'", b"size-done")
    return bytes(program.output[start:end])


def test_a_resize_redraws_a_running_full_screen_program(stack: TappedStack, tmp_path: Path) -> None:
    document = tmp_path / "resize.txt"
    document.write_text("resize me\n")
    program = connect(stack)
    try:
        program.send(f"vi {document}\r")
        program.wait_until(lambda p: "resize.txt" in p.display()[ROWS - 1], "vi at 24 rows")
        program.resize(30, 100)
        program.wait_until(
            lambda p: p.display()[0] == "resize me" and p.display()[28].startswith("~"),
            "vi redrawn down to row 29 of 30",
        )
    finally:
        program.close()


def test_top_fills_a_resized_screen(stack: TappedStack) -> None:
    program = connect(stack, rows=30, columns=100)
    try:
        program.resize(35, 110)
        run_and_wait(program, "stty size; echo resized-'ok'", b"resized-ok")
        program.send("top -d 0.5\r")
        program.wait_until(
            lambda p: (
                p.display()[0].startswith("top -")
                and any("PID" in line and "COMMAND" in line for line in p.display())
            ),
            "top's header and process table",
        )
    finally:
        program.close()


def test_the_remote_shell_exit_status_is_the_connect_exit_status(stack: TappedStack) -> None:
    program = connect(stack)
    try:
        program.send("exit 7\r")
        assert program.wait_for_exit() == 7
    finally:
        program.close()


def test_tilde_dot_disconnects_and_the_remote_shell_is_torn_down(stack: TappedStack) -> None:
    program = connect(stack)
    try:
        pid = remote_shell_pid(program)
        program.send("sleep 600\r")
        program.send("\r~.")
        status = program.wait_for_exit()
        assert status != 0
        wait_until_gone(pid)
    finally:
        program.close()


def test_the_relay_sees_no_plaintext_of_what_was_typed_or_printed(stack: TappedStack) -> None:
    assert stack.tap is not None
    typed = "typed-" + secrets.token_hex(8)
    printed = typed.upper()  # only the remote shell computes this, from what was typed
    before = len(stack.tap.captured())
    program = connect(stack)
    try:
        run_and_wait(program, f"echo {typed} | tr a-z A-Z", printed.encode())
        program.send("exit\r")
        program.wait_for_exit()
    finally:
        program.close()
    exec_input = ("stdin-" + secrets.token_hex(8)).encode()
    completed = stack.run_tucdesk("exec", stack.agent_name, "--", "cat", input=exec_input)
    assert completed.stdout == exec_input
    traffic = stack.tap.captured()[before:]
    assert len(traffic) > 2000, "the tap saw no session traffic: the test would prove nothing"
    for secret in (typed.encode(), printed.encode(), exec_input, b"remote$", b"shell-ready"):
        assert secret not in traffic
        assert secret.hex().encode() not in traffic


def test_the_local_terminal_is_restored_after_connect_exits(stack: TappedStack) -> None:
    env = dict(stack.cli_env(), TERM="xterm-256color", PS1="local$ ")
    program = TerminalProgram(["bash", "--norc", "--noprofile"], env=env)
    try:
        settings_before = local_terminal_settings(program)
        assert "icanon" in settings_before and "isig" in settings_before
        command = shlex.join(stack.tucdesk_command("connect", stack.agent_name))
        program.send(command + "\r")
        run_and_wait(program, "PS1='remote$ '; echo shell-ready-'marker'", b"shell-ready-marker")
        start = len(program.output)
        program.send("exit 3\r")
        program.wait_for_output(b"local$ ", start)
        end = run_and_wait(program, "echo connect-status=$?.'end'", b".end")
        assert b"connect-status=3.end" in program.output[start:end]
        assert local_terminal_settings(program) == settings_before
    finally:
        program.close()


def local_terminal_settings(program: TerminalProgram) -> list[str]:
    """The local terminal's echo/canonical/signal flags, as `stty -a` reports them."""
    start = len(program.output)
    end = run_and_wait(
        program, "stty -a | tr ' ;' '\\n\\n' | grep -xE -- '-?(echo|icanon|isig|opost)' | "
        "tr '\\n' ,; echo tty-'end'", b"tty-end"
    )  # fmt: skip
    text = bytes(program.output[start:end]).decode()
    flags = text.rsplit("\n", 1)[-1].replace("tty-end", "").strip(",\r\n ").split(",")
    return flags


def test_ctrl_c_interrupts_the_remote_foreground_program(stack: TappedStack) -> None:
    program = connect(stack)
    try:
        pid = remote_shell_pid(program)
        program.send("sleep 600\r")
        wait_for(lambda: _has_child_named(pid, "sleep"), "the remote sleep to start")
        program.send("\x03")
        wait_for(lambda: not _has_child_named(pid, "sleep"), "the sleep to be interrupted")
        end = run_and_wait(program, "echo status-$?.'end'", b".end")
        assert b"status-130.end" in program.output[:end]
    finally:
        program.close()


def _has_child_named(pid: int, name: str) -> bool:
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return False
    for child in children:
        try:
            if Path(f"/proc/{child}/comm").read_text().strip() == name:
                return True
        except OSError:
            continue
    return False
