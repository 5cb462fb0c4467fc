"""Length-prefixed framing for byte streams: ``length u32 big-endian || frame``.

Used on the TCP path through the relay for handshake messages and sealed frames alike. The
decoder takes bytes in whatever chunks the socket delivers and yields whole frames; it never holds
more than one maximum-size frame and refuses a zero or oversized length before buffering it.

``StreamFrameBuffer`` is the copy-free form for the session data path: the transport receives
straight into its free space, and frames come out as views of that one reusable buffer (a sealed
frame's header and body go on to ``SecureChannel.open_parts`` without being copied out).
``encode_stream_parts`` and ``encode_stream_frames`` are the sending half: prefixes, headers and
bodies joined with one copy.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from protocol.errors import FrameError
from protocol.frames import MAX_SEALED_FRAME_SIZE

LENGTH_PREFIX_SIZE = 4
# Large enough that one receive can bring in many full-size frames (fewer wake-ups per byte).
RECEIVE_BUFFER_SIZE = 1024 * 1024
_LENGTH = struct.Struct(">I")
_unpack_length = _LENGTH.unpack_from


def length_prefix(frame_size: int, max_frame_size: int = MAX_SEALED_FRAME_SIZE) -> bytes:
    """The 4-byte prefix announcing a frame of ``frame_size`` bytes (send it, then the frame)."""
    if not 0 < frame_size <= max_frame_size:
        raise FrameError(f"a stream frame is 1 to {max_frame_size} bytes, got {frame_size}")
    return _LENGTH.pack(frame_size)


def encode_stream_frame(frame: bytes, max_frame_size: int = MAX_SEALED_FRAME_SIZE) -> bytes:
    """``frame`` with its length prefix, ready to write to a stream."""
    return length_prefix(len(frame), max_frame_size) + frame


def encode_stream_parts(
    parts: Sequence[bytes | memoryview], max_frame_size: int = MAX_SEALED_FRAME_SIZE
) -> bytes:
    """One stream frame made of ``parts`` (e.g. a sealed header and body), prefix included,
    built with a single copy of the parts."""
    return b"".join((length_prefix(sum(map(len, parts)), max_frame_size), *parts))


def encode_stream_frames(
    frames: Sequence[Sequence[bytes | memoryview]], max_frame_size: int = MAX_SEALED_FRAME_SIZE
) -> bytes:
    """Several stream frames, each made of its parts as in ``encode_stream_parts``, in order
    and built with a single copy: one write for frames that are ready together."""
    pieces: list[bytes | memoryview] = []
    for parts in frames:
        pieces.append(length_prefix(sum(map(len, parts)), max_frame_size))
        pieces.extend(parts)
    return b"".join(pieces)


class StreamDecoder:
    """Feed stream bytes in, get complete frames out; garbage raises FrameError and stays fatal."""

    __slots__ = ("_buffer", "_failed", "_needed", "max_frame_size")

    def __init__(self, max_frame_size: int = MAX_SEALED_FRAME_SIZE) -> None:
        if max_frame_size <= 0:
            raise ValueError("max_frame_size must be positive")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._needed: int | None = None  # the current frame's length once its prefix is read
        self._failed = False

    @property
    def buffered(self) -> int:
        """How many bytes of an incomplete prefix or frame are held."""
        return len(self._buffer)

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is held: the stream may end here cleanly."""
        return self._needed is None and not self._buffer

    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data`` and return the frames it completes, in order."""
        if self._failed:
            raise FrameError("the stream already carried an invalid frame length")
        frames: list[bytes] = []
        view = memoryview(data)
        buffer = self._buffer
        while view:
            needed = self._needed
            if needed is None:
                take = LENGTH_PREFIX_SIZE - len(buffer)
                buffer += view[:take]
                view = view[take:]
                if len(buffer) < LENGTH_PREFIX_SIZE:
                    break
                (length,) = _LENGTH.unpack(buffer)
                buffer.clear()
                self._check_length(length)
                self._needed = length
                continue
            if not buffer and len(view) >= needed:
                # The whole frame is in this chunk: copy it once, straight out.
                frames.append(bytes(view[:needed]))
                view = view[needed:]
                self._needed = None
                continue
            take = needed - len(buffer)
            buffer += view[:take]
            view = view[take:]
            if len(buffer) == needed:
                frames.append(bytes(buffer))
                buffer.clear()
                self._needed = None
        return frames

    def finish(self) -> None:
        """Call at end of stream: raise FrameError if it ended inside a frame."""
        if not self.at_boundary:
            raise FrameError("the stream ended in the middle of a frame")

    def _check_length(self, length: int) -> None:
        if length == 0 or length > self.max_frame_size:
            self._failed = True
            raise FrameError(
                f"stream frame length {length} is outside 1 to {self.max_frame_size} bytes"
            )


class StreamFrameBuffer:
    """A reusable receive buffer that hands out whole frames as views, without copying them.

    Receive into ``writable()``, report the count with ``commit(n)``, then take frames with
    ``next_frame()`` until it returns None. A view stays valid until the next ``writable()``
    (which may move a partial frame to the front). Garbage raises FrameError and stays fatal.
    """

    __slots__ = ("_buffer", "_end", "_failed", "_start", "_view", "max_frame_size")

    def __init__(
        self,
        capacity: int = RECEIVE_BUFFER_SIZE,
        max_frame_size: int = MAX_SEALED_FRAME_SIZE,
    ) -> None:
        if max_frame_size <= 0:
            raise ValueError("max_frame_size must be positive")
        if capacity < LENGTH_PREFIX_SIZE + max_frame_size:
            raise ValueError("the buffer must hold at least one maximum-size frame")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray(capacity)
        self._view = memoryview(self._buffer)
        self._start = 0  # the unread bytes are [_start, _end)
        self._end = 0
        self._failed = False

    @property
    def buffered(self) -> int:
        """How many received bytes have not been handed out as frames yet."""
        return self._end - self._start

    @property
    def at_boundary(self) -> bool:
        """True when no partial frame is held: the stream may end here cleanly."""
        return self._start == self._end

    def writable(self) -> memoryview:
        """The free space to receive into; never empty (a partial frame always has room)."""
        start, end = self._start, self._end
        if start == end:
            self._start = self._end = 0
        elif len(self._buffer) - end < LENGTH_PREFIX_SIZE + self.max_frame_size:
            # Too little room left for the rest of the partial frame: move it to the front.
            # (A copy, not a view, because the two ranges may overlap.)
            held = end - start
            self._buffer[:held] = self._buffer[start:end]
            self._start, self._end = 0, held
        return self._view[self._end :]

    def commit(self, count: int) -> None:
        """Record that ``count`` bytes were received into the last ``writable()`` view."""
        if not 0 <= count <= len(self._buffer) - self._end:
            raise ValueError(f"cannot commit {count} bytes")
        self._end += count

    def feed(self, data: bytes | memoryview) -> None:
        """Copy ``data`` in (for transports that cannot receive into a buffer).

        ``data`` must fit in ``writable()``; ask a stream for at most that many bytes.
        """
        space = self.writable()
        if len(data) > len(space):
            raise ValueError("more data than the buffer has room for")
        space[: len(data)] = data
        self.commit(len(data))

    def next_frame(self) -> memoryview | None:
        """The next complete frame (without its prefix) as a view, or None until more arrives."""
        if self._failed:
            raise FrameError("the stream already carried an invalid frame length")
        start = self._start
        available = self._end - start
        if available < LENGTH_PREFIX_SIZE:
            return None
        (length,) = _unpack_length(self._buffer, start)
        if length == 0 or length > self.max_frame_size:
            self._failed = True
            raise FrameError(
                f"stream frame length {length} is outside 1 to {self.max_frame_size} bytes"
            )
        if available < LENGTH_PREFIX_SIZE + length:
            return None
        begin = start + LENGTH_PREFIX_SIZE
        self._start = begin + length
        return self._view[begin : self._start]

    def finish(self) -> None:
        """Call at end of stream: raise FrameError if it ended inside a frame."""
        if not self.at_boundary:
            raise FrameError("the stream ended in the middle of a frame")
