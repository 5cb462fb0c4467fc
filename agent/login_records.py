"""What makes a session a login on the host, as sshd makes one: the audit login uid, and utmp and
wtmp records.

The login uid (/proc/self/loginuid) is written by the session's child before it drops root and
execs, so auditd attributes what it does to the session user (the kernel also gives it a fresh
audit session id); the ``audit_login_uid`` setting turns that off. PTY sessions get a utmp
USER_PROCESS entry (``who``) and a wtmp login record (``last``) once the shell runs, and a
DEAD_PROCESS entry and a wtmp logout record when the session ends; exec sessions without a
terminal get no utmp entry, as under sshd. At start the daemon ends the entries a killed daemon
left (``end_stale_logins``).

The records are written in glibc's format and under its locks (fcntl, whole file), but not with
pututxline: utmp is world-readable, any user can hold a read lock on it, and glibc then waits
for the lock for ever in a thread (its 10 s alarm reaches the main thread). Here the lock is
tried without blocking until a deadline, in one writer thread of the daemon's own, fed by a
bounded queue: a session never waits for its records, and a lock held on the files costs at
most one deadline before later records are skipped (with one warning) until it is released.
Any failure (no utmp file, not root) is logged once per daemon and never fails a session.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from agent.status import process_exists

logger = logging.getLogger("tucdesk.agent.login_records")

# glibc's _PATH_UTMP and _PATH_WTMP.
UTMP_FILE = Path("/var/run/utmp")
WTMP_FILE = Path("/var/log/wtmp")
PROC_SELF_LOGIN_UID = Path("/proc/self/loginuid")
# What the kernel reports for a process that never logged in ((uid_t)-1).
LOGIN_UID_UNSET = 4294967295
# ut_host: who opened the session, "tucdesk:" + the operator's email or id.
HOST_PREFIX = "tucdesk:"
# glibc's struct utmpx field sizes (bits/utmpx.h).
LINE_SIZE = 32
ID_SIZE = 4
USER_SIZE = 32
HOST_SIZE = 256
# ut_type values (utmpx.h).
INIT_PROCESS = 5
LOGIN_PROCESS = 6
USER_PROCESS = 7
DEAD_PROCESS = 8
# The types whose entries glibc finds by ut_id (getutxid), as pututxline replaces them.
_PROCESS_TYPES = (INIT_PROCESS, LOGIN_PROCESS, USER_PROCESS, DEAD_PROCESS)
# How long a write waits for another process's lock on utmp or wtmp (glibc waits 10 s, or for
# ever in a thread). After one such wait the file is tried once per record, without waiting,
# until a lock is got again.
LOCK_WAIT_SECONDS = 5.0
LOCK_RETRY_SECONDS = 0.05
# Records waiting for the writer; more are skipped (a daemon starts at most a few sessions a
# second, and each makes two).
WRITE_QUEUE_SIZE = 256
# The most utmp entries read or scanned (a busy host has hundreds): the file is writable by
# group utmp, so its size is not ours to trust. A login beyond them is not recorded.
MAX_UTMP_RECORDS = 65_536
# A write taking longer than this (it should not: the lock wait is bounded) is left to finish in
# its thread, and records are skipped until it did.
WRITE_STUCK_SECONDS = 2 * LOCK_WAIT_SECONDS + 5.0


class LoginRecordError(Exception):
    """A utmp or wtmp record could not be written."""


class LoginRecordsLocked(LoginRecordError):
    """Another process held a lock on utmp or wtmp past the deadline."""


@dataclass(frozen=True)
class LoginRecordFiles:
    """Where login records go: the utmp file ``who`` reads and the wtmp file ``last`` reads."""

    utmp: Path = UTMP_FILE
    wtmp: Path = WTMP_FILE


@dataclass(frozen=True)
class LoginEntry:
    """One PTY session as utmp and wtmp show it."""

    line: str  # the terminal without /dev/, "pts/3"
    user: str
    host: str
    pid: int  # the shell's pid (also its session id)

    @classmethod
    def for_terminal(cls, terminal: str, user: str, operator: str, pid: int) -> LoginEntry:
        """The entry for a shell ``pid`` on ``terminal`` (/dev/pts/N) opened by ``operator``."""
        line = _truncated(terminal.removeprefix("/dev/"), LINE_SIZE)
        # The host keeps a NUL: util-linux reads at most HOST_SIZE - 1 bytes of it.
        host = _truncated(HOST_PREFIX + operator, HOST_SIZE - 1)
        return cls(line, _truncated(user, USER_SIZE), host, pid)

    @property
    def entry_id(self) -> bytes:
        """ut_id: the line's last four bytes, as sshd and login derive it ("ts/3" for pts/3)."""
        return self.line.encode()[-ID_SIZE:]


