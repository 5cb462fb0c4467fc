"""Session recordings: what an operator saw, as an asciicast v2 file bound to the audit log.

One file per session, ``<session id>.cast`` in the recordings directory (0700; a file is 0600
while the agent writes it and 0400 once it is finished): a JSON header line, then one
``[seconds, code, data]`` line per event. Only output is recorded ("o"; an exec session's stdout
and stderr both as "o", in the order the agent sent them) and terminal resizes ("r",
"COLSxROWS"); nothing the operator types is, since keystrokes include passwords.

How a recording ends is written in it, as "m" (marker) events whose text starts "tucdesk:":

* ``END_MARKER`` is its last line when its session ended and the agent closed it: complete.
* ``TRUNCATED_MARKER`` follows the part of the output that fit in max_recording_bytes; nothing
  more is recorded (the session goes on), and the end marker follows at close.
* ``INTERRUPTED_MARKER`` is appended at the agent's next start to a recording it never finished
  (the agent was killed or the host went down): see ``find_interrupted_recordings``.
A header carries ``"tucdesk": {"end_marker": true}`` when its writer ends it so; a file without
it (written before end markers) is never marked interrupted. The SHA-256 and size of the file's
bytes go into the agent's signed ``session.ended`` audit event, so an auditor can check the file
was not edited.

The header is written when the file is created: a recording that cannot be written (disk full)
refuses its session. Events are buffered in memory and written by a worker thread, so a slow
disk never blocks the agent's event loop: when FLUSH_THRESHOLD_BYTES are waiting, and at most
FLUSH_INTERVAL_SECONDS after an event (``flush_periodically``), so a killed agent loses at most
that last second. Nothing is fsync()ed before close: a killed process loses nothing the kernel
already holds; a power cut may lose the last seconds. A write error (disk full) fails the
recording at once: it is logged, ``RecordingFailed`` is raised to the session, which the agent
then ends (with recording on, no session runs unrecorded), and the audit event says so.

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
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO

import trio

from agent.config import DEFAULT_MAX_RECORDING_BYTES
from agent.errors import AgentError

RECORDING_SUFFIX = ".cast"
# Buffered events are handed to the writer thread once they reach this size...
FLUSH_THRESHOLD_BYTES = 256 * 1024
# ... and at most this long after the first of them was buffered (flush_periodically).
FLUSH_INTERVAL_SECONDS = 1.0
# Kept free below max_recording_bytes for the end markers (the truncation marker, then the end
# or interrupted marker), so the file never exceeds it.
MARKER_RESERVE_BYTES = 512
DEFAULT_WIDTH, DEFAULT_HEIGHT = 80, 24
MAX_HEADER_BYTES = 64 * 1024
# A file being written is 0600; the agent makes it 0400 when it finishes it (read-only: done).
WRITING_MODE, FINISHED_MODE = 0o600, 0o400
TRUNCATED_MARKER = "tucdesk: recording stopped at max_recording_bytes"
END_MARKER = "tucdesk: recording ended"
INTERRUPTED_MARKER = "tucdesk: recording interrupted: the agent stopped before the session ended"
# The header key saying the writer ends the file with an end marker.
FORMAT_KEY = "tucdesk"
FORMAT_VALUE = {"end_marker": True}
# How far from its end ``list_recordings`` looks for the markers, at most.
MAX_TAIL_BYTES = 4 * 1024 * 1024
# The session ids the rendezvous mints ("ses_" and base32); the id becomes a file name, so
# nothing that could name another directory or a hidden file is accepted.
_SESSION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")

logger = logging.getLogger("tucdesk.agent.recording")


class RecordingError(AgentError):
    """A recording cannot be created or read: the message says which file and why."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        # Why, without the file's path: what the operator of a refused session is told.
        self.reason = reason or message


