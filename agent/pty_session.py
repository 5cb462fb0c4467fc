"""An interactive shell on a real pseudo-terminal, driven from trio.

The shell (or a given command) runs as the leader of a new session with the PTY as its
controlling terminal, so job control, SIGWINCH on resize and terminal-generated signals behave
as under sshd. Leaving the ``open_pty_session`` block by any path tears the session down.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import re
import struct
import subprocess
import termios
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from agent.process_group import (
    TEARDOWN_GRACE_SECONDS,
    Account,
    ExitStatus,
    OutputHandler,
    OutputPump,
    OutputStream,
    SessionLeader,
    SessionProcessError,
    close_fd,
    credential_options,
    minimal_environment,
    session_members,
    signal_from_name,
    signal_process_group,
    write_all,
)
from relay.client import acquire_at_once

DEFAULT_TERM = "xterm-256color"
DEFAULT_ROWS = 24
DEFAULT_COLS = 80
MAX_WINDOW_DIMENSION = 10_000
TTY_GROUP_MODE = 0o620
# A write failing with these means the terminal's reading side is gone.
GONE_READER_ERRORS = (errno.EPIPE, errno.EIO, errno.EBADF)
# What a terminal sends for "end of input" in canonical mode (VEOF, ^D by default).
END_OF_INPUT = b"\x04"
# How often to look whether the foreground program is waiting for input, once input has ended
# (nothing signals when a process starts to read, so it is looked at: /proc/PID/syscall).
END_OF_INPUT_POLL_SECONDS = 0.02
# Looks in a row that must find it waiting: a program woken by input just written still shows
# the read it was blocked in for a moment.
END_OF_INPUT_QUIET_LOOKS = 2
# System calls a program waiting for terminal input blocks in, per machine (as /proc/PID/syscall
# numbers them): read/readv of fd 0, select/pselect6 of fds < 1 (fd 0 alone), poll/ppoll.
_WAITING_FOR_INPUT_CALLS: dict[str, dict[int, str]] = {
    "x86_64": {0: "fd", 19: "fd", 23: "nfds", 270: "nfds", 7: "any", 271: "any"},
    "aarch64": {63: "fd", 65: "fd", 72: "nfds", 73: "any"},
}
_TERM_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")


@dataclass(frozen=True)
class PtySessionSpec:
    """What to run on the PTY, as whom, and how the operator's terminal looks."""

    term: str = DEFAULT_TERM
    rows: int = DEFAULT_ROWS
    cols: int = DEFAULT_COLS
    user: str | None = None
    shell: str | None = None
    command: Sequence[str] | None = None
    environment: tuple[tuple[str, str], ...] = ()
    teardown_grace: float = TEARDOWN_GRACE_SECONDS

    def __post_init__(self) -> None:
        if not _TERM_PATTERN.fullmatch(self.term):
            raise SessionProcessError(f"TERM value {self.term!r} is not a terminal type name")
        _check_window_size(self.rows, self.cols)
        if self.command is not None and not self.command:
            raise SessionProcessError("a PTY command needs at least a program name")


class PtySession:
    """A running PTY session: stream its output, feed it input, resize it, signal it."""

    def __init__(self, leader: SessionLeader, master_fd: int) -> None:
        self._leader = leader
        self._master_fd = master_fd
        self._input_lock = trio.StrictFIFOLock()
        # One item per end of input asked for (each becomes one ^D, as each press of ^D would).
        self._ends_asked, self._ends_to_type = trio.open_memory_channel[None](math.inf)

    @property
    def pid(self) -> int:
        """The pid of the shell (also its session id)."""
        return self._leader.pid

    async def run(self, on_output: OutputHandler) -> ExitStatus:
        """Stream terminal output (as STDOUT) until the shell exits; return how it ended."""
        pump = OutputPump(self._master_fd, OutputStream.STDOUT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run, on_output)
            end_of_input = trio.CancelScope()
            nursery.start_soon(self._deliver_end_of_input, end_of_input)
            status = await self._leader.wait_for_exit()
            end_of_input.cancel()
            pump.child_exited()
        return status

    async def send_input(self, data: bytes) -> None:
        """Type ``data`` into the terminal, waiting while its input buffer is full."""
        lock = self._input_lock
        if not lock.locked():
            # A keystroke: one write that the terminal takes whole needs no turn (it cannot be
            # interleaved with anything, as it never yields).
            try:
                written = os.write(self._master_fd, data)
            except BlockingIOError:
                written = 0
            except OSError as error:
                if error.errno in GONE_READER_ERRORS:
                    return  # the terminal is gone: input is discarded, as write_all does
                raise
            if written == len(data):
                return
            data = data[written:]
        await acquire_at_once(lock)
        try:
            await write_all(self._master_fd, data)
        finally:
            lock.release()

    async def close_input(self) -> None:
        """End the input the way a terminal does: the end-of-file character (^D), typed once the
        program in the foreground waits for input (see ``_deliver_end_of_input``)."""
        self._ends_asked.send_nowait(None)

    async def _deliver_end_of_input(self, scope: trio.CancelScope) -> None:
        # A ^D typed ahead, while the line discipline is still canonical (the shell starting,
        # or running a command), is stored as a line end that a readline shell, reading in
        # non-canonical mode, then gets as NUL: the end of input would be lost and the session
        # would never end. So it is typed only when the foreground program waits for input.
        with scope:
            async for _ in self._ends_to_type:
                quiet_looks = 0
                while quiet_looks < END_OF_INPUT_QUIET_LOOKS:
                    await trio.sleep(END_OF_INPUT_POLL_SECONDS)
                    waiting = (waiting_for_input(self.foreground_process_group())
                               and not self._input_lock.locked())
                    quiet_looks = quiet_looks + 1 if waiting else 0
                await self.send_input(END_OF_INPUT)

    def resize(self, rows: int, cols: int) -> None:
        """Set the window size; the kernel sends SIGWINCH to the foreground process group."""
        _check_window_size(rows, cols)
        _set_window_size(self._master_fd, rows, cols)

    def window_size(self) -> tuple[int, int]:
        """The terminal's current (rows, cols)."""
        packed = fcntl.ioctl(self._master_fd, termios.TIOCGWINSZ, b"\x00" * 8)
        rows, cols, _, _ = struct.unpack("HHHH", packed)
        return rows, cols

    def foreground_process_group(self) -> int:
        """The process group that owns the terminal (the shell, or the job it runs).

        Falls back to the shell's own group when the terminal names none, or names one that
        has no member left in this session (the kernel then reports 0, which must never reach
        killpg: there it means the agent's own group).
        """
        try:
            group = os.tcgetpgrp(self._master_fd)
        except OSError:
            return self._leader.pid
        if group > 1 and group != self._leader.pid:
            for member in session_members(self._leader.pid):
                try:
                    if os.getpgid(member) == group:
                        return group
                except ProcessLookupError:
                    continue
        return self._leader.pid

    def signal(self, name: str) -> None:
        """Send an allowed signal to the foreground process group, as a key press would."""
        signal_process_group(self.foreground_process_group(), signal_from_name(name))


