"""Length-prefixed framing for byte streams: ``length u32 big-endian || frame``.

Used on the TCP path through the relay for handshake messages and sealed frames alike. The
decoder takes bytes in whatever chunks the socket delivers and yields whole frames; it never holds
more than one maximum-size frame and refuses a zero or oversized length before buffering it.
"""

from __future__ import annotations

import struct

from protocol.errors import FrameError
from protocol.frames import MAX_SEALED_FRAME_SIZE

LENGTH_PREFIX_SIZE = 4
_LENGTH = struct.Struct(">I")


def length_prefix(frame_size: int, max_frame_size: int = MAX_SEALED_FRAME_SIZE) -> bytes:
    """The 4-byte prefix announcing a frame of ``frame_size`` bytes (send it, then the frame)."""
    if not 0 < frame_size <= max_frame_size:
        raise FrameError(f"a stream frame is 1 to {max_frame_size} bytes, got {frame_size}")
    return _LENGTH.pack(frame_size)


def encode_stream_frame(frame: bytes, max_frame_size: int = MAX_SEALED_FRAME_SIZE) -> bytes:
    """``frame`` with its length prefix, ready to write to a stream."""
    return length_prefix(len(frame), max_frame_size) + frame


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
