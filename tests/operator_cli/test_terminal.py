"""The operator's terminal: raw mode always restored (checked through a real PTY), window size."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import struct
import sys
import termios
import textwrap
from pathlib import Path

import pexpect  # type: ignore[import-untyped]
import pytest
import trio

from operator_cli.terminal import (
    RawTerminal,
    WindowSize,
    read_window_size,
    send_window_size_changes,
)

REPOSITORY = Path(__file__).resolve().parents[2]
EXPECT_TIMEOUT = 10

CHILD = textwrap.dedent(
    """
    import os, signal, sys, termios
    from operator_cli.terminal import RawTerminal

    mode = sys.argv[1]

    def own_handler(signum, frame):
        print("own handler ran", flush=True)
        os._exit(7)

    if mode == "own-handler":
        signal.signal(signal.SIGTERM, own_handler)
    with RawTerminal(0):
        raw = not termios.tcgetattr(0)[3] & (termios.ICANON | termios.ECHO)
        os.write(1, f"RAW={raw} PID={os.getpid()}\\r\\n".encode())
        if mode == "exception":
            raise RuntimeError("boom")
        if mode != "normal":
            os.read(0, 1)  # wait here, in raw mode, for a signal
    print("left the block", flush=True)
    """
)


def run_child(tmp_path: Path, mode: str, signum: int | None = None) -> tuple[int, str]:
    """Run the child on a fresh PTY; return its exit code and `stty -a` taken after it."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    command = f'{sys.executable} {script} {mode}; echo "rc=$?"; stty -a'
    child = pexpect.spawn(
        "/bin/sh",
        ["-c", command],
        env={**os.environ, "PYTHONPATH": str(REPOSITORY)},
        timeout=EXPECT_TIMEOUT,
        encoding="utf-8",
    )
    try:
        child.expect(r"RAW=(\w+) PID=(\d+)")
        assert child.match.group(1) == "True"
        if signum is not None:
            os.kill(int(child.match.group(2)), signum)
        child.expect(r"rc=(\d+)")
        code = int(child.match.group(1))
        child.expect(pexpect.EOF)
        return code, child.before
    finally:
        child.close(force=True)


def assert_cooked(stty_output: str) -> None:
    for flag in ("icanon", "echo", "isig", "icrnl", "opost"):
        assert re.search(rf"(?<![-\w]){flag}\b", stty_output), f"{flag} not restored"
        assert f"-{flag} " not in stty_output


def test_raw_mode_is_restored_after_a_normal_exit(tmp_path: Path) -> None:
    code, stty = run_child(tmp_path, "normal")
    assert code == 0
    assert_cooked(stty)


def test_raw_mode_is_restored_when_an_exception_escapes(tmp_path: Path) -> None:
    code, stty = run_child(tmp_path, "exception")
    assert code == 1
    assert_cooked(stty)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_raw_mode_is_restored_when_killed_and_the_signal_still_kills(
    tmp_path: Path, signum: int
) -> None:
    code, stty = run_child(tmp_path, "wait", signum)
    assert code == 128 + signum
    assert_cooked(stty)


def test_an_existing_signal_handler_still_runs_after_the_restore(tmp_path: Path) -> None:
    code, stty = run_child(tmp_path, "own-handler", signal.SIGTERM)
    assert code == 7
    assert_cooked(stty)


def test_raw_terminal_on_a_pipe_does_nothing() -> None:
    read_end, write_end = os.pipe()
    try:
        with RawTerminal(read_end) as terminal:
            assert not terminal.active
    finally:
        os.close(read_end)
        os.close(write_end)


def test_signal_handlers_are_put_back_on_exit() -> None:
    master, slave = os.openpty()
    before = signal.getsignal(signal.SIGTERM)
    try:
        with RawTerminal(slave) as terminal:
            assert terminal.active
            assert signal.getsignal(signal.SIGTERM) != before
        assert signal.getsignal(signal.SIGTERM) == before
        assert termios.tcgetattr(slave)[3] & termios.ICANON
    finally:
        os.close(master)
        os.close(slave)


def set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def test_window_size_is_read_from_the_terminal() -> None:
    master, slave = os.openpty()
    try:
        set_size(slave, 37, 121)
        assert read_window_size(slave) == WindowSize(37, 121)
    finally:
        os.close(master)
        os.close(slave)


def test_window_size_of_a_non_terminal_is_the_default() -> None:
    read_end, write_end = os.pipe()
    try:
        assert read_window_size(read_end) == WindowSize(24, 80)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_sigwinch_sends_the_new_size_on_the_channel() -> None:
    master, slave = os.openpty()
    set_size(slave, 24, 80)

    async def main() -> None:
        send, receive = trio.open_memory_channel[WindowSize](4)
        with trio.fail_after(EXPECT_TIMEOUT):
            async with trio.open_nursery() as nursery:
                await nursery.start(send_window_size_changes, slave, send)
                set_size(slave, 50, 200)
                os.kill(os.getpid(), signal.SIGWINCH)
                assert await receive.receive() == WindowSize(50, 200)
                # A SIGWINCH without a change is not news.
                os.kill(os.getpid(), signal.SIGWINCH)
                set_size(slave, 51, 200)
                os.kill(os.getpid(), signal.SIGWINCH)
                assert await receive.receive() == WindowSize(51, 200)
                nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    finally:
        os.close(master)
        os.close(slave)
