"""Recordings retention: delete finished recordings, oldest first, so the directory never fills
the disk (with recording on, a session whose recording cannot be created is refused).

Two limits, each optional: an age (``recordings_max_age_days``) and a total size of all
recordings (``recordings_max_total_bytes``). Pruning deletes finished recordings, oldest first,
until both hold.

Order and age come from the file's modification time, not the header's start time: it is the
time of the recording's last write, so a week-long session counts from when it ended, not from
when it began; it is read with the directory scan (no file is opened to sort); and it exists for
a file whose header is damaged or missing (cut off, or written by hand).

Only regular files named ``<session id>.cast`` are ever deleted, looked up and removed relative to
the directory opened with O_NOFOLLOW; a file is opened with O_NOFOLLOW and checked to be the very
file the scan saw before it is unlinked. Anything else in the directory is left alone and warned
about once. A recording being written is never deleted: it is in this process's active set, it
is flock()ed by its writer (which a pruner in another process sees), and a file written in the
last RECENT_WRITE_GRACE_SECONDS is skipped whatever the lock says.

Deleting a file does not touch the audit log: the signed ``session.ended`` event that carries
the recording's hash stays, and an auditor keeps the recordings they need before they age out.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from agent.config import AgentConfig
from agent.recording import (
    RECORDING_SUFFIX,
    RecordingError,
    RecordingHooks,
    active_recording_names,
    recording_file_name,
    recording_hooks,
)

# The daemon prunes at start, after each recording ends, and at least this often.
PRUNE_INTERVAL_SECONDS = 600.0
# A file written this recently is never deleted, whatever its lock says: covers the instant
# between a recording's creation and its lock, and file systems without flock().
RECENT_WRITE_GRACE_SECONDS = 60.0
SECONDS_PER_DAY = 86400.0
# Names of foreign files already warned about, per process; beyond this many, no more warnings.
MAX_WARNED_NAMES = 1000

logger = logging.getLogger("tucdesk.agent.recording")

_warned_names: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


@dataclass(frozen=True)
class RetentionLimits:
    """How long and how much to keep; None: no limit of that kind."""

    max_age_days: float | None = None
    max_total_bytes: int | None = None

    @classmethod
    def from_config(cls, config: AgentConfig) -> RetentionLimits:
        """The limits ``config`` sets."""
        return cls(config.recordings_max_age_days, config.recordings_max_total_bytes)

    @property
    def is_set(self) -> bool:
        """Whether there is anything to enforce."""
        return self.max_age_days is not None or self.max_total_bytes is not None


@dataclass(frozen=True)
class PrunedRecording:
    """One recording that pruning deleted (or, on a dry run, would delete)."""

    name: str
    size: int
    age_seconds: float


@dataclass
class PruneReport:
    """What one pass of pruning did and what it left."""

    deleted: list[PrunedRecording] = field(default_factory=list)
    kept: int = 0
    kept_bytes: int = 0
    # Recordings that the limits would delete but that are being written (or just were).
    skipped_active: int = 0

    @property
    def deleted_bytes(self) -> int:
        """The bytes the deleted recordings held."""
        return sum(item.size for item in self.deleted)


@dataclass(frozen=True)
class _Candidate:
    name: str
    size: int
    mtime: float
    device: int
    inode: int


def prune_recordings(
    directory: Path,
    limits: RetentionLimits,
    *,
    reserve_bytes: int = 0,
    dry_run: bool = False,
    now: float | None = None,
) -> PruneReport:
    """Delete finished recordings in ``directory``, oldest first, until they are all within
    ``limits`` (with ``reserve_bytes`` of the size cap kept free). Blocking: run it in a thread.

    RecordingError if the directory is a symlink or not a directory; a missing one is empty.
    """
    now = time.time() if now is None else now
    report = PruneReport()
    try:
        directory_fd = os.open(
            directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        )
    except FileNotFoundError:
        return report
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENOTDIR):
            raise RecordingError(
                f"{directory}: not a directory (a symlink is refused); nothing pruned"
            ) from None
        raise RecordingError(f"{directory}: cannot prune ({error.strerror})") from None
    try:
        try:
            candidates = _scan(directory, directory_fd)
        except OSError as error:
            raise RecordingError(f"{directory}: cannot list it ({error.strerror})") from None
        total = sum(candidate.size for candidate in candidates)
        active = active_recording_names()
        max_age = None if limits.max_age_days is None else limits.max_age_days * SECONDS_PER_DAY
        cap = None if limits.max_total_bytes is None else limits.max_total_bytes - reserve_bytes
        for candidate in sorted(candidates, key=lambda item: (item.mtime, item.name)):
            age = now - candidate.mtime
            too_old = max_age is not None and age > max_age
            over_cap = cap is not None and total > cap
            if not (too_old or over_cap):
                # Oldest first: everything after this one is newer and the cap holds.
                break
            if (
                candidate.name in active
                or age < RECENT_WRITE_GRACE_SECONDS
                or not _delete(directory, directory_fd, candidate, dry_run)
            ):
                report.skipped_active += 1
                continue
            total -= candidate.size
            report.deleted.append(PrunedRecording(candidate.name, candidate.size, age))
            if not dry_run:
                logger.info(
                    "retention deleted recording %s (%d bytes, %s old)",
                    candidate.name, candidate.size, age_in_days(age),
                )
        report.kept = len(candidates) - len(report.deleted)
        report.kept_bytes = total
        if cap is not None and total > cap and not dry_run:
            logger.warning(
                "recordings in %s hold %d bytes, over recordings_max_total_bytes, and only "
                "recordings being written remain to delete",
                directory, total + reserve_bytes,
            )
    finally:
        os.close(directory_fd)
    return report


def _scan(directory: Path, directory_fd: int) -> list[_Candidate]:
    found: list[_Candidate] = []
    with os.scandir(directory_fd) as entries:
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not (_is_recording_name(entry.name) and stat.S_ISREG(info.st_mode)):
                _warn_once(directory, entry.name)
                continue
            found.append(
                _Candidate(entry.name, info.st_size, info.st_mtime, info.st_dev, info.st_ino)
            )
    return found


def _is_recording_name(name: str) -> bool:
    if not name.endswith(RECORDING_SUFFIX):
        return False
    try:
        return recording_file_name(name[: -len(RECORDING_SUFFIX)]) == name
    except RecordingError:
        return False


def _warn_once(directory: Path, name: str) -> None:
    with _warned_lock:
        key = (str(directory), name)
        if key in _warned_names or len(_warned_names) >= MAX_WARNED_NAMES:
            return
        _warned_names.add(key)
    logger.warning(
        "%s: %r is not a recording (<session id>.cast, a regular file); retention leaves it "
        "alone", directory, name,
    )


def _delete(directory: Path, directory_fd: int, candidate: _Candidate, dry_run: bool) -> bool:
    """Unlink ``candidate`` if it is still the file the scan saw and no writer holds its lock."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(candidate.name, flags, dir_fd=directory_fd)
    except OSError:
        return False  # gone, or replaced by something that is not a regular file
    try:
        info = os.fstat(fd)
        if (info.st_dev, info.st_ino) != (candidate.device, candidate.inode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its writer holds it: the recording is still going on
        except OSError as error:
            logger.warning(
                "%s/%s: cannot tell whether it is being written (flock: %s); not deleted",
                directory, candidate.name, error.strerror,
            )
            return False
        if dry_run:
            return True
        try:
            os.unlink(candidate.name, dir_fd=directory_fd)
        except FileNotFoundError:
            return False
        except OSError as error:
            logger.warning(
                "%s/%s: cannot delete it (%s)", directory, candidate.name, error.strerror
            )
            return False
        return True
    finally:
        os.close(fd)  # releases the lock


class RecordingRetention:
    """The daemon's pruner: one pass at a time, whichever thread asks."""

    def __init__(self, directory: Path, limits: RetentionLimits, max_recording_bytes: int):
        self.directory = directory
        self.limits = limits
        self._max_recording_bytes = max_recording_bytes
        self._lock = threading.Lock()
        # At most how many bytes the recordings hold: the last pass's total plus a full
        # recording for each one being written then or started since (None: no pass yet, or
        # it failed). While it fits the cap, a new recording starts without a directory scan.
        self._bytes_bound: int | None = None

    def prune(self, reserve_bytes: int = 0) -> PruneReport | None:
        """One pass; errors are logged, never raised (retention must not stop the daemon)."""
        with self._lock:
            return self._prune_locked(reserve_bytes)

    def _prune_locked(self, reserve_bytes: int) -> PruneReport | None:
        # Read before the scan: a recording that starts during it is counted here or later.
        growing = len(active_recording_names())
        self._bytes_bound = None
        try:
            report = prune_recordings(self.directory, self.limits, reserve_bytes=reserve_bytes)
        except RecordingError as error:
            logger.warning("recordings retention: %s", error)
            return None
        except OSError as error:
            logger.warning("recordings retention in %s failed: %s", self.directory, error)
            return None
        self._bytes_bound = report.kept_bytes + growing * self._max_recording_bytes
        return report

    def before_create(self, directory: Path) -> None:
        """With a size cap, make room for a full new recording before it starts."""
        cap = self.limits.max_total_bytes
        if cap is None or directory != self.directory:
            return
        full = self._max_recording_bytes
        with self._lock:
            if self._bytes_bound is not None and self._bytes_bound + full <= cap:
                self._bytes_bound += full  # room for it, surely: no scan
            else:
                # The new recording is already active, so the pass counts it in the bound.
                self._prune_locked(reserve_bytes=full)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Prune now (then report started), after every recording ends, and every
        PRUNE_INTERVAL_SECONDS, until cancelled."""
        send, receive = trio.open_memory_channel[None](1)

        def after_close(path: Path) -> None:
            if path.parent == self.directory:
                try:
                    send.send_nowait(None)
                except trio.WouldBlock:
                    pass  # a pass is already due

        logger.info(
            "recordings retention in %s: %s", self.directory, describe_limits(self.limits)
        )
        with recording_hooks(RecordingHooks(self.before_create, after_close)):
            await trio.to_thread.run_sync(self.prune)
            task_status.started()
            while True:
                with trio.move_on_after(PRUNE_INTERVAL_SECONDS):
                    await receive.receive()
                await trio.to_thread.run_sync(self.prune)


def describe_limits(limits: RetentionLimits) -> str:
    """The limits in words, for logs and the prune command."""
    parts = []
    if limits.max_age_days is not None:
        parts.append(f"at most {limits.max_age_days:g} days old")
    if limits.max_total_bytes is not None:
        parts.append(f"at most {limits.max_total_bytes} bytes in total")
    return ", ".join(parts) if parts else "no limits (keep everything)"


def age_in_days(seconds: float) -> str:
    """An age for people: days with one decimal."""
    return f"{max(0.0, seconds) / SECONDS_PER_DAY:.1f} days"