class RecordingFailed(RecordingError):
    """A recording could not be written on (disk full): the session it records must end."""


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
        *,
        written: bytes = b"",
    ) -> None:
        self.path = path
        self._fd: int | None = fd
        self._max_bytes = max_bytes
        self._monotonic = monotonic
        self._started = monotonic()
        self._buffer = bytearray()
        self._lock = trio.Lock()
        self._hash = hashlib.sha256(written)
        self._written = len(written)
        self._accepted = len(written)  # bytes buffered or written: what counts against max_bytes
        self._decoders: dict[int, codecs.IncrementalDecoder] = {}
        # Set when the buffer stops being empty; flush_periodically waits for it.
        self._pending = trio.Event()
        self._pending_since = 0.0
        self._stopped = False
        self._closed = False
        self.truncated = False
        self.failed = False
        self.failure: str | None = None

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
        """Create ``<directory>/<session id>.cast`` (0600, never over an existing file) and
        write its header; RecordingError (and no file) if that cannot be done."""
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
        header[FORMAT_KEY] = FORMAT_VALUE
        line = (json.dumps(header, ensure_ascii=False) + "\n").encode()

        def open_file() -> int:
            prepare_recordings_dir(directory)
            for hooks in tuple(_hooks):
                hooks.before_create(directory)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags, WRITING_MODE)
            try:
                _lock_while_writing(fd)
                _write_all(fd, line)
            except OSError:
                # A recording without its header is no recording: leave no empty file behind.
                os.close(fd)
                with suppress(OSError):
                    os.unlink(path)
                raise
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
            raise RecordingError(
                f"{path}: cannot create the recording ({reason})", reason
            ) from None
        return cls(fd, path, max_bytes, written=line)

    async def output(self, stream: int, data: bytes) -> None:
        """Record output ``data`` from ``stream`` (split UTF-8 sequences are joined up).

        RecordingFailed if the recording can no longer be written."""
        if self._stopped:
            if self.failed:
                raise RecordingFailed(self._failure_message())
            return
        decoder = self._decoders.get(stream)
        if decoder is None:
            decoder = self._decoders[stream] = codecs.getincrementaldecoder("utf-8")("replace")
        text = decoder.decode(data)
        if text:
            await self._event("o", text)

    async def resize(self, cols: int, rows: int) -> None:
        """Record a terminal resize; RecordingFailed if the recording can no longer be written."""
        if not self._stopped:
            await self._event("r", f"{int(cols)}x{int(rows)}")
        elif self.failed:
            raise RecordingFailed(self._failure_message())

    async def flush_periodically(self) -> None:
        """Write buffered events at most FLUSH_INTERVAL_SECONDS after they arrive, until
        cancelled or closed; RecordingFailed when a write fails. Run it beside the session."""
        while not self._closed:
            await self._pending.wait()
            due = self._pending_since + FLUSH_INTERVAL_SECONDS - self._monotonic()
            if due > 0:
                await trio.sleep(due)
            if self._buffer:
                await self._flush()
            else:
                self._pending = trio.Event()  # emptied meanwhile by a threshold flush
            if self.failed:
                raise RecordingFailed(self._failure_message())

    async def close(self) -> RecordingSummary:
        """Write what is buffered and the end marker, make the file read-only, close it and
        return its summary (shielded from cancellation: a recording cut short by shutdown
        still gets its hash)."""
        with trio.CancelScope(shield=True):
            if not self._stopped:
                decoders = self._decoders.values()
                pending = "".join(decoder.decode(b"", final=True) for decoder in decoders)
                if pending:
                    await self._event("o", pending)
            if not self.failed:
                self._append(self._marker_line(END_MARKER))
            self._stopped = True
            await self._flush()
            fd, self._fd = self._fd, None
            self._closed = True
            self._pending.set()  # lets a waiting flush_periodically see it is closed
            if fd is not None:
                try:
                    await trio.to_thread.run_sync(_finish_and_close, fd)
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
            self._stop_at_limit(elapsed, code, data)
        else:
            self._append(encoded)
        if len(self._buffer) >= FLUSH_THRESHOLD_BYTES:
            await self._flush()
            if self.failed:
                raise RecordingFailed(self._failure_message())

    def _stop_at_limit(self, elapsed: float, code: str, data: str) -> None:
        """Record the part of the output that fits, then the truncation marker, and stop."""
        if code == "o":
            room = self._max_bytes - MARKER_RESERVE_BYTES - self._accepted

            def line(count: int) -> bytes:
                text = json.dumps(data[:count], ensure_ascii=False)
                return f"[{elapsed:.6f}, \"o\", {text}]\n".encode()

            # The longest prefix whose line fits: escapes make a line's size uneven in the
            # characters, but it only grows with them, so a binary search finds it.
            low, high = 0, len(data)
            while low < high:
                middle = (low + high + 1) // 2
                if len(line(middle)) <= room:
                    low = middle
                else:
                    high = middle - 1
            if low:
                self._append(line(low))
        self._append(self._marker_line(TRUNCATED_MARKER, elapsed))
        self._stopped = True
        self.truncated = True
        logger.info(
            "recording %s reached its limit of %d bytes", self.path.name, self._max_bytes
        )

    def _marker_line(self, text: str, elapsed: float | None = None) -> bytes:
        if elapsed is None:
            elapsed = self._monotonic() - self._started
        return f"[{elapsed:.6f}, \"m\", {json.dumps(text)}]\n".encode()

    def _append(self, data: bytes) -> None:
        if not self._buffer:
            self._pending_since = self._monotonic()
            self._pending.set()
        self._buffer += data
        self._accepted += len(data)

    async def _flush(self) -> None:
        # Whoever holds the lock writes everything buffered so far: chunks stay in order.
        async with self._lock:
            if not self._buffer:
                return
            chunk = bytes(self._buffer)
            self._buffer.clear()
            self._pending = trio.Event()
            if self._fd is None or self.failed:
                return
            try:
                await trio.to_thread.run_sync(self._write, self._fd, chunk)
            except OSError as error:
                self._fail(error)

    def _fail(self, error: OSError) -> None:
        if not self.failed:
            self.failure = error.strerror or str(error)
            logger.error(
                "recording %s failed at byte %d and stopped: %s; its session is ended",
                self.path.name, self._written, self.failure,
            )
        self.failed = True
        self._stopped = True

    def _failure_message(self) -> str:
        return f"the recording can no longer be written ({self.failure or 'write error'})"

    def _write(self, fd: int, chunk: bytes) -> None:
        view = memoryview(chunk)
        while view:
            count = os.write(fd, view)
            self._hash.update(view[:count])
            self._written += count
            view = view[count:]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _finish_and_close(fd: int) -> None:
    # Read-only says the agent finished it (an interrupted recording stays 0600); durable
    # before the audit event vouches for it. A file system that cannot sync says EINVAL.
    try:
        os.fchmod(fd, FINISHED_MODE)
        try:
            os.fsync(fd)
        except OSError as error:
            if error.errno != errno.EINVAL:
                raise
    finally:
        os.close(fd)


