"""A session's child process tree: how it is started, fed, read, signalled, and torn down.

Shared by PTY and exec sessions. Each child is started as the leader of a new session, so its
session id names every process it spawns (including job-control shells' background jobs, which
get process groups of their own), with every signal at its default and none blocked (sshd does
the same: an agent started under nohup must not start sessions that ignore SIGHUP), with the
session umask rather than the daemon's and, as root, the session user's audit login uid
(``child_start_options``; agent/login_records.py).

How a session ends decides what happens to what it leaves behind (docs/sessions.md, "What happens to
processes when a session ends"). When the main process exits on its own, nothing left is killed, as
after ssh: an exec session first reads its output until every holder closed it; in a PTY session the
kernel hung up the terminal when the shell (the session leader) exited, which only ends processes
that do not ignore SIGHUP (``release``). A forced end (the operator interrupts or goes away, the
rendezvous ends the session, the agent stops), or any end with ``kill_leftover_processes`` set,
sends SIGHUP then SIGKILL after a short grace to every process in the session (``terminate``),
through pidfds so a recycled pid is never signalled. A process that calls setsid() itself leaves the
session and survives even that, as it would leave an SSH session.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import re
import select
import signal
import termios
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Protocol

import trio

from agent.login_records import login_uid_applies, set_login_uid
from protocol.control import SIGNAL_NAMES
from protocol.frames import MAX_FRAME_PAYLOAD

# One chunk of output fills at most one frame: bulk output moves in as few frames as possible.
OUTPUT_CHUNK_SIZE = MAX_FRAME_PAYLOAD
# A read shorter than this means the output is trickling (an echo, a prompt): it goes on at
# once, without another read just to find that nothing more is there. Bulk output comes in
# full reads (4095 bytes from a PTY, more from a pipe) and is coalesced.
COALESCE_MIN_READ = 1024
TEARDOWN_GRACE_SECONDS = 0.5
TEARDOWN_KILL_ROUNDS = 5
TEARDOWN_KILL_WAIT_SECONDS = 2.0
# What a session's files get unless the config says otherwise (session_umask): sshd's and
# login.defs' default, not the daemon's own 0077.
DEFAULT_SESSION_UMASK = 0o022
# What a session's child that cannot drop root to the session user writes to its stderr.
SWITCH_REFUSAL_PREFIX = "tucdesk-agent: cannot switch to uid"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
FALLBACK_SHELL = "/bin/sh"
PROC_ROOT = Path("/proc")

# Signals an operator may send, by the names used in control messages (with or without "SIG").
ALLOWED_SIGNALS: Mapping[str, signal.Signals] = {
    name: signal.Signals["SIG" + name] for name in SIGNAL_NAMES
}
# Variables an operator may set, as sshd's AcceptEnv usually allows: locale, time zone, colour.
# Never anything that changes what code runs (PATH, LD_*, shell start-up files).
_PASSABLE_VARIABLE = re.compile(r"LANG|LANGUAGE|LC_[A-Z]{1,32}|TZ|COLORTERM")
MAX_PASSED_VARIABLES = 32
MAX_PASSED_VALUE_LENGTH = 1024
# What a session's own variables (TUCDESK_SESSION_ID, TUCDESK_OPERATOR) may hold: the grant's
# session id and operator email or id, printable ASCII only, so nothing from the grant can put
# a control character or a line break into a shell's environment.
_SESSION_VARIABLE_VALUE = re.compile(r"[\x21-\x7e]{1,320}")
# Signals a child cannot have reset (the kernel refuses); every other one starts at SIG_DFL.
_UNRESETTABLE_SIGNALS = frozenset({signal.SIGKILL, signal.SIGSTOP})
# Signals whose ignored disposition a child would inherit; subprocess's restore_signals already
# resets SIGPIPE and SIGXFSZ (which Python itself ignores).
_INHERITED_SIGNALS = frozenset(signal.valid_signals()) - _UNRESETTABLE_SIGNALS - {
    signal.SIGPIPE, signal.SIGXFSZ
}


class SessionProcessError(Exception):
    """A local session could not be started or was asked to do something it refuses."""


# Exit codes a shell gives a command it cannot run (POSIX): found but not executable, or not
# found. ``tucdesk exec`` passes them on as ``ssh host CMD`` does through the remote shell.
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127


class CommandNotStarted(SessionProcessError):
    """The session's command itself cannot run (missing, not executable): the operator gets the
    message on stderr and the shell's exit code, as from a shell."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def start_failure(error: OSError, program: str) -> SessionProcessError:
    """What starting ``program`` failing with ``error`` is: CommandNotStarted (127 or 126) when
    the program itself cannot run, else SessionProcessError (the working directory, dropping
    privileges: the agent's fault, not the command's)."""
    message = f"cannot run {program!r}: {error.strerror or error}"
    if error.filename != program:
        return SessionProcessError(message)
    code = EXIT_NOT_FOUND if error.errno == errno.ENOENT else EXIT_CANNOT_EXECUTE
    return CommandNotStarted(message, code)


