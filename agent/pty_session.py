"""An interactive shell on a real pseudo-terminal, driven from trio.

The shell (or a given command) runs as the leader of a new session with the PTY as its
controlling terminal, so job control, SIGWINCH on resize and terminal-generated signals behave
as under sshd. When the shell exits on its own, the kernel hangs up the terminal as it does when
a session leader exits, and what ignores that (nohup, a detached process) runs on, as after ssh;
so it does after ``hang_up`` (the operator's connection died); leaving the ``open_pty_session``
block any other way (or with ``kill_leftover_processes``)
tears the whole session down. While the shell runs the session is in utmp, and its login and
logout in wtmp (agent/login_records.py), as sshd records a login.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import signal
import stat
import struct
import subprocess
import termios
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from agent.login_records import (
    LoginEntry,
    LoginRecordFiles,
    check_login_uid,
    login_uid_applies,
    record_login,
    record_logout,
)
from agent.process_group import (
    DEFAULT_SESSION_UMASK,
    TEARDOWN_GRACE_SECONDS,
    Account,
    ExitStatus,
    OutputHandler,
    OutputPump,
    OutputStream,
    SessionLeader,
    SessionProcessError,
    child_start_options,
    close_fd,
    minimal_environment,
    session_members,
    signal_from_name,
    signal_process_group,
    start_failure,
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
# Ends of input asked for and not yet typed (one per empty DATA frame from the network): more
# than this many pending would only close programs nobody started yet, so the rest are dropped.
MAX_PENDING_ENDS_OF_INPUT = 16
# How often to look whether the foreground program is waiting for input, once input has ended
# (nothing signals when a process starts to read, so it is looked at: /proc/PID/syscall).
END_OF_INPUT_POLL_SECONDS = 0.02
# Looks in a row that must find it waiting: a program woken by input just written still shows
# the read it was blocked in for a moment.
END_OF_INPUT_QUIET_LOOKS = 2
# How a waiting system call names what it waits on, per machine (as /proc/PID/syscall numbers
# them): "fd" (read/readv: its first argument), "nfds" (select/pselect6: the read set, read
# from the program's memory), "epoll" (epoll_wait/epoll_pwait/epoll_pwait2: the epoll
# instance's fd, whose watched fds /proc/PID/fdinfo lists). poll/ppoll are not
# listed: which descriptors they wait on cannot be seen, and curl polling a socket is not
# waiting for terminal input.
_WAITING_CALLS: dict[str, dict[int, str]] = {
    "x86_64": {0: "fd", 19: "fd", 23: "nfds", 270: "nfds", 232: "epoll", 281: "epoll",
               441: "epoll"},
    "aarch64": {63: "fd", 65: "fd", 72: "nfds", 22: "epoll", 441: "epoll"},
}
_MACHINE = os.uname().machine
# A /proc/PID/syscall line names six arguments, then the stack and program pointers.
SYSCALL_ARGUMENTS = 6
# FD_SETSIZE: select() cannot watch descriptors above it.
MAX_SELECT_DESCRIPTORS = 1024
# e_ident[EI_CLASS] of a 64-bit ELF program; a 32-bit one on a 64-bit kernel uses other numbers.
_ELF_MAGIC = b"\x7fELF"
_ELF_CLASS_64 = 2
# /dev/tty: a process's own controlling terminal (for our session's processes, the PTY).
_CONTROLLING_TERMINAL_DEVICE = os.makedev(5, 0)
_EPOLL_TARGET = re.compile(r"^tfd:\s*(\d+)", re.MULTILINE)
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
    # TUCDESK_SESSION_ID and TUCDESK_OPERATOR (process_group.session_variables); TUCDESK_TTY
    # is added here, naming the PTY.
    session_variables: tuple[tuple[str, str], ...] = ()
    kill_leftover_processes: bool = False
    umask: int = DEFAULT_SESSION_UMASK
    # utmp and wtmp files for the session's login records (None: none written), and who opened
    # it (the operator's email or id), which they show as the remote host.
    login_records: LoginRecordFiles | None = None
    operator: str = ""

    def __post_init__(self) -> None:
        if not _TERM_PATTERN.fullmatch(self.term):
            raise SessionProcessError(f"TERM value {self.term!r} is not a terminal type name")
        _check_window_size(self.rows, self.cols)
        if self.command is not None and not self.command:
            raise SessionProcessError("a PTY command needs at least a program name")


class PtySession:
    """A running PTY session: stream its output, feed it input, resize it, signal it."""

    def __init__(self, leader: SessionLeader, master_fd: int, terminal_device: int) -> None:
        self._leader = leader
        self._master_fd = master_fd
        self._terminal_device = terminal_device  # st_rdev of the PTY's slave side
        self._input_lock = trio.StrictFIFOLock()
        # Ends of input asked for and not yet typed (each becomes one ^D, as each press would).
        self._ends_pending = 0
        self._end_asked = trio.Event()
        self._exit_status: ExitStatus | None = None
        # Set once run() returned: the shell exited on its own.
        self.ended_normally = False
        # Set by hang_up: the operator's connection died, and the session ends as a hang-up.
        self.hung_up = False

    @property
    def exit_status(self) -> ExitStatus | None:
        """How the shell ended, once it has."""
        return self._exit_status

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
            self._exit_status = status
            end_of_input.cancel()
            pump.child_exited()
        self.ended_normally = True
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
        program in the foreground can take it (see ``_deliver_end_of_input``)."""
        self._ends_pending = min(self._ends_pending + 1, MAX_PENDING_ENDS_OF_INPUT)
        self._end_asked.set()

    async def _deliver_end_of_input(self, scope: trio.CancelScope) -> None:
        # A ^D typed in canonical mode ahead of a reader (the shell starting, or running a
        # command) is stored as a line end that a readline shell, reading later in
        # non-canonical mode, gets as NUL: the end of input would be lost and the session would
        # never end. In non-canonical mode the byte is plain data and keeps its meaning, so it
        # is typed at once; in canonical mode, once the foreground program blocks reading the
        # terminal.
        with scope:
            while True:
                await self._end_asked.wait()
                self._end_asked = trio.Event()
                while self._ends_pending:
                    await self._wait_until_end_of_input_is_safe()
                    self._ends_pending -= 1
                    await self.send_input(END_OF_INPUT)

    async def _wait_until_end_of_input_is_safe(self) -> None:
        quiet_looks = 0
        while True:
            await trio.sleep(END_OF_INPUT_POLL_SECONDS)
            if self._input_lock.locked():
                quiet_looks = 0  # typed input goes first, whole
                continue
            if not self._terminal_is_canonical():
                return
            waiting = self._foreground_reads_terminal()
            quiet_looks = quiet_looks + 1 if waiting else 0
            if quiet_looks >= END_OF_INPUT_QUIET_LOOKS:
                return

    def _terminal_is_canonical(self) -> bool:
        try:
            local_modes = termios.tcgetattr(self._master_fd)[3]
        except termios.error:
            return False  # the terminal is gone: what is typed goes nowhere anyway
        return bool(local_modes & termios.ICANON)

    def _foreground_reads_terminal(self) -> bool:
        group = self.foreground_process_group()
        members = [group]
        for member in session_members(self._leader.pid):
            try:
                if member != group and os.getpgid(member) == group:
                    members.append(member)
            except ProcessLookupError:
                continue
        return any(reads_terminal(pid, self._terminal_device) for pid in members)

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

    def hang_up(self) -> None:
        """The operator's connection died: hang up as the kernel does when sshd closes a dead
        connection's terminal, with SIGHUP and SIGCONT to the shell (the session leader), which
        hangs up its jobs as it exits; its exit then hangs up the foreground job, and the terminal
        itself is closed on leaving ``open_pty_session``. What ignores SIGHUP (nohup) runs on,
        unless ``kill_leftover_processes``."""
        self.hung_up = True
        if self._exit_status is None:
            # Unreaped until the session is left, so the pid still names the shell.
            for signum in (signal.SIGHUP, signal.SIGCONT):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._leader.pid, signum)

    def signal(self, name: str) -> None:
        """Send an allowed signal to the foreground process group, as a key press would."""
        signal_process_group(self.foreground_process_group(), signal_from_name(name))


