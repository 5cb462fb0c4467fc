"""What makes a session a login on the host, as sshd makes one: the audit login uid, and utmp and
wtmp records.

The login uid (/proc/self/loginuid) is written by the session's child before it drops root and
execs, so auditd attributes what it does to the session user (the kernel also gives it a fresh
audit session id). PTY sessions get a utmp USER_PROCESS entry (``who``) and a wtmp login record
(``last``) once the shell runs, and a DEAD_PROCESS entry and a wtmp logout record when the session
ends; exec sessions without a terminal get no utmp entry, as under sshd. The records are written
with glibc's pututxline and updwtmpx. Any failure (no utmp file, not root, no CAP_AUDIT_CONTROL) is
logged once per daemon and never fails a session.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import trio

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
USER_PROCESS = 7
DEAD_PROCESS = 8
# glibc waits up to 10 s for the utmp lock itself; past this the session goes on without its
# record (the thread finishes on its own).
LOGIN_RECORD_TIMEOUT_SECONDS = 15.0


class LoginRecordError(Exception):
    """A utmp or wtmp record could not be written."""


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
        line = terminal.removeprefix("/dev/")
        host = HOST_PREFIX + operator
        return cls(line, user, _truncated(host, HOST_SIZE), pid)

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


# glibc's utmp functions keep one open file and file name per process: one caller at a time.
_utmp_lock = threading.Lock()
_warned: set[str] = set()


@functools.cache
def _libc() -> ctypes.CDLL:
    # Cached: find_library runs ldconfig.
    if _TIME_FIELD is None or ctypes.sizeof(_Utmpx) != _RECORD_SIZE:
        raise LoginRecordError(f"login records are not supported on {os.uname().machine}")
    name = ctypes.util.find_library("c")
    if name is None:
        raise LoginRecordError("the C library was not found")
    libc = ctypes.CDLL(name, use_errno=True)
    libc.pututxline.restype = ctypes.c_void_p
    libc.pututxline.argtypes = [ctypes.POINTER(_Utmpx)]
    libc.utmpxname.argtypes = [ctypes.c_char_p]
    libc.updwtmpx.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Utmpx)]
    libc.updwtmpx.restype = None
    return libc


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


def write_records(files: LoginRecordFiles, entry: LoginEntry, kind: int, now: float) -> None:
    """Put ``entry`` (USER_PROCESS at login, DEAD_PROCESS at logout) into utmp and append it to
    wtmp; LoginRecordError names the file that refused, after trying both."""
    libc = _libc()
    record = _record(entry, kind, now)
    problems = []
    with _utmp_lock:
        # pututxline needs the file to exist already (as for sshd); updwtmpx too.
        if libc.utmpxname(os.fsencode(files.utmp)) != 0:
            problems.append(f"{files.utmp}: {os.strerror(ctypes.get_errno())}")
        else:
            ctypes.set_errno(0)
            libc.setutxent()
            written = libc.pututxline(ctypes.byref(record))
            error = ctypes.get_errno()
            libc.endutxent()
            if not written:
                problems.append(f"{files.utmp}: {os.strerror(error or 5)}")
        if not os.access(files.wtmp, os.W_OK):
            # updwtmpx says nothing when it fails.
            problems.append(f"{files.wtmp}: {_access_problem(files.wtmp)}")
        else:
            libc.updwtmpx(os.fsencode(files.wtmp), ctypes.byref(record))
    if problems:
        raise LoginRecordError("; ".join(problems))


async def record_login(files: LoginRecordFiles, entry: LoginEntry) -> None:
    """utmp USER_PROCESS and a wtmp login for ``entry``; a failure is logged once, never raised."""
    await _write_in_thread(files, entry, USER_PROCESS)


async def record_logout(files: LoginRecordFiles, entry: LoginEntry) -> None:
    """utmp DEAD_PROCESS and a wtmp logout for ``entry``; a failure is logged once, never raised."""
    await _write_in_thread(files, entry, DEAD_PROCESS)


async def _write_in_thread(files: LoginRecordFiles, entry: LoginEntry, kind: int) -> None:
    with trio.move_on_after(LOGIN_RECORD_TIMEOUT_SECONDS) as waited:
        try:
            await trio.to_thread.run_sync(
                write_records, files, entry, kind, time.time(), abandon_on_cancel=True
            )
        except LoginRecordError as error:
            warn_once(
                "records",
                "cannot write login records (%s); who and last will not show tucdesk sessions "
                "(the agent must run as root and the files must exist); further failures are "
                "not logged",
                error,
            )
    if waited.cancelled_caught:
        warn_once("records", "writing login records took more than %gs; going on without",
                  LOGIN_RECORD_TIMEOUT_SECONDS)


def _access_problem(path: Path) -> str:
    if not path.exists():
        return "No such file or directory"
    return "Permission denied"


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


@functools.cache
def login_uid_applies() -> bool:
    """Whether sessions set their login uid: the agent runs as root and the kernel has one."""
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