class OutputStream(IntEnum):
    """Which of the child's outputs a chunk came from. A PTY has only STDOUT."""

    STDOUT = 1
    STDERR = 2


OutputHandler = Callable[[OutputStream, bytes], Awaitable[None]]


@dataclass(frozen=True)
class ExitStatus:
    """How the session's main process ended: an exit code, or the signal that terminated it."""

    code: int | None = None
    signal: int | None = None

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        """Decode a subprocess-style return code (negative means killed by that signal)."""
        if returncode < 0:
            return cls(signal=-returncode)
        return cls(code=returncode)

    @property
    def signal_name(self) -> str | None:
        """The terminating signal's name without the SIG prefix (``"INT"``), if any."""
        if self.signal is None:
            return None
        try:
            return signal.Signals(self.signal).name.removeprefix("SIG")
        except ValueError:
            return str(self.signal)


class LocalSession(Protocol):
    """What both session kinds offer to the code that bridges them to the network."""

    async def run(self, on_output: OutputHandler) -> ExitStatus:
        """Stream output to ``on_output`` until the session's normal end; return how the main
        process ended."""
        ...

    @property
    def exit_status(self) -> ExitStatus | None:
        """How the main process ended, once it has (also when the session is then cut short)."""
        ...

    async def send_input(self, data: bytes) -> None:
        """Write ``data`` to the child, waiting while it is not reading (backpressure)."""
        ...

    async def close_input(self) -> None:
        """Tell the child its input has ended."""
        ...

    def resize(self, rows: int, cols: int) -> None:
        """Set the terminal size (a no-op where there is no terminal)."""
        ...

    def signal(self, name: str) -> None:
        """Send an allowed signal, by name, to the child's foreground processes."""
        ...

    def hang_up(self) -> None:
        """The operator's connection died: hang the session up (SIGHUP, input closed) so that
        ``run`` returns once the main process has exited, leaving what ignores SIGHUP."""
        ...


def signal_from_name(name: str) -> signal.Signals:
    """The allowed signal called ``name`` (``"INT"`` or ``"SIGINT"``); refuse anything else."""
    key = name.upper().removeprefix("SIG") if isinstance(name, str) else ""
    try:
        return ALLOWED_SIGNALS[key]
    except KeyError:
        raise SessionProcessError(f"signal {name!r} is not one an operator may send") from None


# --- who the child runs as, and with what environment --------------------------------------


@dataclass(frozen=True)
class Account:
    """The local account a session runs as."""

    name: str
    uid: int
    gid: int
    home: str
    shell: str

    @classmethod
    def lookup(cls, user: str | None) -> Account:
        """The named account, or the agent's own account when ``user`` is None."""
        try:
            entry = pwd.getpwuid(os.getuid()) if user is None else pwd.getpwnam(user)
        except KeyError:
            raise SessionProcessError(f"no local account named {user!r}") from None
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, entry.pw_shell)

    @property
    def login_shell(self) -> str:
        """The account's shell if it is an executable file, else /bin/sh."""
        if self.shell and os.path.isabs(self.shell) and os.access(self.shell, os.X_OK):
            return self.shell
        return FALLBACK_SHELL

    @property
    def working_directory(self) -> str:
        """The home directory if it exists, else the filesystem root (as sshd does)."""
        return self.home if os.path.isdir(self.home) else "/"