@asynccontextmanager
async def open_pty_session(spec: PtySessionSpec) -> AsyncIterator[PtySession]:
    """Start ``spec`` on a new PTY. On leaving the block after ``run`` returned or ``hang_up``,
    leave what the shell left (the kernel hung up its terminal; unless
    ``kill_leftover_processes``); any other
    way out hangs up and kills the whole session."""
    account = Account.lookup(spec.user)
    start_options = child_start_options(account, spec.umask, controlling_terminal=True)
    shell = spec.shell or account.login_shell
    if spec.command is not None:
        arguments, executable = list(spec.command), None
    else:
        # A leading "-" in argv[0] asks the shell to act as a login shell, as sshd does.
        arguments, executable = ["-" + os.path.basename(shell)], shell
    master_fd, slave_fd = os.openpty()
    try:
        terminal_device = os.fstat(slave_fd).st_rdev
        terminal_name = os.ttyname(slave_fd)
        _set_window_size(slave_fd, spec.rows, spec.cols)
        if account.uid != os.getuid():
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
                env={
                    **minimal_environment(account, shell, spec.term, spec.environment),
                    **dict(spec.session_variables),
                    "TUCDESK_TTY": terminal_name,
                },
                cwd=account.working_directory,
                **start_options,
            )
        except OSError as error:
            if spec.command is not None:  # an operator's command: 127 or 126, as from a shell
                raise start_failure(error, arguments[0]) from None
            raise SessionProcessError(f"cannot start {shell!r}: {error.strerror}") from None
        except subprocess.SubprocessError as error:
            program = arguments[0] if executable is None else executable
            raise SessionProcessError(f"cannot start {program!r}: {error}") from None
    except BaseException:
        os.close(master_fd)
        raise
    finally:
        # Only the child may hold the slave, or the master never sees end of file.
        os.close(slave_fd)
    os.set_blocking(master_fd, False)
    leader = SessionLeader(process)
    session = PtySession(leader, master_fd, terminal_device)
    if login_uid_applies():
        check_login_uid(process.pid, account.uid)
    # Handed to the daemon's login record writer (the session never waits for it) once the
    # shell runs (its pid is the entry's), as sshd does; the logout after teardown but before
    # the master is closed, as sshd's record_logout before pty_release: the kernel gives the
    # terminal's number to the next PTY at once, whose login must come after this logout.
    files = spec.login_records
    login = LoginEntry.for_terminal(terminal_name, account.name, spec.operator, process.pid)
    forced = True
    try:
        if files is not None:
            record_login(files, login)
        yield session
        forced = False
    finally:
        hung_up_or_ended = session.ended_normally or session.hung_up
        try:
            if hung_up_or_ended and not (forced or spec.kill_leftover_processes):
                await leader.release()
            else:
                await leader.terminate(spec.teardown_grace)
        finally:
            if files is not None:
                record_logout(files, login)
            close_fd(master_fd)