@asynccontextmanager
async def open_pty_session(spec: PtySessionSpec) -> AsyncIterator[PtySession]:
    """Start ``spec`` on a new PTY; on leaving the block, hang up and kill its whole session."""
    account = Account.lookup(spec.user)
    credentials = credential_options(account)
    shell = spec.shell or account.login_shell
    if spec.command is not None:
        arguments, executable = list(spec.command), None
    else:
        # A leading "-" in argv[0] asks the shell to act as a login shell, as sshd does.
        arguments, executable = ["-" + os.path.basename(shell)], shell
    master_fd, slave_fd = os.openpty()
    try:
        _set_window_size(slave_fd, spec.rows, spec.cols)
        if credentials:
            os.fchown(slave_fd, account.uid, -1)
            os.fchmod(slave_fd, TTY_GROUP_MODE)
        try:
            process = await trio.lowlevel.open_process(
                arguments,
                executable=executable,
                stdin=slave_fd,
                stdout=slave_fd,
                stderr=slave_fd,
                start_new_session=True,
                preexec_fn=_take_controlling_terminal,
                env=minimal_environment(account, shell, spec.term, spec.environment),
                cwd=account.working_directory,
                **credentials,
            )
        except (OSError, subprocess.SubprocessError) as error:
            program = arguments[0] if executable is None else executable
            reason = error.strerror if isinstance(error, OSError) else str(error)
            raise SessionProcessError(f"cannot start {program!r}: {reason}") from None
    except BaseException:
        os.close(master_fd)
        raise
    finally:
        # Only the child may hold the slave, or the master never sees end of file.
        os.close(slave_fd)
    os.set_blocking(master_fd, False)
    leader = SessionLeader(process)
    try:
        yield PtySession(leader, master_fd)
    finally:
        await leader.terminate(spec.teardown_grace)
        close_fd(master_fd)


def waiting_for_input(pid: int) -> bool:
    """Whether process ``pid`` is blocked waiting to read its standard input (from
    /proc/PID/syscall). True when that cannot be told (another machine type, no /proc): the
    caller then does what a terminal does, at once."""
    calls = _WAITING_FOR_INPUT_CALLS.get(os.uname().machine)
    try:
        with open(f"/proc/{pid}/syscall") as file:
            fields = file.read().split()
    except OSError:
        return True
    if calls is None or not fields:
        return True
    try:
        number, first_argument = int(fields[0]), int(fields[1], 16)
    except (ValueError, IndexError):
        return False  # "running" or "-1 …": not blocked in a system call
    kind = calls.get(number)
    if kind == "fd":
        return first_argument == 0
    if kind == "nfds":
        return first_argument == 1
    return kind == "any"


def _take_controlling_terminal() -> None:
    """In the child, after setsid(): make the PTY on stdin the controlling terminal."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _set_window_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _check_window_size(rows: int, cols: int) -> None:
    if not (1 <= rows <= MAX_WINDOW_DIMENSION and 1 <= cols <= MAX_WINDOW_DIMENSION):
        raise SessionProcessError(
            f"window size {rows}x{cols} is outside 1..{MAX_WINDOW_DIMENSION}"
        )