class _ExitStatus(ctypes.Structure):
    _fields_ = [("e_termination", ctypes.c_short), ("e_exit", ctypes.c_short)]


# ut_session and ut_tv are 32-bit on x86_64 (__WORDSIZE_TIME64_COMPAT32, so 32- and 64-bit
# programs share the file: 384 bytes a record) and native longs on aarch64 (400 bytes).
_TIME_FIELD = {"x86_64": ctypes.c_int32, "aarch64": ctypes.c_long}.get(os.uname().machine)
_RECORD_SIZE = {"x86_64": 384, "aarch64": 400}.get(os.uname().machine)


class _TimeValue(ctypes.Structure):
    _fields_ = [("tv_sec", _TIME_FIELD or ctypes.c_long), ("tv_usec", _TIME_FIELD or ctypes.c_long)]


class _Utmpx(ctypes.Structure):
    _fields_ = [
        ("ut_type", ctypes.c_short),
        ("ut_pid", ctypes.c_int32),
        ("ut_line", ctypes.c_char * LINE_SIZE),
        ("ut_id", ctypes.c_char * ID_SIZE),
        ("ut_user", ctypes.c_char * USER_SIZE),
        ("ut_host", ctypes.c_char * HOST_SIZE),
        ("ut_exit", _ExitStatus),
        ("ut_session", _TIME_FIELD or ctypes.c_long),
        ("ut_tv", _TimeValue),
        ("ut_addr_v6", ctypes.c_int32 * 4),
        ("reserved", ctypes.c_char * 20),
    ]


# One writer at a time in this process: fcntl locks do not exclude the threads of one process.
_files_lock = threading.Lock()
# Files a lock wait timed out on: tried without waiting until a lock is got again.
_locked_out: set[Path] = set()
_warned: set[str] = set()


def _check_supported() -> None:
    if _TIME_FIELD is None or ctypes.sizeof(_Utmpx) != _RECORD_SIZE:
        raise LoginRecordError(f"login records are not supported on {os.uname().machine}")


def _record(entry: LoginEntry, kind: int, now: float) -> _Utmpx:
    record = _Utmpx()
    record.ut_type = kind
    record.ut_pid = entry.pid
    record.ut_line = entry.line.encode()[:LINE_SIZE]
    record.ut_id = entry.entry_id
    if kind == USER_PROCESS:
        record.ut_user = entry.user.encode()[:USER_SIZE]
        record.ut_host = entry.host.encode()[:HOST_SIZE]
    record.ut_session = entry.pid
    record.ut_tv.tv_sec = int(now)
    record.ut_tv.tv_usec = int((now % 1) * 1_000_000)
    return record