def credential_options(account: Account) -> dict[str, Any]:
    """``subprocess`` options that make the child run as ``account`` (setgid, initgroups, setuid).

    Switching needs root; asking a non-root agent for another account is refused.
    """
    if account.uid == os.getuid():
        return {}
    if os.geteuid() != 0:
        raise SessionProcessError(
            f"the agent runs as uid {os.getuid()} and cannot start a session as {account.name!r}; "
            f"run it as root or drop the configured user"
        )
    return {
        "user": account.uid,
        "group": account.gid,
        "extra_groups": os.getgrouplist(account.name, account.gid),
    }


def child_start_options(
    account: Account, umask: int, *, controlling_terminal: bool = False
) -> dict[str, Any]:
    """``subprocess`` options that start a session's child as a login: its umask, signals at
    their defaults, the PTY on stdin made its controlling terminal (``controlling_terminal``),
    the session user's audit login uid (as root), then the account's groups and uid.

    The login uid must be written before root is dropped, and subprocess's own ``user`` option
    switches before any ``preexec_fn`` runs: when one is written, the child switches itself.
    Without anything to do in the child, none is run: a child without Python code in it that
    keeps the agent's uid is started with vfork. Writing the login uid makes it a fork, which
    copies the daemon's page tables: a root-as-root exec session then costs about 4-5 ms more
    of the agent's CPU (measured: 9 -> 13 ms a session; more as the daemon grows), which the
    ``audit_login_uid = false`` setting saves where no auditd reads login uids. (posix_spawn
    cannot write a login uid; a small exec helper that writes it and execs would keep vfork.)
    A child that cannot take the account's groups or uid writes why to its stderr (the
    operator's) and exits 126, as a shell does for a command it cannot run.
    """
    credentials = credential_options(account)
    reset = controlling_terminal or signals_need_reset()
    login_uid = login_uid_applies()
    options: dict[str, Any] = {"umask": umask}
    if not (reset or login_uid):
        return {**options, **credentials}
    if not login_uid:
        preexec = _child_preparation(reset, controlling_terminal, None, None)
        return {**options, **credentials, "preexec_fn": preexec}
    switch = (account.uid, account.gid, credentials["extra_groups"]) if credentials else None
    preexec = _child_preparation(reset, controlling_terminal, account.uid, switch)
    return {**options, "preexec_fn": preexec}


def _child_preparation(
    reset: bool,
    controlling_terminal: bool,
    login_uid: int | None,
    switch: tuple[int, int, list[int]] | None,
) -> Callable[[], None]:
    # Made here: the forked child of a threaded daemon should allocate as little as it can.
    refusal = f"{SWITCH_REFUSAL_PREFIX} {switch[0]}: ".encode() if switch is not None else b""

    def prepare() -> None:
        # In the child, after setsid() and umask(), before exec.
        if reset:
            reset_signals()
        if controlling_terminal:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        if login_uid is not None:
            set_login_uid(login_uid)
        if switch is not None:
            uid, gid, groups = switch
            try:
                os.setgroups(groups)
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
            except OSError as error:
                # Raised, it would reach the operator as "Exception occurred in preexec_fn."
                os.write(2, refusal + os.strerror(error.errno or errno.EPERM).encode() + b"\n")
                os._exit(EXIT_CANNOT_EXECUTE)

    return prepare


def minimal_environment(
    account: Account,
    shell: str,
    term: str | None = None,
    passed: Sequence[tuple[str, str]] = (),
) -> dict[str, str]:
    """A small sane environment (HOME, USER, LOGNAME, SHELL, PATH, TERM, LANG), not the agent's own.

    ``passed`` holds operator-sent variables; only locale, TZ and COLORTERM are accepted.
    """
    environment = {
        "HOME": account.home,
        "USER": account.name,
        "LOGNAME": account.name,
        "SHELL": shell,
        "PATH": DEFAULT_PATH,
    }
    for name in ("LANG", "LC_ALL"):
        value = os.environ.get(name)
        if value:
            environment[name] = value
    if len(passed) > MAX_PASSED_VARIABLES:
        raise SessionProcessError(f"more than {MAX_PASSED_VARIABLES} environment variables sent")
    for name, value in passed:
        if not _PASSABLE_VARIABLE.fullmatch(name):
            raise SessionProcessError(f"environment variable {name!r} may not be set remotely")
        if len(value) > MAX_PASSED_VALUE_LENGTH or "\x00" in value:
            raise SessionProcessError(f"environment variable {name!r} has an unacceptable value")
        environment[name] = value
    if term is not None:
        environment["TERM"] = term
    return environment


