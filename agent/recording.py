"""Session recordings: what an operator saw, as an asciicast v2 file bound to the audit log.

One file per session, ``<session id>.cast`` in the recordings directory (0700; files 0600):
a JSON header line, then one ``[seconds, code, data]`` line per event. Only output is recorded
("o"; an exec session's stdout and stderr both as "o", in the order the agent sent them) and
terminal resizes ("r", "COLSxROWS"); nothing the operator types is, since keystrokes include
passwords. A recording that reaches its size limit ends with an "m" (marker) event and stops;
the session goes on. The SHA-256 and size of the file's bytes go into the agent's signed
``session.ended`` audit event, so an auditor can check the file was not edited.

Events are buffered in memory and written by a worker thread in chunks, so a slow disk never
blocks the agent's event loop; at most FLUSH_THRESHOLD_BYTES plus one event wait in memory.
A write error (disk full) stops the recording, is logged once, and is marked in the audit event.

While a file is written it is held twice, so retention (agent/recording_retention.py) never
deletes it: its name is in this process's set of active recordings, and the file is flock()ed,
which a pruner in another process (``tucdesk-agent recordings prune``) sees too. The lock goes
with the descriptor, so a recording left by a crashed agent is finished, not held forever.
"""

from __future__ import annotations

import codecs
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from agent.config import DEFAULT_MAX_RECORDING_BYTES
from agent.errors import AgentError

RECORDING_SUFFIX = ".cast"
# Buffered events are handed to the writer thread once they reach this size.
FLUSH_THRESHOLD_BYTES = 256 * 1024
# Kept free below max_recording_bytes for the truncation marker, so the file never exceeds it.
MARKER_RESERVE_BYTES = 256
DEFAULT_WIDTH, DEFAULT_HEIGHT = 80, 24
MAX_HEADER_BYTES = 64 * 1024
TRUNCATED_MARKER = "tucdesk: recording stopped at max_recording_bytes"
# The session ids the rendezvous mints ("ses_" and base32); the id becomes a file name, so
# nothing that could name another directory or a hidden file is accepted.
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")

logger = logging.getLogger("tucdesk.agent.recording")


class RecordingError(AgentError):
    """A recording cannot be created or read: the message says which file and why."""


# File names of the recordings this process is writing (session ids are unique, so the name
# alone identifies one). Only the event loop changes it; pruning threads read it.
_active_recordings: set[str] = set()


def active_recording_names() -> frozenset[str]:
    """The file names of the recordings this process is writing now."""
    return frozenset(_active_recordings)


@dataclass(frozen=True)
class RecordingHooks:
    """What retention runs around each recording: ``before_create(directory)`` in the worker
    thread just before the file is created, ``after_close(path)`` on the event loop after it
    is closed. Neither may raise."""

    before_create: Callable[[Path], None]
    after_close: Callable[[Path], None]


_hooks: list[RecordingHooks] = []


@contextmanager
def recording_hooks(hooks: RecordingHooks) -> Iterator[None]:
    """Run ``hooks`` around every recording of this process while the block runs."""
    _hooks.append(hooks)
    try:
        yield
    finally:
        _hooks.remove(hooks)


def _lock_while_writing(fd: int) -> None:
    # Best effort: where flock() is unsupported the active set and the pruner's grace period
    # for recently written files still protect the file.
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        logger.debug("cannot lock a recording while it is written: %s", error.strerror)


def recording_file_name(session_id: str) -> str:
    """The file name for ``session_id``'s recording; RecordingError if the id is not safe."""
    if not _SESSION_ID.fullmatch(session_id):
        raise RecordingError(
            f"session id {session_id[:64]!r} cannot name a recording file "
            "(letters, digits, '_' and '-' only)"
        )
    return session_id + RECORDING_SUFFIX


def prepare_recordings_dir(directory: Path) -> None:
    """Create the recordings directory 0700 (tightening an existing one); refuse a symlink."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise RecordingError(f"{directory}: not a directory (a symlink is refused)")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(directory, 0o700)


@dataclass(frozen=True)
class RecordingSummary:
    """What the ``session.ended`` audit event says about a session's recording."""

    file: str
    sha256: str
    bytes: int
    truncated: bool
    failed: bool = False

    def audit_context(self) -> dict[str, Any]:
        """The ``recording`` object of the audit context."""
        return {
            "file": self.file,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "truncated": self.truncated,
            "failed": self.failed,
        }