def _lock(fd: int, path: Path, kind: int) -> None:
    """Take ``kind`` (LOCK_EX/LOCK_SH) on the whole file, as glibc does (fcntl), waiting at most
    LOCK_WAIT_SECONDS for another process to release it, and not at all after such a wait
    timed out until a lock was got again."""
    deadline = time.monotonic() + (0.0 if path in _locked_out else LOCK_WAIT_SECONDS)
    while True:
        try:
            fcntl.lockf(fd, kind | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            if time.monotonic() >= deadline:
                _locked_out.add(path)
                raise LoginRecordsLocked(
                    f"{path}: another process holds a lock on it (any local user can take a "
                    "read lock on a world-readable utmp or wtmp; see fuser or lslocks)"
                ) from None
            time.sleep(LOCK_RETRY_SECONDS)
        else:
            _locked_out.discard(path)
            return


def _find_slot(fd: int, record: _Utmpx) -> tuple[int, _Utmpx | None]:
    """The offset of the entry pututxline would replace (the first with a process type and
    ``record``'s ut_id) and that entry; else the end of the last whole record and None."""
    offset = 0
    size = ctypes.sizeof(_Utmpx)
    while True:
        if offset >= MAX_UTMP_RECORDS * size:
            raise LoginRecordError(f"more than {MAX_UTMP_RECORDS} entries: not scanned further")
        data = os.pread(fd, size, offset)
        if len(data) < size:
            return offset, None
        found = _Utmpx.from_buffer_copy(data)
        if found.ut_type in _PROCESS_TYPES and found.ut_id == record.ut_id:
            return offset, found
        offset += size


def _put_utmp(path: Path, record: _Utmpx) -> bool:
    """Replace or add ``record``'s entry in utmp; a logout leaves another process's login on the
    same terminal alone (Linux reuses pts numbers at once) and returns False."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as error:
        raise LoginRecordError(f"{path}: {error.strerror}") from None
    try:
        _lock(fd, path, fcntl.LOCK_EX)
        offset, found = _find_slot(fd, record)
        if (
            record.ut_type == DEAD_PROCESS
            and found is not None
            and found.ut_type == USER_PROCESS
            and found.ut_pid != record.ut_pid
        ):
            return False
        os.pwrite(fd, bytes(record), offset)
        return True
    except OSError as error:
        raise LoginRecordError(f"{path}: {error.strerror}") from None
    finally:
        os.close(fd)  # releases the lock


def _append_wtmp(path: Path, record: _Utmpx) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as error:
        raise LoginRecordError(f"{path}: {error.strerror}") from None
    try:
        _lock(fd, path, fcntl.LOCK_EX)
        end = os.lseek(fd, 0, os.SEEK_END)
        end -= end % ctypes.sizeof(_Utmpx)  # after a torn write, as updwtmpx does
        data = bytes(record)
        if os.pwrite(fd, data, end) != len(data):
            os.ftruncate(fd, end)
            raise LoginRecordError(f"{path}: short write")
    except OSError as error:
        raise LoginRecordError(f"{path}: {error.strerror}") from None
    finally:
        os.close(fd)


def write_records(files: LoginRecordFiles, entry: LoginEntry, kind: int, now: float) -> None:
    """Put ``entry`` (USER_PROCESS at login, DEAD_PROCESS at logout) into utmp and append it to
    wtmp; LoginRecordError names the file that refused, after trying both.

    A logout whose utmp entry another process's login has taken over (the terminal was reused)
    is written to neither file: in wtmp it would end that login for ``last``."""
    _check_supported()
    record = _record(entry, kind, now)
    problems: list[LoginRecordError] = []
    with _files_lock:
        try:
            if not _put_utmp(files.utmp, record):
                return
        except LoginRecordError as error:
            problems.append(error)
        try:
            _append_wtmp(files.wtmp, record)
        except LoginRecordError as error:
            problems.append(error)
    if problems:
        kind_of_error = (
            LoginRecordsLocked
            if any(isinstance(problem, LoginRecordsLocked) for problem in problems)
            else LoginRecordError
        )
        raise kind_of_error("; ".join(str(problem) for problem in problems))


def read_logins(path: Path) -> list[_Utmpx]:
    """The USER_PROCESS entries of the utmp file ``path`` (under a read lock)."""
    _check_supported()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as error:
        raise LoginRecordError(f"{path}: {error.strerror}") from None
    size = ctypes.sizeof(_Utmpx)
    try:
        with _files_lock:
            _lock(fd, path, fcntl.LOCK_SH)
            data = os.pread(fd, min(os.fstat(fd).st_size, MAX_UTMP_RECORDS * size), 0)
    except OSError as error:
        raise LoginRecordError(f"{path}: {error.strerror}") from None
    finally:
        os.close(fd)
    entries = (
        _Utmpx.from_buffer_copy(data, start) for start in range(0, len(data) - size + 1, size)
    )
    return [entry for entry in entries if entry.ut_type == USER_PROCESS]


def end_stale_logins(files: LoginRecordFiles, now: float) -> int:
    """Write the logout of every tucdesk login in utmp whose shell is gone (a daemon killed with
    its sessions open left them); how many."""
    ended = 0
    for found in read_logins(files.utmp):
        if not found.ut_host.startswith(HOST_PREFIX.encode()) or _is_running(found.ut_pid):
            continue
        entry = LoginEntry(
            found.ut_line.decode(errors="replace"), "", "", found.ut_pid
        )
        if found.ut_id != entry.entry_id:
            continue  # not an entry this daemon wrote
        write_records(files, entry, DEAD_PROCESS, now)
        ended += 1
    return ended


def _is_running(pid: int) -> bool:
    # A pid of 0 or less is not a shell's: not ours to end.
    return pid <= 0 or process_exists(pid)


# --- the daemon's writer ---------------------------------------------------------------------


class LoginRecordWriter:
    """Writes login records in the background, in order, one at a time, in a thread of its own
    (its own CapacityLimiter(1): a write that hangs never takes the threads getaddrinfo and
    the rest of the daemon use). Sessions hand records over and never wait for them."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Callable[[], None]](
            WRITE_QUEUE_SIZE
        )
        self._limiter = trio.CapacityLimiter(1)
        self._pending = 0
        self._idle = trio.Event()
        self._idle.set()

    def submit(self, job: Callable[[], None], what: str) -> None:
        """Queue ``job`` (a blocking write); skipped, with a warning once, if the queue is full
        (the writer skips it if an earlier write is stuck)."""
        try:
            self._send.send_nowait(job)
        except trio.WouldBlock:
            _warn_skipped(what, f"{WRITE_QUEUE_SIZE} records are already waiting")
            return
        if self._pending == 0:
            self._idle = trio.Event()
        self._pending += 1

    async def wait_written(self) -> None:
        """Return once every record handed over so far was written (or given up)."""
        await self._idle.wait()

    async def run(self) -> None:
        """Write queued records until cancelled."""
        async for job in self._receive:
            try:
                await self._write(job)
            finally:
                self._pending -= 1
                if self._pending == 0:
                    self._idle.set()

    async def _write(self, job: Callable[[], None]) -> None:
        if self._limiter.borrowed_tokens:
            _warn_skipped("a login record", "an earlier write is still stuck")
            return
        with trio.move_on_after(WRITE_STUCK_SECONDS) as waited:
            try:
                await trio.to_thread.run_sync(job, limiter=self._limiter, abandon_on_cancel=True)
            except LoginRecordsLocked as error:
                warn_once(
                    "locked",
                    "cannot write login records: %s; who and last miss tucdesk sessions until "
                    "it is released (records are skipped meanwhile; further failures are not "
                    "logged)",
                    error,
                )
            except LoginRecordError as error:
                warn_once(
                    "records",
                    "cannot write login records (%s); who and last will not show tucdesk "
                    "sessions (the agent must run as root and the files must exist); further "
                    "failures are not logged",
                    error,
                )
            except Exception:  # noqa: BLE001 - a record must never end the daemon
                logger.exception("writing login records failed")
        if waited.cancelled_caught:
            warn_once(
                "stuck",
                "writing login records took more than %gs (is the file system of utmp and "
                "wtmp hanging?); records are skipped until that write ends",
                WRITE_STUCK_SECONDS,
            )


