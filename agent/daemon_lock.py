"""One agent process per state dir: an exclusive flock on ``STATE_DIR/agent.lock``.

``run`` holds the lock for the daemon's life, so a second ``run`` on the same dir refuses
instead of taking over the control connection, and ``enroll`` holds it while it replaces the
state, so it cannot race a daemon that would write its old identity back. The kernel drops a
flock when its holder dies, so a crash or a kill -9 never leaves a stale lock; the pid written
in the file is only there to name the holder in the refusal.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path
from types import TracebackType

from agent.errors import AgentError

LOCK_FILE_NAME = "agent.lock"
LOCK_FILE_MODE = 0o600
MAX_LOCK_FILE_SIZE = 64


class DaemonLockError(AgentError):
    """Another agent process holds the state dir, or the lock file cannot be used."""


class DaemonLock:
    """The held lock on a state dir; release it with ``release`` or by leaving a ``with``."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    def release(self) -> None:
        """Drop the lock (closing the file releases the flock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> DaemonLock:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def lock_file_path(state_dir: Path) -> Path:
    """The lock file of a state dir."""
    return Path(state_dir) / LOCK_FILE_NAME


def acquire_daemon_lock(state_dir: Path, refusal_advice: str = "") -> DaemonLock:
    """Take the state dir's lock without waiting; DaemonLockError naming the holder if taken.

    ``refusal_advice`` is appended to the refusal (e.g. what to stop first). The lock file is
    opened without following a symlink and must be a regular file owned by this user.
    """
    path = lock_file_path(state_dir)
    try:
        fd = os.open(
            path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, LOCK_FILE_MODE
        )
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise DaemonLockError(f"{path}: is a symbolic link; remove it") from None
        raise DaemonLockError(f"{path}: cannot open the lock file ({error.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise DaemonLockError(f"{path}: not a regular file; remove it")
        if info.st_uid != os.geteuid():
            raise DaemonLockError(f"{path}: owned by uid {info.st_uid}, not by this user")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            raise DaemonLockError(
                f"another tucdesk-agent{f' (pid {holder})' if holder else ''} is running with "
                f"{state_dir}{'; ' + refusal_advice if refusal_advice else ''}"
            ) from None
        if stat.S_IMODE(info.st_mode) != LOCK_FILE_MODE:
            os.fchmod(fd, LOCK_FILE_MODE)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return DaemonLock(path, fd)


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, MAX_LOCK_FILE_SIZE, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None