class SessionRecorder:
    """Writes one session's asciicast file; ``close`` returns its hash and size."""

    def __init__(
        self,
        fd: int,
        path: Path,
        max_bytes: int,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._fd: int | None = fd
        self._max_bytes = max_bytes
        self._monotonic = monotonic
        self._started = monotonic()
        self._buffer = bytearray()
        self._lock = trio.Lock()
        self._hash = hashlib.sha256()
        self._written = 0
        self._accepted = 0  # bytes buffered or written: what counts against max_bytes
        self._decoders: dict[int, codecs.IncrementalDecoder] = {}
        self._stopped = False
        self.truncated = False
        self.failed = False

    @classmethod
    async def create(
        cls,
        directory: Path,
        session_id: str,
        *,
        width: int = DEFAULT_WIDTH,
        height: int = DEFAULT_HEIGHT,
        term: str | None = None,
        title: str | None = None,
        max_bytes: int = DEFAULT_MAX_RECORDING_BYTES,
        wall_clock: Callable[[], float] = time.time,
    ) -> SessionRecorder:
        """Create ``<directory>/<session id>.cast`` (0600, never over an existing file)."""
        path = directory / recording_file_name(session_id)
        header: dict[str, Any] = {
            "version": 2,
            "width": int(width),
            "height": int(height),
            "timestamp": int(wall_clock()),
        }
        if term:
            header["env"] = {"TERM": term[:64]}
        if title:
            header["title"] = title[:256]
        line = (json.dumps(header, ensure_ascii=False) + "\n").encode()

        def open_file() -> int:
            prepare_recordings_dir(directory)
            for hooks in tuple(_hooks):
                hooks.before_create(directory)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags, 0o600)
            _lock_while_writing(fd)
            return fd

        if path.name in _active_recordings:
            raise RecordingError(f"{path}: this session is already being recorded")
        # Marked active before the file exists, so no pruning can slip in before the lock.
        _active_recordings.add(path.name)
        try:
            fd = await trio.to_thread.run_sync(open_file)
        except BaseException as error:
            _active_recordings.discard(path.name)
            if not isinstance(error, OSError):
                raise
            reason = error.strerror or str(error)
            raise RecordingError(f"{path}: cannot create the recording ({reason})") from None
        recorder = cls(fd, path, max_bytes)
        recorder._append(line)
        return recorder

    async def output(self, stream: int, data: bytes) -> None:
        """Record output ``data`` from ``stream`` (split UTF-8 sequences are joined up)."""
        if self._stopped:
            return
        decoder = self._decoders.get(stream)
        if decoder is None:
            decoder = self._decoders[stream] = codecs.getincrementaldecoder("utf-8")("replace")
        text = decoder.decode(data)
        if text:
            await self._event("o", text)

    async def resize(self, cols: int, rows: int) -> None:
        """Record a terminal resize."""
        if not self._stopped:
            await self._event("r", f"{int(cols)}x{int(rows)}")

    async def close(self) -> RecordingSummary:
        """Write what is buffered, close the file and return its summary (shielded from
        cancellation: a recording cut short by shutdown still gets its hash)."""
        with trio.CancelScope(shield=True):
            if not self._stopped:
                decoders = self._decoders.values()
                pending = "".join(decoder.decode(b"", final=True) for decoder in decoders)
                if pending:
                    await self._event("o", pending)
            self._stopped = True
            await self._flush()
            fd, self._fd = self._fd, None
            if fd is not None:
                try:
                    await trio.to_thread.run_sync(_sync_and_close, fd)
                except OSError as error:
                    self._fail(error)
                _active_recordings.discard(self.path.name)
                for hooks in tuple(_hooks):
                    hooks.after_close(self.path)
        return RecordingSummary(
            self.path.name, self._hash.hexdigest(), self._written, self.truncated, self.failed
        )

    async def _event(self, code: str, data: str) -> None:
        elapsed = self._monotonic() - self._started
        line = f"[{elapsed:.6f}, {json.dumps(code)}, {json.dumps(data, ensure_ascii=False)}]\n"
        encoded = line.encode()
        if self._accepted + len(encoded) > self._max_bytes - MARKER_RESERVE_BYTES:
            marker = f"[{elapsed:.6f}, \"m\", {json.dumps(TRUNCATED_MARKER)}]\n"
            self._append(marker.encode())
            self._stopped = True
            self.truncated = True
            logger.info(
                "recording %s reached its limit of %d bytes", self.path.name, self._max_bytes
            )
        else:
            self._append(encoded)
        if len(self._buffer) >= FLUSH_THRESHOLD_BYTES:
            await self._flush()

    def _append(self, data: bytes) -> None:
        self._buffer += data
        self._accepted += len(data)

    async def _flush(self) -> None:
        # Whoever holds the lock writes everything buffered so far: chunks stay in order.
        async with self._lock:
            if not self._buffer:
                return
            chunk = bytes(self._buffer)
            self._buffer.clear()
            if self._fd is None or self.failed:
                return
            try:
                await trio.to_thread.run_sync(self._write, self._fd, chunk)
            except OSError as error:
                self._fail(error)

    def _fail(self, error: OSError) -> None:
        if not self.failed:
            logger.error(
                "recording %s failed and stopped (the session goes on): %s",
                self.path.name, error.strerror or error,
            )
        self.failed = True
        self._stopped = True

    def _write(self, fd: int, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            count = os.write(fd, view)
            self._hash.update(view[:count])
            self._written += count
            view = view[count:]


def _sync_and_close(fd: int) -> None:
    # Durable before the audit event vouches for it; a file system that cannot sync says EINVAL.
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


# ---- reading recordings (list, play, verify) ------------------------------------------------


@dataclass(frozen=True)
class RecordingInfo:
    """One recording file as ``tucdesk-agent recordings list`` shows it."""

    session_id: str
    started_at: int | None
    size: int
    truncated: bool


def read_header(path: Path) -> dict[str, Any]:
    """The asciicast v2 header of ``path``; RecordingError if it is not one."""
    try:
        with path.open("rb") as handle:
            line = handle.readline(MAX_HEADER_BYTES + 1)
    except OSError as error:
        raise RecordingError(f"{path}: cannot read ({error.strerror})") from None
    try:
        header = json.loads(line)
    except ValueError:
        raise RecordingError(f"{path}: not an asciicast file (bad header line)") from None
    if not isinstance(header, dict) or header.get("version") != 2:
        raise RecordingError(f"{path}: not an asciicast v2 file")
    return header


def list_recordings(directory: Path) -> list[RecordingInfo]:
    """Every ``*.cast`` regular file in ``directory`` (symlinks and other kinds are skipped),
    oldest first."""
    found: list[RecordingInfo] = []
    if not directory.is_dir():
        return found
    for path in directory.glob("*" + RECORDING_SUFFIX):
        try:
            # Only files the agent wrote: a symlink or a FIFO planted here is not opened.
            if not stat.S_ISREG(path.lstat().st_mode):
                continue
            header = read_header(path)
            size = path.stat().st_size
            truncated = _ends_with_truncation_marker(path)
        except (RecordingError, OSError):
            continue
        started = header.get("timestamp")
        found.append(
            RecordingInfo(
                path.name[: -len(RECORDING_SUFFIX)],
                started if isinstance(started, int) else None,
                size,
                truncated,
            )
        )
    found.sort(key=lambda info: (info.started_at or 0, info.session_id))
    return found


def _ends_with_truncation_marker(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - MARKER_RESERVE_BYTES))
        return TRUNCATED_MARKER.encode() in handle.read()


def iter_events(path: Path) -> Iterator[tuple[float, str, str]]:
    """The events of a recording after its header, as (seconds, code, data)."""
    read_header(path)
    with path.open("rb") as handle:
        handle.readline(MAX_HEADER_BYTES + 1)
        for number, line in enumerate(handle, start=2):
            try:
                when, code, data = json.loads(line)
                yield float(when), str(code), str(data)
            except (ValueError, TypeError):
                raise RecordingError(f"{path}: line {number} is not an event") from None


async def play(
    path: Path,
    write: Callable[[str], None],
    *,
    speed: float = 1.0,
    max_idle: float | None = None,
) -> None:
    """Write a recording's output with its timing (``speed`` times faster; pauses capped at
    ``max_idle`` seconds), as ``asciinema play`` does."""
    previous = 0.0
    for when, code, data in iter_events(path):
        pause = max(0.0, when - previous) / speed
        previous = when
        if max_idle is not None:
            pause = min(pause, max_idle)
        if pause:
            await trio.sleep(pause)
        if code == "o":
            write(data)