def _warn_skipped(what: str, why: str) -> None:
    warn_once("skipped", "skipped %s: %s (further skips are not logged)", what, why)


_writer: trio.lowlevel.RunVar[LoginRecordWriter] = trio.lowlevel.RunVar("login_record_writer")


def _the_writer() -> LoginRecordWriter:
    """This trio run's writer, started as a system task (it outlives every session) the first
    time a record is handed over."""
    try:
        return _writer.get()
    except LookupError:
        writer = LoginRecordWriter()
        _writer.set(writer)
        trio.lowlevel.spawn_system_task(writer.run, name="login record writer")
        return writer


def record_login(files: LoginRecordFiles, entry: LoginEntry) -> None:
    """Queue utmp USER_PROCESS and a wtmp login for ``entry``; returns at once. A failure is
    logged once, never raised."""
    _submit(files, entry, USER_PROCESS)


def record_logout(files: LoginRecordFiles, entry: LoginEntry) -> None:
    """Queue utmp DEAD_PROCESS and a wtmp logout for ``entry``; returns at once. A failure is
    logged once, never raised."""
    _submit(files, entry, DEAD_PROCESS)


def _submit(files: LoginRecordFiles, entry: LoginEntry, kind: int) -> None:
    now = time.time()
    what = "a login record" if kind == USER_PROCESS else "a logout record"
    _the_writer().submit(functools.partial(write_records, files, entry, kind, now), what)