# ---- reading recordings (list, play, verify, recover) ----------------------------------------


class RecordingState(StrEnum):
    """How a recording ended, as ``tucdesk-agent recordings list`` shows it."""

    COMPLETE = "complete"
    """Its session ended and the agent closed it (or, written before end markers, it parses)."""
    TRUNCATED = "truncated"
    """It stopped at max_recording_bytes (the session went on) and was then closed."""
    INTERRUPTED = "interrupted"
    """The agent stopped (killed, host down) before the session ended."""
    DAMAGED = "damaged"
    """Cut off or unreadable: a write error (disk full), or edited; ``detail`` says where."""
    RECORDING = "recording"
    """Being written now."""


@dataclass(frozen=True)
class RecordingInfo:
    """One recording file as ``tucdesk-agent recordings list`` shows it."""

    session_id: str
    started_at: int | None
    size: int
    state: RecordingState
    truncated: bool = False
    detail: str = ""


def read_header(path: Path) -> dict[str, Any]:
    """The asciicast v2 header of ``path``; RecordingError if it is not one."""
    try:
        with path.open("rb") as handle:
            line = handle.readline(MAX_HEADER_BYTES + 1)
    except OSError as error:
        raise RecordingError(f"{path}: cannot read ({error.strerror})") from None
    return _parse_header(path, line)


def _parse_header(path: Path, line: bytes) -> dict[str, Any]:
    try:
        header = json.loads(line)
    except ValueError:
        raise RecordingError(f"{path}: not an asciicast file (bad header line)") from None
    if not isinstance(header, dict) or header.get("version") != 2:
        raise RecordingError(f"{path}: not an asciicast v2 file")
    return header