def reads_terminal(pid: int, terminal_device: int) -> bool:
    """Whether a thread of process ``pid`` is blocked waiting to read the terminal whose device
    number is ``terminal_device`` (from /proc). True when that cannot be told (another machine
    type, a 32-bit program, no /proc): the caller then does what a terminal does, at once."""
    calls = _WAITING_CALLS.get(_MACHINE)
    if calls is None or not _is_native_program(pid):
        return True
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        # No /proc at all: cannot be told. The process gone: it is not reading anything.
        return not os.path.isdir("/proc/self/task")
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/syscall") as file:
                blocked_in = parse_syscall(file.read())
        except OSError:
            continue  # the thread ended
        if blocked_in is None:
            continue
        number, arguments = blocked_in
        kind = calls.get(number)
        if kind == "fd" and _is_terminal(pid, arguments[0], terminal_device):
            return True
        if kind == "nfds" and _select_reads_terminal(pid, arguments, terminal_device):
            return True
        if kind == "epoll" and _epoll_watches_terminal(pid, arguments[0], terminal_device):
            return True
    return False


def parse_syscall(line: str) -> tuple[int, tuple[int, ...]] | None:
    """The system call number and its arguments from a /proc/PID/syscall line ("NR ARG1 …
    ARG6 SP PC"); None when the thread is not blocked in one ("running", "-1 SP PC", or
    anything unexpected)."""
    fields = line.split()
    if len(fields) < 2 + SYSCALL_ARGUMENTS:
        return None
    try:
        number = int(fields[0])
        arguments = tuple(int(field, 16) for field in fields[1:1 + SYSCALL_ARGUMENTS])
    except ValueError:
        return None
    if number < 0:
        return None
    return number, arguments