def end_stale_logins_in_background(files: LoginRecordFiles) -> None:
    """At daemon start: queue ``end_stale_logins`` (before any session's record); the count is
    logged once."""

    def end() -> None:
        ended = end_stale_logins(files, time.time())
        if ended:
            logger.warning(
                "ended %d login(s) in %s whose tucdesk session is gone (a previous agent was "
                "killed with sessions open)",
                ended,
                files.utmp,
            )

    _the_writer().submit(end, "ending stale logins")


async def wait_for_login_records() -> None:
    """Wait until the records handed over so far are written (at daemon exit, so that ended
    sessions leave utmp); nothing to wait for without a writer."""
    try:
        writer = _writer.get()
    except LookupError:
        return
    await writer.wait_written()


def _truncated(text: str, size: int) -> str:
    """``text`` cut to at most ``size`` UTF-8 bytes, never inside a character."""
    return text.encode()[:size].decode(errors="ignore")


def warn_once(kind: str, message: str, *arguments: object) -> None:
    """Log ``message`` at WARNING the first time a failure of ``kind`` happens in this daemon."""
    if kind in _warned:
        return
    _warned.add(kind)
    logger.warning(message, *arguments)


# --- the audit login uid --------------------------------------------------------------------


# The audit_login_uid setting (agent/config.py), set once at daemon start.
_audit_login_uid = True


def use_audit_login_uid(enabled: bool) -> None:
    """The daemon's audit_login_uid setting: whether sessions get the session user's login uid
    (off keeps a root-as-root exec session's start a vfork, about 4-5 ms of CPU less)."""
    global _audit_login_uid
    _audit_login_uid = enabled


def login_uid_applies() -> bool:
    """Whether sessions set their login uid: audit_login_uid is on, the agent runs as root and
    the kernel has one."""
    return _audit_login_uid and _login_uid_supported()


@functools.cache
def _login_uid_supported() -> bool:
    return os.geteuid() == 0 and PROC_SELF_LOGIN_UID.exists()


def set_login_uid(uid: int) -> None:
    """In the session's child, before it drops root: make ``uid`` its audit login uid.

    Errors are ignored here (the child cannot log: its stderr is the session's); the agent
    checks the result with ``check_login_uid``."""
    try:
        fd = os.open(PROC_SELF_LOGIN_UID, os.O_WRONLY)
    except OSError:
        return
    try:
        os.write(fd, str(uid).encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def check_login_uid(pid: int, uid: int) -> None:
    """Warn once if the session process ``pid`` did not get ``uid`` as its login uid."""
    if "login_uid" in _warned:
        return
    try:
        found = int(Path(f"/proc/{pid}/loginuid").read_text())
    except (OSError, ValueError):
        return  # the process is gone, or the kernel has no audit support
    if found != uid:
        warn_once(
            "login_uid",
            "could not set the audit login uid of session processes to %d (it is %d: the "
            "kernel refused the write to /proc/self/loginuid; the agent needs "
            "CAP_AUDIT_CONTROL); auditd will not attribute their actions to the session user; "
            "further failures are not logged",
            uid,
            found,
        )
