"""Signed audit events the rendezvous has not acknowledged yet, kept on disk across restarts.

The control channel (agent/control_client.py) queues each agent-signed event in memory until the
rendezvous answers ``audit_event_ack``. A daemon stopped or killed before that answer would lose
it, so each event is also written here, one file per event in ``STATE_DIR/audit-spool``, and
removed once acknowledged (or refused as never storable). A restarted daemon loads what is left
and sends it again: the rendezvous stores an agent-signed event once per team and acknowledges a
resend of one it holds, so resending is safe.

Files are written atomically (a new private temporary file, fsync, rename, fsync of the
directory), mode 0600, opened without following symbolic links or blocking on a FIFO, in a 0700
directory. The writes are synchronous, on the caller's thread: one small file per event. The
spool is bounded in count and bytes; past the bound an event stays in memory only, with a
warning. A file that does not parse back into a signed event (cut short by a power loss,
edited) is set aside as ``*.garbled`` with a warning and never sent.
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from pathlib import Path
from typing import Any

from audit.errors import AuditError
from audit.record import SignedEvent

logger = logging.getLogger("tucdesk.agent.spool")

SPOOL_DIR_NAME = "audit-spool"
MAX_SPOOLED_EVENTS = 1000
MAX_SPOOL_BYTES = 16 * 1024 * 1024
# An event's context is at most 16 KiB encoded; the signed envelope adds little.
MAX_EVENT_FILE_BYTES = 64 * 1024
EVENT_FILE_PATTERN = re.compile(r"ev-(\d{12})\.json")
GARBLED_SUFFIX = ".garbled"


class EventSpool:
    """One file per unacknowledged signed event, oldest first by its sequence number."""

    def __init__(
        self,
        directory: Path,
        *,
        max_events: int = MAX_SPOOLED_EVENTS,
        max_bytes: int = MAX_SPOOL_BYTES,
    ) -> None:
        self.directory = directory
        self.max_events = max_events
        self.max_bytes = max_bytes
        self._sizes: dict[str, int] = {}
        self._next_sequence = 1
        self._full_warned = False

    @property
    def count(self) -> int:
        """How many events the spool holds."""
        return len(self._sizes)

    @property
    def bytes(self) -> int:
        """How many bytes the spool's event files take."""
        return sum(self._sizes.values())

    def load(self) -> list[tuple[str, dict[str, Any]]]:
        """The spooled events, oldest first, as (key, ``SignedEvent.to_json()``); creates the
        directory (0700) if missing. Garbled files are set aside with a warning."""
        self._prepare_directory()
        loaded: list[tuple[int, str, dict[str, Any]]] = []
        for entry in os.scandir(self.directory):
            match = EVENT_FILE_PATTERN.fullmatch(entry.name)
            if match is None:
                if entry.name.startswith(".ev-"):
                    _unlink_quietly(Path(entry.path))  # a write cut short before its rename
                continue
            sequence = int(match.group(1))
            self._next_sequence = max(self._next_sequence, sequence + 1)
            event, problem = self._read(Path(entry.path))
            if event is None:
                self._set_aside(Path(entry.path), problem)
                continue
            loaded.append((sequence, entry.name, event))
        loaded.sort()
        for _, key, content in loaded:
            self._sizes[key] = len(json.dumps(content, separators=(",", ":")))
        return [(key, content) for _, key, content in loaded]

    def add(self, event: dict[str, Any]) -> str | None:
        """Write one event (``SignedEvent.to_json()``); its key, or None if it was not spooled
        (spool full, or the write failed: warned, the event stays in memory only)."""
        data = json.dumps(event, separators=(",", ":")).encode()
        if len(data) > MAX_EVENT_FILE_BYTES:
            logger.warning("an audit event of %d bytes is too large to spool", len(data))
            return None
        if self.count >= self.max_events or self.bytes + len(data) > self.max_bytes:
            if not self._full_warned:
                logger.warning(
                    "the audit spool %s is full (%d events, %d bytes; at most %d events, %d "
                    "bytes): new audit events are kept in memory only and are lost if the agent "
                    "stops before the rendezvous acknowledges them",
                    self.directory, self.count, self.bytes, self.max_events, self.max_bytes,
                )  # fmt: skip
                self._full_warned = True
            return None
        self._full_warned = False
        key = f"ev-{self._next_sequence:012d}.json"
        self._next_sequence += 1
        try:
            self._prepare_directory()
            _write_atomically(self.directory, key, data)
        except OSError as error:
            logger.warning(
                "cannot spool an audit event in %s (%s): it is kept in memory only",
                self.directory, error.strerror or error,
            )  # fmt: skip
            return None
        self._sizes[key] = len(data)
        return key

    def remove(self, key: str) -> None:
        """Forget one event (acknowledged, refused for good, or dropped)."""
        if self._sizes.pop(key, None) is None:
            return
        try:
            (self.directory / key).unlink()
        except FileNotFoundError:
            pass
        except OSError as error:
            logger.warning("cannot remove the spooled audit event %s: %s", key, error)

    def _prepare_directory(self) -> None:
        try:
            self.directory.mkdir(mode=0o700, exist_ok=True)
        except FileExistsError:
            pass
        info = os.lstat(self.directory)
        if not stat.S_ISDIR(info.st_mode):
            raise OSError(f"{self.directory} is not a directory")
        if info.st_mode & 0o077 and info.st_uid == os.geteuid():
            os.chmod(self.directory, 0o700)

    def _read(self, path: Path) -> tuple[dict[str, Any] | None, str]:
        try:
            # O_NONBLOCK: a FIFO planted here must not hang the daemon (S_ISREG below).
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            return None, f"cannot open it ({error.strerror or error})"
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return None, "not a regular file"
            data = handle.read(MAX_EVENT_FILE_BYTES + 1)
        if len(data) > MAX_EVENT_FILE_BYTES:
            return None, "larger than any event"
        try:
            event = json.loads(data)
            SignedEvent.from_json(event)
        except (ValueError, RecursionError, AuditError) as error:
            return None, f"not a signed audit event ({str(error)[:120]})"
        if not isinstance(event, dict):
            return None, "not a signed audit event"
        return event, ""

    def _set_aside(self, path: Path, problem: str) -> None:
        aside = path.with_name(path.name + GARBLED_SUFFIX)
        logger.warning(
            "ignoring the spooled audit event %s: %s; kept as %s, never sent",
            path, problem, aside.name,
        )  # fmt: skip
        try:
            os.replace(path, aside)
        except OSError as error:
            logger.warning("cannot set %s aside: %s", path, error)


def _write_atomically(directory: Path, name: str, data: bytes) -> None:
    temporary = directory / f".{name}.tmp"
    try:
        fd = _create_private(temporary)
    except FileExistsError:
        # Left by a write cut short (or planted): never written through, replaced.
        temporary.unlink()
        fd = _create_private(temporary)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.replace(temporary, directory / name)
    except OSError:
        _unlink_quietly(temporary)
        raise
    _sync_directory(directory)


def _create_private(path: Path) -> int:
    """A new 0600 file at ``path``, opened for writing; FileExistsError if anything is there
    (a symbolic link or FIFO included: nothing is followed or blocked on)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)  # whatever the umask
    return fd


def _sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable: without this a power loss can undo it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        return