def session_variables(session_id: str, operator: str) -> tuple[tuple[str, str], ...]:
    """TUCDESK_SESSION_ID and TUCDESK_OPERATOR for a session's environment, as ssh sets
    SSH_CONNECTION; a value that is not plain printable text is left out, never passed on."""
    variables = (("TUCDESK_SESSION_ID", session_id), ("TUCDESK_OPERATOR", operator))
    return tuple(
        (name, value) for name, value in variables if _SESSION_VARIABLE_VALUE.fullmatch(value)
    )


def signals_need_reset() -> bool:
    """Whether this thread blocks, or the agent ignores, a signal a child would inherit across
    exec (SIGPIPE and SIGXFSZ aside: subprocess restores those). Usually not (systemd starts the
    agent clean), and then a child can be started without ``reset_signals``, which as Python
    code in the child costs a full fork instead of a vfork (about three times the start time)."""
    if signal.pthread_sigmask(signal.SIG_BLOCK, ()):
        return True
    return any(signal.getsignal(signum) is signal.SIG_IGN for signum in _INHERITED_SIGNALS)


def reset_signals() -> None:
    """In the child, before exec: every signal to its default action and none blocked.

    A child inherits ignored signals and the signal mask across exec (subprocess's
    restore_signals only restores SIGPIPE and SIGXFSZ); sshd resets them all for its sessions.
    """
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    for signum in signal.valid_signals():
        if signum not in _UNRESETTABLE_SIGNALS:
            try:
                signal.signal(signum, signal.SIG_DFL)
            except (OSError, ValueError):
                pass  # reserved by the C library (the real-time signals it uses itself)


# --- reading and writing the child's file descriptors ---------------------------------------


class OutputPump:
    """Reads one non-blocking output fd and hands chunks on, until EOF or until the child has
    exited and everything it wrote has been read (a leftover background process holding the fd
    open must not keep the session alive)."""

    def __init__(
        self, fd: int, stream: OutputStream, chunk_size: int = OUTPUT_CHUNK_SIZE
    ) -> None:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        os.set_blocking(fd, False)
        self._fd = fd
        self._stream = stream
        self._chunk_size = chunk_size
        self._child_exited = False
        # Cancelled by child_exited, but only while the pump waits for readiness: one scope per
        # run, not one per wait (a scope costs about as much as the rest of an echo's handling).
        self._wait_scope: trio.CancelScope | None = None
        self._waiting = False

    def child_exited(self) -> None:
        """Drain what is buffered, then stop instead of waiting for more."""
        self._child_exited = True
        if self._waiting and self._wait_scope is not None:
            self._wait_scope.cancel()

    async def run(self, on_output: OutputHandler) -> None:
        """Pump output until the end; see the class docstring for what the end is.

        What is already readable is coalesced into one chunk of up to ``chunk_size`` bytes (a
        PTY hands out a few KiB per read): reads repeat only while they come back full-sized
        (COALESCE_MIN_READ) and find data at once, so nothing ever waits to be joined by more
        (an echoed keystroke goes out alone, at once).

        A chunk short of ``chunk_size`` means the fd was drained when it was read, so the pump
        next waits for readiness (which also lets the other tasks run) instead of spending a
        read on EAGAIN first: a system call per echoed key, and one per PTY hand-off in bulk.
        """
        ended = False
        with trio.CancelScope() as self._wait_scope:
            ended = await self._pump(on_output, waiting=True)
        self._wait_scope = None
        if not ended:
            # The child exited while the pump waited: hand on what is left, without waiting.
            await self._pump(on_output, waiting=False)

    async def _pump(self, on_output: OutputHandler, *, waiting: bool) -> bool:
        """The pump loop; False if it stopped because the child exited while it waited (only
        when ``waiting``), True at the end of the output."""
        fd, limit = self._fd, self._chunk_size
        drained = False
        while True:
            if drained and not self._child_exited:
                if waiting and not await self._wait_readable():
                    return False
            try:
                data = os.read(fd, limit)
            except BlockingIOError:
                if self._child_exited:
                    return True
                if waiting and not await self._wait_readable():
                    return False
                drained = False
                continue
            except OSError as error:
                # EIO: every slave side of a PTY is closed, the Linux way of saying EOF.
                if error.errno == errno.EIO:
                    return True
                raise
            if not data:
                return True
            ended = False
            if COALESCE_MIN_READ <= len(data) < limit:
                data, ended = _read_available(fd, data, limit)
            await on_output(self._stream, data)
            if ended:
                return True
            drained = len(data) < limit
            if not drained:
                # A full chunk: more is likely waiting. Let other tasks run before reading it.
                await trio.lowlevel.checkpoint()

    async def _wait_readable(self) -> bool:
        """Wait until the fd is readable: True, or False once the child has exited (run's
        scope is then cancelled, and the pump must leave it before its next checkpoint)."""
        self._waiting = True
        try:
            await trio.lowlevel.wait_readable(self._fd)
        finally:
            self._waiting = False
        # Readable, but the child may have exited after the wake-up and before we ran.
        scope = self._wait_scope
        return scope is None or not scope.cancel_called


