"""Signed audit events the rendezvous has not acknowledged yet, kept on disk across restarts.

The control channel (agent/control_client.py) queues each agent-signed event in memory until the
rendezvous answers ``audit_event_ack``. A daemon stopped or killed before that answer would lose
it, so each event is also written here and cleared once acknowledged (or refused as never
storable). A restarted daemon loads what is left and sends it again: the rendezvous stores an
agent-signed event once per team and acknowledges a resend of one it holds, so resending is safe.

The space is reserved in advance, so that an event can be made durable on a full disk: one 0600
file, ``STATE_DIR/audit-spool/slots``, of SLOT_COUNT slots of SLOT_BYTES each, created at start
with every block written (zeros), synced, then renamed into place. An event is written in place
into a run of free slots (as many as it needs; most take one) with one ``pwrite`` and made
durable with ``fdatasync``: no block is allocated, no file created or renamed. Its first slot
starts with a header: magic, a sequence number (the order events are sent again in), the
length, and a SHA-256 over all three and the event. A write cut short (power loss, kill -9
during the write) fails the checksum and is dropped with a warning at the next start; a slot
never written, or cleared, has no magic. Clearing (after the acknowledgement) zeroes the header
without a sync: lost by a power loss, it only makes the next run send an acknowledged event
again, which the rendezvous acknowledges again without a second record.

When the whole reservation cannot be had at start (a small or full file system), fewer slots are
reserved, down to MIN_SLOT_COUNT, with a warning. When the slots run short the agent refuses new
sessions (``refusal_reason``; running sessions go on and keep room for their own events); when
even they cannot be written an event stays in memory only, with a warning. A session accepted
(``promise``) is owed NEW_SESSION_SLOTS until its events are written, then RUNNING_SESSION_SLOTS
until its session.ended is: offers arriving back to back cannot overbook the slots. A file that
cannot serve as the slot file (not a regular file, cannot be opened, larger than any slot file
the agent makes) makes the spool unusable: new sessions are refused, saying why, and opening it is
tried again at most every RESERVE_RETRY_SECONDS. The file is read in bounded chunks.

Reading at start also takes the spool of earlier versions (one ``ev-NNN.json`` file per event):
each event is moved into a slot and its file removed; those that do not fit stay files, sent
and removed as before. A file that does not parse back into a signed event is set aside as
``*.garbled`` with a warning and never sent. Temporary files an interrupted write left are removed
at start; a failed write removes its own.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import struct
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from audit.actions import Action
from audit.errors import AuditError
from audit.record import SignedEvent

logger = logging.getLogger("tucdesk.agent.spool")

SPOOL_DIR_NAME = "audit-spool"
SLOT_FILE_NAME = "slots"
TEMPORARY_SLOT_FILE_NAME = ".slots.tmp"
# A page: the unit a disk writes whole, and room for a typical event (about 1 KiB).
SLOT_BYTES = 4096
# 4 MiB reserved: about a thousand typical events not yet acknowledged.
SLOT_COUNT = 1024
# Below this the reservation is not worth having: the spool reports itself unusable.
MIN_SLOT_COUNT = 64
# A new session is refused unless this many slots are free for its own events (started,
# command, ended; a long command line takes more than one) ...
NEW_SESSION_SLOTS = 8
# ... on top of this many for each running session's session.ended (a session accepted but whose
# started and command events are not written yet is owed what is left of NEW_SESSION_SLOTS).
RUNNING_SESSION_SLOTS = 2
# The largest event spooled: an event's context is at most 16 KiB encoded (audit/record.py) and
# its other fields add at most a few KiB; 64 KiB leaves a wide margin.
MAX_EVENT_FILE_BYTES = 64 * 1024
# After the slot file could not be created, creating it is tried again at most this often.
RESERVE_RETRY_SECONDS = 10.0
SLOT_MAGIC = b"\x00TDSPOOL\x01"
# magic, sequence number, event length, SHA-256 of magic + sequence + length + event
SLOT_HEADER = struct.Struct(f"<{len(SLOT_MAGIC)}sQI32s")
RESERVE_CHUNK_BYTES = 256 * 1024
# The slot file is read at start in pieces of this size.
READ_CHUNK_BYTES = 256 * 1024
EVENT_FILE_PATTERN = re.compile(r"ev-(\d{12})\.json")
GARBLED_SUFFIX = ".garbled"
# The beginnings of refusal_reason's answers, by what ends the refusal (agent/status.py).
FULL_PREFIX = "the agent's audit spool is full"
UNUSABLE_PREFIX = "the agent's audit spool is unusable"
UNWRITABLE_PREFIX = "the agent's audit spool cannot be written"
RESERVE_FAILED_WORDS = "cannot reserve"


def remedy(problem: str) -> str:
    """What ends the refusal of new sessions that ``problem`` (a ``refusal_reason``) causes."""
    if problem.startswith(FULL_PREFIX):
        return "until the rendezvous acknowledges the queued audit events"
    retried = f"tried again every {RESERVE_RETRY_SECONDS:g} s"
    if problem.startswith(UNWRITABLE_PREFIX):
        return f"until writing to it succeeds again ({retried})"
    if RESERVE_FAILED_WORDS in problem:
        return f"until there is room for it in the state dir ({retried})"
    return f"until it is fixed ({retried})"


class EventSpool:
    """Unacknowledged signed events in preallocated slots, oldest first by sequence number."""

    def __init__(
        self,
        directory: Path,
        *,
        slot_count: int = SLOT_COUNT,
        min_slot_count: int = MIN_SLOT_COUNT,
    ) -> None:
        self.directory = directory
        self.slot_count = slot_count
        self.min_slot_count = min(min_slot_count, slot_count)
        self._fd: int | None = None
        # One byte per slot: 1 while it holds (part of) an event.
        self._used = bytearray()
        # key -> (first slot, slots taken, bytes); legacy files: key -> (-1, 0, bytes)
        self._events: dict[str, tuple[int, int, int]] = {}
        self._next_sequence = 1
        self._next_slot = 0
        self._problem: str | None = None
        self._reserve_failed_at: float | None = None
        self._write_failed_at = 0.0
        self._full_warned = False
        # Sessions accepted (``promise``) -> slots still owed to their own events.
        self._promised: dict[str, int] = {}

    @property
    def count(self) -> int:
        """How many events the spool holds."""
        return len(self._events)

    @property
    def bytes(self) -> int:
        """How many bytes the spooled events take."""
        return sum(size for _, _, size in self._events.values())

    @property
    def reserved_slots(self) -> int:
        """How many slots the slot file has (0 while there is none)."""
        return len(self._used)

    @property
    def free_slots(self) -> int:
        """How many slots hold no event."""
        return self._used.count(0)

    @property
    def problem(self) -> str | None:
        """Why the spool cannot keep new events (no slot file, a failed write), or None."""
        return self._problem

    def refusal_reason(
        self, running_sessions: int, running_ids: Collection[str] | None = None
    ) -> str | None:
        """Why a new session must be refused now (its audit could not be kept), or None.
        ``running_ids``, when given, are the sessions running (promises to others are
        dropped)."""
        if self._fd is None and self._may_retry_reserving():
            self._retry_opening()
        if self._fd is None:
            return f"{UNUSABLE_PREFIX}: {self._problem or 'not loaded'}"
        if self._problem is not None and self._may_retry_writing():
            self._probe()
        if self._problem is not None:
            return f"{UNWRITABLE_PREFIX}: {self._problem}"
        if running_ids is not None:
            for session_id in [key for key in self._promised if key not in running_ids]:
                del self._promised[session_id]  # refused, or ended without its event
        unpromised = max(0, running_sessions - len(self._promised))
        owed = sum(self._promised.values())
        needed = NEW_SESSION_SLOTS + owed + RUNNING_SESSION_SLOTS * unpromised
        if self.free_slots < needed:
            return (
                f"{FULL_PREFIX} ({self.count} audit events not yet "
                f"acknowledged by the rendezvous, {self.free_slots} of {self.reserved_slots} "
                f"slots free, {needed} needed)"
            )
        return None

    def promise(self, session_id: str) -> None:
        """A session was accepted (``refusal_reason`` said None): NEW_SESSION_SLOTS are owed
        to its events until they are written, so that the next offer cannot take them."""
        self._promised[session_id] = NEW_SESSION_SLOTS

    def load(self) -> list[tuple[str, dict[str, Any]]]:
        """The spooled events, oldest first, as (key, ``SignedEvent.to_json()``); creates the
        directory (0700) and reserves the slot file if missing; moves an old spool's files into
        slots. Garbled files are set aside with a warning. OSError if the directory is
        unusable."""
        self.close()
        self._events.clear()
        self._used = bytearray()
        try:
            self._prepare_directory()
        except OSError as error:
            self._problem = f"cannot use {self.directory} ({error.strerror or error})"
            raise
        legacy = self._scan_directory()
        self._open_or_reserve()
        loaded = self._read_slots() if self._fd is not None else []
        for sequence, name, event in legacy:
            key = self._migrate(name, event)
            loaded.append((sequence, key, event))
        loaded.sort(key=lambda item: item[0])
        return [(key, content) for _, key, content in loaded]

    def add(self, event: dict[str, Any]) -> str | None:
        """Write one event (``SignedEvent.to_json()``) and make it durable; its key, or None if
        it was not spooled (no room, or the write failed: warned, it stays in memory only)."""
        data = _encode(event)
        if len(data) > MAX_EVENT_FILE_BYTES:
            logger.warning("an audit event of %d bytes is too large to spool", len(data))
            return None
        if self._fd is None and self._may_retry_reserving():
            self._retry_opening()
        if self._fd is None:
            logger.warning(
                "cannot spool an audit event in %s (%s): it is kept in memory only",
                self.directory, self._problem,
            )  # fmt: skip
            return None
        needed = _slots_for(len(data))
        first = self._find_free_run(needed)
        if first is None:
            if not self._full_warned:
                logger.warning(
                    "the audit spool %s is full (%d events in %d slots): new audit events are "
                    "kept in memory only and are lost if the agent stops before the rendezvous "
                    "acknowledges them; new sessions are refused meanwhile",
                    self.directory, self.count, self.reserved_slots,
                )  # fmt: skip
                self._full_warned = True
            return None
        sequence = self._next_sequence
        try:
            _write_all_at(self._fd, _slot_record(sequence, data), first * SLOT_BYTES)
            os.fdatasync(self._fd)
        except OSError as error:
            self._problem = f"writing an event failed ({error.strerror or error})"
            self._write_failed_at = time.monotonic()
            logger.warning(
                "cannot spool an audit event in %s (%s): it is kept in memory only",
                self.directory, error.strerror or error,
            )  # fmt: skip
            self._clear_header(first)
            return None
        self._full_warned = False
        self._problem = None
        self._next_sequence += 1
        self._used[first : first + needed] = b"\x01" * needed
        self._next_slot = (first + needed) % len(self._used)
        key = f"slot-{first}-{sequence}"
        self._events[key] = (first, needed, len(data))
        self._pay_promise(event, needed)
        return key

    def _pay_promise(self, event: dict[str, Any], taken: int) -> None:
        """A promised session's event took ``taken`` slots: owed that many fewer, but still
        RUNNING_SESSION_SLOTS for its session.ended (all that is left once its command is
        written), and nothing once that (or its session.refused) is written."""
        inner = event.get("event")
        if not self._promised or not isinstance(inner, dict):
            return
        session_id = inner.get("session_id")
        if not isinstance(session_id, str) or session_id not in self._promised:
            return
        action = inner.get("action")
        if action in (Action.SESSION_ENDED.value, Action.SESSION_REFUSED.value):
            del self._promised[session_id]
        elif action == Action.SESSION_COMMAND.value:
            self._promised[session_id] = RUNNING_SESSION_SLOTS
        else:
            owed = self._promised[session_id] - taken
            self._promised[session_id] = max(RUNNING_SESSION_SLOTS, owed)

    def remove(self, key: str) -> None:
        """Forget one event (acknowledged, refused for good, or dropped)."""
        found = self._events.pop(key, None)
        if found is None:
            return
        first, taken, _ = found
        if first < 0:
            _unlink_legacy(self.directory / key)
            return
        self._used[first : first + taken] = bytes(taken)
        # Not synced: if a power loss undoes it the event is only sent (and acknowledged) again.
        self._clear_header(first)

    def close(self) -> None:
        """Close the slot file."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    # ---- the slot file -------------------------------------------------------------------

    def _open_or_reserve(self) -> None:
        """Open the slot file, or reserve it when there is none. One that cannot serve makes
        the spool unusable; opening it is tried again after RESERVE_RETRY_SECONDS."""
        path = self.directory / SLOT_FILE_NAME
        self._reserve_failed_at = None
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            self._reserve()
            return
        except OSError as error:
            self._cannot_use(f"cannot open {path} ({error.strerror or error})")
            return
        try:
            problem = self._check_slot_file(fd, path)
        except OSError as error:
            problem = f"cannot use {path} ({error.strerror or error})"
        if problem is not None:
            os.close(fd)
            self._cannot_use(problem)
            return
        self._fd = fd
        self._used = bytearray(os.fstat(fd).st_size // SLOT_BYTES)
        self._next_slot = 0
        if self._problem is not None:
            logger.info("the audit spool %s is usable again", path)
        self._problem = None

    def _retry_opening(self) -> None:
        """After the slot file could not be opened or reserved: try again (an admin may have
        fixed it). Events found in it are kept, and sent by the next start."""
        self._open_or_reserve()
        if self._fd is None:
            return
        found = self._read_slots()
        if found:
            logger.warning(
                "the audit spool %s holds %d audit events an earlier run left: they are sent "
                "at the next start", self.directory, len(found),
            )  # fmt: skip

    def _check_slot_file(self, fd: int, path: Path) -> str | None:
        """Why the open file ``fd`` cannot serve as the slot file, or None (grown to
        slot_count when smaller)."""
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return f"{path} is not a regular file"
        if info.st_mode & 0o077:
            os.fchmod(fd, 0o600)
        slots = info.st_size // SLOT_BYTES
        largest = max(self.slot_count, SLOT_COUNT)
        if slots > largest:
            # Never read whole (it may be sparse and huge): the agent makes none this large.
            return (
                f"{path} is {info.st_size} bytes, larger than the {largest * SLOT_BYTES} "
                "bytes of any slot file the agent makes (remove it or move it aside)"
            )
        if slots < self.slot_count:
            slots = _grow(fd, slots, self.slot_count)
        if slots < self.min_slot_count:
            return f"{path} holds {slots} slots, fewer than {self.min_slot_count}"
        return None

    def _cannot_use(self, problem: str) -> None:
        self._unusable(problem)
        self._reserve_failed_at = time.monotonic()

    def _reserve(self) -> None:
        """Create the slot file with every block written, as many slots as the disk allows
        (at least min_slot_count), then rename it into place."""
        self._reserve_failed_at = None
        temporary = self.directory / TEMPORARY_SLOT_FILE_NAME
        _unlink_quietly(temporary)
        slots = self.slot_count
        last_error: OSError | None = None
        while slots >= self.min_slot_count:
            try:
                fd = _create_private(temporary)
            except OSError as error:
                last_error = error
                break
            try:
                _fill_with_zeros(fd, 0, slots * SLOT_BYTES)
                os.fsync(fd)
                os.replace(temporary, self.directory / SLOT_FILE_NAME)
                _sync_directory(self.directory)
            except OSError as error:
                os.close(fd)
                _unlink_quietly(temporary)
                last_error = error
                slots //= 2
                continue
            self._fd = fd
            self._used = bytearray(slots)
            self._next_slot = 0
            self._problem = None
            if slots < self.slot_count:
                logger.warning(
                    "the audit spool %s has room for only %d of %d slots (%s): new sessions "
                    "are refused sooner", self.directory, slots, self.slot_count,
                    last_error.strerror if last_error is not None else "no space",
                )  # fmt: skip
            return
        reason = last_error.strerror if last_error is not None else "no space"
        self._unusable(
            f"{RESERVE_FAILED_WORDS} {self.min_slot_count * SLOT_BYTES // 1024} KiB for it in "
            f"{self.directory} ({reason or last_error})"
        )
        self._reserve_failed_at = time.monotonic()

    def _may_retry_reserving(self) -> bool:
        failed_at = self._reserve_failed_at
        return failed_at is not None and time.monotonic() - failed_at >= RESERVE_RETRY_SECONDS

    def _may_retry_writing(self) -> bool:
        return time.monotonic() - self._write_failed_at >= RESERVE_RETRY_SECONDS

    def _probe(self) -> None:
        """After a failed write: whether a free slot's header can be written and synced now."""
        assert self._fd is not None
        slot = self._find_free_run(1)
        if slot is None:
            return
        try:
            os.pwrite(self._fd, bytes(SLOT_HEADER.size), slot * SLOT_BYTES)
            os.fdatasync(self._fd)
        except OSError as error:
            self._problem = f"writing an event failed ({error.strerror or error})"
            self._write_failed_at = time.monotonic()
            return
        self._problem = None

    def _unusable(self, problem: str) -> None:
        if self._problem != problem:
            logger.error(
                "the audit spool is unusable: %s; new sessions are refused until it is fixed "
                "(tried again every %g s)", problem, RESERVE_RETRY_SECONDS,
            )  # fmt: skip
        self._problem = problem

    def _read_slots(self) -> list[tuple[int, str, dict[str, Any]]]:
        assert self._fd is not None
        reader = _ChunkReader(self._fd)
        loaded: list[tuple[int, str, dict[str, Any]]] = []
        index = 0
        while index < len(self._used):
            offset = index * SLOT_BYTES
            header = reader.read(offset, SLOT_HEADER.size)
            if not header.startswith(SLOT_MAGIC) or len(header) < SLOT_HEADER.size:
                index += 1
                continue
            _, sequence, length, checksum = SLOT_HEADER.unpack(header)
            taken = _slots_for(length)
            problem = ""
            event: dict[str, Any] | None = None
            data = b""
            if length <= MAX_EVENT_FILE_BYTES and index + taken <= len(self._used):
                data = reader.read(offset + SLOT_HEADER.size, length)
            if length > MAX_EVENT_FILE_BYTES or index + taken > len(self._used):
                problem = "its length is out of range"
            elif _checksum(sequence, data) != checksum:
                problem = "its checksum does not match (a write cut short)"
            else:
                event, problem = _parse(data)
            if problem:
                logger.warning(
                    "ignoring the audit event in spool slot %d: %s; it is never sent",
                    index, problem,
                )  # fmt: skip
                self._clear_header(index)
                index += 1
                continue
            assert event is not None
            self._used[index : index + taken] = b"\x01" * taken
            key = f"slot-{index}-{sequence}"
            self._events[key] = (index, taken, length)
            self._next_sequence = max(self._next_sequence, sequence + 1)
            loaded.append((sequence, key, event))
            index += taken
        return loaded

    def _find_free_run(self, needed: int) -> int | None:
        if not self._used:
            return None
        run = bytes(needed)
        found = self._used.find(run, self._next_slot)
        if found < 0:
            found = self._used.find(run)
        return None if found < 0 else found

    def _clear_header(self, slot: int) -> None:
        if self._fd is None:
            return
        try:
            os.pwrite(self._fd, bytes(SLOT_HEADER.size), slot * SLOT_BYTES)
        except OSError as error:
            logger.warning("cannot clear spool slot %d: %s", slot, error.strerror or error)

    # ---- the spool of earlier versions: one file per event -------------------------------

    def _scan_directory(self) -> list[tuple[int, str, dict[str, Any]]]:
        """Old-style event files (sequence, name, event), sorted; removes leftover temporary
        files and sets garbled event files aside."""
        found: list[tuple[int, str, dict[str, Any]]] = []
        for entry in os.scandir(self.directory):
            if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                _unlink_quietly(Path(entry.path))  # a write cut short before its rename
                continue
            match = EVENT_FILE_PATTERN.fullmatch(entry.name)
            if match is None:
                continue
            event, problem = _read_event_file(Path(entry.path))
            if event is None:
                self._set_aside(Path(entry.path), problem)
                continue
            found.append((int(match.group(1)), entry.name, event))
        found.sort(key=lambda item: item[0])
        return found

    def _migrate(self, name: str, event: dict[str, Any]) -> str:
        """Move one old-style event file into a slot; its new key, or its file name if it
        stays a file (no room)."""
        key = self.add(event) if self._fd is not None else None
        if key is None:
            self._events[name] = (-1, 0, len(_encode(event)))
            return name
        _unlink_legacy(self.directory / name)
        return key

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


class _ChunkReader:
    """Reads of a file through a buffer of at most READ_CHUNK_BYTES (or one event's length)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._start = 0
        self._buffer = b""

    def read(self, offset: int, length: int) -> bytes:
        end = offset + length
        if offset < self._start or end > self._start + len(self._buffer):
            self._start = offset
            self._buffer = os.pread(self._fd, max(READ_CHUNK_BYTES, length), offset)
        return self._buffer[offset - self._start : end - self._start]


def _encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()


def _slots_for(length: int) -> int:
    return (SLOT_HEADER.size + length + SLOT_BYTES - 1) // SLOT_BYTES


def _checksum(sequence: int, data: bytes) -> bytes:
    digest = hashlib.sha256(SLOT_MAGIC)
    digest.update(struct.pack("<QI", sequence, len(data)))
    digest.update(data)
    return digest.digest()


def _slot_record(sequence: int, data: bytes) -> bytes:
    return SLOT_HEADER.pack(SLOT_MAGIC, sequence, len(data), _checksum(sequence, data)) + data


def _parse(data: bytes) -> tuple[dict[str, Any] | None, str]:
    try:
        event = json.loads(data)
        SignedEvent.from_json(event)
    except (ValueError, RecursionError, AuditError) as error:
        return None, f"not a signed audit event ({str(error)[:120]})"
    if not isinstance(event, dict):
        return None, "not a signed audit event"
    return event, ""


def _read_event_file(path: Path) -> tuple[dict[str, Any] | None, str]:
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
    return _parse(data)


def _write_all_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _fill_with_zeros(fd: int, start: int, end: int) -> None:
    """Allocate and write every block in [start, end): later writes there need no new block
    (posix_fallocate alone may leave extents a first write must still convert)."""
    if end > start:
        try:
            os.posix_fallocate(fd, start, end - start)
        except OSError as error:
            if error.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise  # ENOSPC, EDQUOT: said at once, before writing megabytes
    zeros = bytes(RESERVE_CHUNK_BYTES)
    offset = start
    while offset < end:
        offset += os.pwrite(fd, zeros[: min(RESERVE_CHUNK_BYTES, end - offset)], offset)


def _grow(fd: int, slots: int, wanted: int) -> int:
    """Extend an existing slot file (made smaller on a full disk) towards ``wanted`` slots;
    how many it has now. On failure it is cut back to what it had."""
    try:
        _fill_with_zeros(fd, slots * SLOT_BYTES, wanted * SLOT_BYTES)
        os.fsync(fd)
    except OSError:
        try:
            os.ftruncate(fd, slots * SLOT_BYTES)
        except OSError:
            pass
        return slots
    return wanted


def _create_private(path: Path) -> int:
    """A new 0600 file at ``path``, opened for reading and writing; FileExistsError if
    anything is there (a symbolic link or FIFO included: nothing is followed or blocked on)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)  # whatever the umask
    return fd


def _sync_directory(directory: Path) -> None:
    """Make a rename or removal in ``directory`` durable: without this a power loss can undo
    it."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_legacy(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as error:
        logger.warning("cannot remove the spooled audit event %s: %s", path.name, error)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        return