def list_recordings(directory: Path) -> list[RecordingInfo]:
    """Every ``*.cast`` regular file in ``directory`` (symlinks and other kinds are skipped),
    with its state, oldest first."""
    found: list[RecordingInfo] = []
    if not directory.is_dir():
        return found
    for path in directory.glob("*" + RECORDING_SUFFIX):
        try:
            # Only files the agent wrote: a symlink or a FIFO planted here is not opened.
            if not stat.S_ISREG(path.lstat().st_mode):
                continue
            found.append(inspect_recording(path))
        except OSError:
            continue
    found.sort(key=lambda info: (info.started_at or 0, info.session_id))
    return found


def inspect_recording(path: Path) -> RecordingInfo:
    """``path``'s start time, size and state, from its header and its last lines."""
    session_id = path.name.removesuffix(RECORDING_SUFFIX)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    with os.fdopen(os.open(path, flags), "rb") as handle:
        info = os.fstat(handle.fileno())
        size = info.st_size

        def damaged(detail: str, started: int | None = None) -> RecordingInfo:
            return RecordingInfo(session_id, started, size, RecordingState.DAMAGED, False, detail)

        if not size:
            return damaged("empty: not even a header")
        header_line = handle.readline(MAX_HEADER_BYTES + 1)
        try:
            header = _parse_header(path, header_line)
        except RecordingError:
            return damaged("no asciicast v2 header")
        timestamp = header.get("timestamp")
        started = timestamp if type(timestamp) is int else None
        if path.name in _active_recordings or _locked_by_writer(handle.fileno()):
            return RecordingInfo(session_id, started, size, RecordingState.RECORDING)
        try:
            lines, ends_in_newline = _last_lines(handle, len(header_line), size)
        except RecordingError as error:
            return damaged(str(error), started)
    if not ends_in_newline:
        return damaged(f"cut off mid-line at byte {size}", started)
    events = [_parse_event(line) for line in lines]
    if events and events[-1] is None:
        return damaged("its last line is not an event", started)
    markers = [event[2] for event in events if event is not None and event[1] == "m"]
    last = events[-1] if events else None
    last_marker = last[2] if last is not None and last[1] == "m" else None
    truncated = TRUNCATED_MARKER in markers

    def state(kind: RecordingState, detail: str = "") -> RecordingInfo:
        return RecordingInfo(session_id, started, size, kind, truncated, detail)

    if last_marker == END_MARKER:
        return state(RecordingState.TRUNCATED if truncated else RecordingState.COMPLETE)
    if last_marker == INTERRUPTED_MARKER:
        return state(RecordingState.INTERRUPTED)
    if header.get(FORMAT_KEY) != FORMAT_VALUE:
        # Written before end markers: complete as far as anyone can tell.
        return state(RecordingState.TRUNCATED if truncated else RecordingState.COMPLETE)
    if info.st_mode & stat.S_IWUSR:
        return state(
            RecordingState.INTERRUPTED,
            "not finished by the agent; marked at the agent's next start",
        )
    return damaged("ends without an end marker: writing it failed", started)