def _read_available(fd: int, first: bytes, limit: int) -> tuple[bytes, bool]:
    """``first`` plus whatever ``fd`` has ready now, up to ``limit`` bytes in all; and whether
    the output ended (EOF, or EIO from a PTY) while reading."""
    parts = [first]
    total = len(first)
    ended = False
    while total < limit:
        try:
            more = os.read(fd, limit - total)
        except BlockingIOError:
            break
        except OSError as error:
            if error.errno != errno.EIO:
                raise
            ended = True
            break
        if not more:
            ended = True
            break
        parts.append(more)
        total += len(more)
        if len(more) < COALESCE_MIN_READ:
            break  # drained: another read would only find nothing
    return (first if len(parts) == 1 else b"".join(parts)), ended


async def write_all(fd: int, data: bytes) -> bool:
    """Write all of ``data`` to non-blocking ``fd``, waiting while it is full.

    Returns False when the reading side is gone (input after that is discarded, as in SSH).
    Only a write that has to wait passes through the scheduler (a typed key goes straight
    on); a caller that loops over it must yield now and then itself.
    """
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(fd)
            continue
        except OSError as error:
            if error.errno in (errno.EPIPE, errno.EIO, errno.EBADF):
                return False
            raise
        view = view[written:]
    return True


def signal_process_group(group: int, signum: int) -> None:
    """killpg with a guard: 0 and 1 mean "our own group" and "everything" to the kernel."""
    if group <= 1:
        raise SessionProcessError(f"refusing to signal process group {group}")
    try:
        os.killpg(group, signum)
    except ProcessLookupError:
        pass


def close_fd(fd: int) -> None:
    """Close an fd trio may be waiting on, waking any waiter first."""
    trio.lowlevel.notify_closing(fd)
    os.close(fd)


# --- the main process --------------------------------------------------------------------


class SessionLeader:
    """The session's main process. Its exit is observed without reaping it, so its pid (which is
    also the session id) cannot be recycled before teardown has signalled the rest (after that,
    the kernel keeps the number for as long as any process is still in the session)."""

    def __init__(self, process: trio.Process) -> None:
        self._process = process
        self._pidfd: int | None = os.pidfd_open(process.pid)

    @property
    def pid(self) -> int:
        """The main process's pid, which is also the session and process group id."""
        return self._process.pid

    async def wait_for_exit(self) -> ExitStatus:
        """Wait until the main process has exited and say how; it stays unreaped until teardown."""
        if self._pidfd is None:
            raise SessionProcessError("the session has already been torn down")
        await trio.lowlevel.wait_readable(self._pidfd)
        # The pidfd is readable, so the process has exited: WNOHANG makes this never block.
        result = os.waitid(  # noqa: ASYNC222
            os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOWAIT | os.WNOHANG
        )
        if result is None:
            raise SessionProcessError("the session's main process vanished")
        if result.si_code == os.CLD_EXITED:
            return ExitStatus(code=result.si_status)
        return ExitStatus(signal=result.si_status)

    def signal_group(self, signum: int) -> None:
        """Send ``signum`` to the main process's process group, if it still exists."""
        signal_process_group(self.pid, signum)

    async def terminate(self, grace: float = TEARDOWN_GRACE_SECONDS) -> None:
        """Tear the whole session down, then reap the main process. Idempotent and shielded."""
        if self._pidfd is None:
            return
        with trio.CancelScope(shield=True):
            await terminate_session(self.pid, grace)
            with trio.move_on_after(TEARDOWN_KILL_WAIT_SECONDS):
                await self._process.wait()
            close_fd(self._pidfd)
            self._pidfd = None

    async def release(self) -> None:
        """The session's normal end, once the main process has exited: reap it and leave every
        other process alone. Idempotent and shielded.

        A PTY session's terminal needs no hang-up here: when the main process (the session
        leader) exited, Linux already sent SIGHUP to the terminal's foreground process group
        (SIGHUP then SIGCONT only to a process group the exit orphaned that has a stopped
        member) and took the terminal away from every other process of the session (their
        tty_nr in /proc is 0 from then on), so no process is left that it could still reach.

        A main process still running (one that ignored a hang-up) is not waited for: it is left
        to a task of the daemon that reaps it whenever it exits, so it never stays a zombie."""
        if self._pidfd is None:
            return
        with trio.CancelScope(shield=True):
            await trio.lowlevel.checkpoint()
            if self._process.poll() is None:
                trio.lowlevel.spawn_system_task(
                    _reap_when_exited, self._process, name=f"reap {self._process.pid}"
                )
            close_fd(self._pidfd)
            self._pidfd = None