def select_read_set(nfds: int, memory: bytes) -> list[int]:
    """The descriptors in a select() read set: ``memory`` holds the fd_set's first bytes
    (bit N of byte N // 8 is descriptor N, on the little-endian machines listed)."""
    return [fd for fd in range(min(nfds, 8 * len(memory))) if memory[fd // 8] >> (fd % 8) & 1]


def epoll_targets(fdinfo: str) -> list[int]:
    """The descriptors an epoll instance watches, from its /proc/PID/fdinfo/N text."""
    return [int(target) for target in _EPOLL_TARGET.findall(fdinfo)]


def _is_terminal(pid: int, fd: int, terminal_device: int) -> bool:
    try:
        status = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return False
    return stat.S_ISCHR(status.st_mode) and status.st_rdev in (
        terminal_device, _CONTROLLING_TERMINAL_DEVICE)


def _select_reads_terminal(pid: int, arguments: tuple[int, ...], terminal_device: int) -> bool:
    nfds, read_set_address = arguments[0], arguments[1]
    if not 0 < nfds <= MAX_SELECT_DESCRIPTORS or read_set_address == 0:
        return False
    try:
        with open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
            memory.seek(read_set_address)
            read_set = memory.read((nfds + 7) // 8)
    except (OSError, OverflowError, ValueError):
        # Cannot be read: only a set of fd 0 alone can still be told from the call.
        return nfds == 1 and _is_terminal(pid, 0, terminal_device)
    return any(_is_terminal(pid, fd, terminal_device) for fd in select_read_set(nfds, read_set))


def _epoll_watches_terminal(pid: int, epoll_fd: int, terminal_device: int) -> bool:
    try:
        with open(f"/proc/{pid}/fdinfo/{epoll_fd}") as file:
            targets = epoll_targets(file.read())
    except OSError:
        return True  # cannot be told: do what a terminal does
    return any(_is_terminal(pid, target, terminal_device) for target in targets)


def _is_native_program(pid: int) -> bool:
    """Whether ``pid`` runs a 64-bit program (whose system calls /proc numbers as listed)."""
    try:
        with open(f"/proc/{pid}/exe", "rb") as file:
            header = file.read(5)
    except OSError:
        return True  # assume so: the look at its system calls decides
    return header[:4] != _ELF_MAGIC or header[4] == _ELF_CLASS_64


def _set_window_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _check_window_size(rows: int, cols: int) -> None:
    if not (1 <= rows <= MAX_WINDOW_DIMENSION and 1 <= cols <= MAX_WINDOW_DIMENSION):
        raise SessionProcessError(
            f"window size {rows}x{cols} is outside 1..{MAX_WINDOW_DIMENSION}"
        )