def _locked_by_writer(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # no flock() here: the active set is all there is
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _last_lines(
    handle: BinaryIO, floor: int, size: int, count: int = 2
) -> tuple[list[bytes], bool]:
    """Up to ``count`` last lines after offset ``floor`` (the header), and whether the file
    ends with a newline. RecordingError if a line is longer than MAX_TAIL_BYTES."""
    span = min(size - floor, 64 * 1024)
    while True:
        handle.seek(size - span)
        data = handle.read(span)
        whole = span >= size - floor
        # Nothing after the header (killed before its first flush) is clean: the header line
        # ends in a newline.
        ends_in_newline = data.endswith(b"\n") or (whole and not data)
        parts = (data[:-1] if ends_in_newline else data).split(b"\n")
        if len(parts) > count or whole:
            if whole and parts == [b""]:
                parts = []
            return parts[-count:], ends_in_newline
        if span >= MAX_TAIL_BYTES:
            raise RecordingError(f"its last line is longer than {MAX_TAIL_BYTES} bytes")
        span = min(size - floor, span * 4)


def _parse_event(line: bytes) -> tuple[float, str, str] | None:
    try:
        when, code, data = json.loads(line)
        return float(when), str(code), str(data)
    except (ValueError, TypeError):
        return None


def iter_events(path: Path) -> Iterator[tuple[float, str, str]]:
    """The events of a recording after its header, as (seconds, code, data); at a line that is
    not an event, RecordingError naming the line and its byte offset."""
    read_header(path)
    with path.open("rb") as handle:
        offset = len(handle.readline(MAX_HEADER_BYTES + 1))
        for number, line in enumerate(handle, start=2):
            event = _parse_event(line)
            if event is None:
                why = "is cut off" if not line.endswith(b"\n") else "is not an event"
                raise RecordingError(
                    f"{path}: damaged: line {number} (at byte {offset}) {why}; "
                    "everything before it was played"
                )
            offset += len(line)
            yield event


async def play(
    path: Path,
    write: Callable[[str], None],
    *,
    speed: float = 1.0,
    max_idle: float | None = None,
) -> None:
    """Write a recording's output with its timing (``speed`` times faster; pauses capped at
    ``max_idle`` seconds), as ``asciinema play`` does. A damaged recording plays up to the
    damage, then RecordingError says where it stopped."""
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


# ---- recordings the agent never finished ----------------------------------------------------


@dataclass(frozen=True)
class InterruptedRecording:
    """A recording left unfinished by an agent that stopped mid-session, now marked so."""

    session_id: str
    summary: RecordingSummary
    # Up to the recording's last event: the session went on for at least this long.
    duration_ms: int


def recover_interrupted_recordings(directory: Path) -> list[InterruptedRecording]:
    """Append INTERRUPTED_MARKER to every recording in ``directory`` that its agent never
    finished (0600, no writer holds it, not one this process writes), make it read-only, and
    return them with their new hash. Blocking: run it in a thread. Files written before end
    markers, symlinks and anything else are left alone; a file that cannot be marked is
    logged and left for the next start."""
    found: list[InterruptedRecording] = []
    try:
        entries = sorted(directory.glob("*" + RECORDING_SUFFIX))
    except OSError:
        return found
    for path in entries:
        session_id = path.name.removesuffix(RECORDING_SUFFIX)
        try:
            if recording_file_name(session_id) != path.name or path.name in _active_recordings:
                continue
            recovered = _mark_interrupted(path, session_id)
        except RecordingError:
            continue
        except OSError as error:
            logger.warning(
                "recording %s was left unfinished but cannot be marked interrupted (%s); "
                "trying again at the next start", path.name, error.strerror or error,
            )
            continue
        if recovered is not None:
            found.append(recovered)
    return found


def _mark_interrupted(path: Path, session_id: str) -> InterruptedRecording | None:
    # A finished (read-only) recording is never opened for writing: an agent not running as
    # root could not, and would warn about every one at every start.
    before = os.lstat(path)
    if not stat.S_ISREG(before.st_mode) or not before.st_mode & stat.S_IWUSR:
        return None
    flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            return None  # a symlink, FIFO or directory posing as a recording
        raise
    with os.fdopen(fd, "r+b", buffering=0) as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or not info.st_mode & stat.S_IWUSR or not info.st_size:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # another process is writing it
        header_line = handle.readline(MAX_HEADER_BYTES + 1)
        if _parse_header(path, header_line).get(FORMAT_KEY) != FORMAT_VALUE:
            return None
        lines, ends_in_newline = _last_lines(handle, len(header_line), info.st_size)
        last = _parse_event(lines[-1]) if lines and ends_in_newline else None
        if last is not None and last[1] == "m" and last[2] in (END_MARKER, INTERRUPTED_MARKER):
            os.fchmod(fd, FINISHED_MODE)  # finished, but stopped before it was made read-only
            return None
        events = [event for event in map(_parse_event, lines) if event is not None]
        elapsed = max((event[0] for event in events), default=0.0)
        truncated = any(event[1:] == ("m", TRUNCATED_MARKER) for event in events)
        marker = f"[{elapsed:.6f}, \"m\", {json.dumps(INTERRUPTED_MARKER)}]\n".encode()
        # A cut line stays as it was (evidence is never rewritten); the marker starts its own.
        _write_all(fd, marker if ends_in_newline else b"\n" + marker)
        os.fchmod(fd, FINISHED_MODE)
        with suppress(OSError):
            os.fsync(fd)
        handle.seek(0)
        digest = hashlib.sha256()
        size = 0
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
    summary = RecordingSummary(path.name, digest.hexdigest(), size, truncated)
    return InterruptedRecording(session_id, summary, int(elapsed * 1000))