async def _reap_when_exited(process: trio.Process) -> None:
    """Wait (without blocking the event loop) for a released main process to exit, and reap
    it; until the daemon stops."""
    try:
        await process.wait()
    except OSError:
        pass  # reaped elsewhere already


# --- teardown --------------------------------------------------------------------------------


def session_members(session_id: int, proc_root: Path = PROC_ROOT) -> list[int]:
    """Pids of the processes (zombies included) whose session id is ``session_id``."""
    try:
        names = [entry.name for entry in proc_root.iterdir() if entry.name.isdigit()]
    except OSError:
        return []
    return [int(name) for name in names if _session_of(int(name), proc_root) == session_id]


def _session_of(pid: int, proc_root: Path = PROC_ROOT) -> int | None:
    try:
        stat_line = (proc_root / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and parentheses; the fields follow the last ')'.
    fields = stat_line.rpartition(")")[2].split()
    return int(fields[3]) if len(fields) > 3 and fields[3].isdigit() else None


async def terminate_session(session_id: int, grace: float = TEARDOWN_GRACE_SECONDS) -> None:
    """SIGHUP (and SIGCONT) every process in the session, then SIGKILL whatever is left.

    Safe to call when everything already exited. Runs shielded: teardown must finish even
    while the caller is being cancelled.
    """
    with trio.CancelScope(shield=True):
        pidfds = _open_pidfds(session_id)
        try:
            for pidfd in pidfds.values():
                _send(pidfd, signal.SIGHUP)
                _send(pidfd, signal.SIGCONT)
            with trio.move_on_after(grace):
                for pidfd in pidfds.values():
                    await trio.lowlevel.wait_readable(pidfd)
            for _ in range(TEARDOWN_KILL_ROUNDS):
                for pid, pidfd in list(pidfds.items()):
                    if _has_exited(pidfd):
                        close_fd(pidfds.pop(pid))
                # Pick up anything forked during the grace period.
                for pid, pidfd in _open_pidfds(session_id).items():
                    if pid in pidfds:
                        os.close(pidfd)
                    else:
                        pidfds[pid] = pidfd
                live = {pid: fd for pid, fd in pidfds.items() if not _has_exited(fd)}
                if not live:
                    return
                for pidfd in live.values():
                    _send(pidfd, signal.SIGKILL)
                with trio.move_on_after(TEARDOWN_KILL_WAIT_SECONDS):
                    for pidfd in live.values():
                        await trio.lowlevel.wait_readable(pidfd)
        finally:
            for pidfd in pidfds.values():
                close_fd(pidfd)


def _open_pidfds(session_id: int) -> dict[int, int]:
    """Pidfds for the session's members, each checked again after opening: a pid that was
    recycled between the /proc scan and pidfd_open now names a process outside the session."""
    pidfds = {}
    for pid in session_members(session_id):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        if _session_of(pid) == session_id:
            pidfds[pid] = pidfd
        else:
            os.close(pidfd)
    return pidfds


def _send(pidfd: int, signum: signal.Signals) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        pass


def _has_exited(pidfd: int) -> bool:
    """A pidfd polls readable once its process has exited (even before it is reaped)."""
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))
