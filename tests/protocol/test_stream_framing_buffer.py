"""The copy-free receive buffer and the one-copy sender: same frames as the plain decoder."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import FrameError
from protocol.frames import MAX_SEALED_FRAME_SIZE
from protocol.stream_framing import (
    LENGTH_PREFIX_SIZE,
    StreamDecoder,
    StreamFrameBuffer,
    encode_stream_frame,
    encode_stream_frames,
    encode_stream_parts,
)

SMALL_MAX = 64
# Room for one frame and a little more, so frames keep straddling the end of the buffer.
SMALL_CAPACITY = LENGTH_PREFIX_SIZE + SMALL_MAX + 9


def receive_all(buffer: StreamFrameBuffer, stream: bytes, sizes: list[int]) -> list[bytes]:
    """Feed ``stream`` the way a socket would (at most the free space per receive, in the
    given sizes), taking frames out after every receive."""
    frames: list[bytes] = []
    offset = 0
    turn = 0
    while offset < len(stream):
        space = buffer.writable()
        assert len(space) > 0
        want = sizes[turn % len(sizes)] if sizes else len(space)
        turn += 1
        chunk = stream[offset : offset + max(1, min(want, len(space)))]
        space[: len(chunk)] = chunk
        buffer.commit(len(chunk))
        offset += len(chunk)
        while (frame := buffer.next_frame()) is not None:
            frames.append(bytes(frame))
    return frames


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(st.binary(min_size=1, max_size=SMALL_MAX), max_size=25),
    sizes=st.lists(st.integers(1, 200), max_size=12),
)
def test_any_receive_sizes_yield_the_frames_the_decoder_yields(
    frames: list[bytes], sizes: list[int]
) -> None:
    stream = b"".join(encode_stream_frame(frame, SMALL_MAX) for frame in frames)
    buffer = StreamFrameBuffer(SMALL_CAPACITY, SMALL_MAX)
    received = receive_all(buffer, stream, sizes)
    assert received == frames == StreamDecoder(SMALL_MAX).feed(stream)
    assert buffer.at_boundary
    buffer.finish()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), sizes=st.lists(st.integers(1, 100), max_size=8))
def test_arbitrary_bytes_raise_only_frame_error(data: bytes, sizes: list[int]) -> None:
    buffer = StreamFrameBuffer(SMALL_CAPACITY, SMALL_MAX)
    try:
        for frame in receive_all(buffer, data, sizes):
            assert 0 < len(frame) <= SMALL_MAX
        buffer.finish()
    except FrameError:
        pass


def test_frames_come_out_as_views_of_the_buffer_without_a_copy() -> None:
    buffer = StreamFrameBuffer()
    buffer.feed(encode_stream_frame(b"first") + encode_stream_frame(b"second"))
    first, second = buffer.next_frame(), buffer.next_frame()
    assert isinstance(first, memoryview) and isinstance(second, memoryview)
    assert (bytes(first), bytes(second)) == (b"first", b"second")
    assert first.obj is second.obj  # both point into the one receive buffer
    assert buffer.next_frame() is None and buffer.at_boundary


def test_a_partial_frame_is_moved_to_the_front_when_the_end_is_near() -> None:
    buffer = StreamFrameBuffer(SMALL_CAPACITY, SMALL_MAX)
    frame = bytes(range(SMALL_MAX))
    stream = encode_stream_frame(b"ab", SMALL_MAX) + encode_stream_frame(frame, SMALL_MAX)
    buffer.feed(stream[:20])
    assert bytes(buffer.next_frame() or b"") == b"ab"
    assert buffer.next_frame() is None
    space = buffer.writable()  # too little room left after the held 14 bytes: compacted
    assert len(space) == SMALL_CAPACITY - 14
    buffer.feed(stream[20:])
    assert bytes(buffer.next_frame() or b"") == frame


def test_length_over_the_maximum_is_refused_before_the_frame_arrives() -> None:
    buffer = StreamFrameBuffer()
    buffer.feed((MAX_SEALED_FRAME_SIZE + 1).to_bytes(4, "big") + b"x" * 100)
    with pytest.raises(FrameError, match=f"length {MAX_SEALED_FRAME_SIZE + 1}"):
        buffer.next_frame()


def test_zero_length_is_refused_and_the_buffer_stays_failed() -> None:
    buffer = StreamFrameBuffer(SMALL_CAPACITY, SMALL_MAX)
    buffer.feed(b"\x00\x00\x00\x00")
    with pytest.raises(FrameError, match="length 0"):
        buffer.next_frame()
    with pytest.raises(FrameError, match="already carried"):
        buffer.next_frame()


def test_stream_ending_inside_a_frame_is_reported() -> None:
    buffer = StreamFrameBuffer(SMALL_CAPACITY, SMALL_MAX)
    buffer.feed(encode_stream_frame(b"abcdef", SMALL_MAX)[:7])
    assert buffer.next_frame() is None
    assert not buffer.at_boundary
    with pytest.raises(FrameError, match="middle of a frame"):
        buffer.finish()


def test_buffer_must_hold_a_whole_maximum_size_frame() -> None:
    with pytest.raises(ValueError, match="maximum-size frame"):
        StreamFrameBuffer(SMALL_MAX, SMALL_MAX)


def test_more_than_the_free_space_cannot_be_fed_or_committed() -> None:
    buffer = StreamFrameBuffer(SMALL_CAPACITY, SMALL_MAX)
    with pytest.raises(ValueError):
        buffer.feed(bytes(SMALL_CAPACITY + 1))
    with pytest.raises(ValueError):
        buffer.commit(SMALL_CAPACITY + 1)


def test_parts_are_framed_as_their_concatenation() -> None:
    header, body = b"h" * 13, memoryview(b"body" * 100)
    assert encode_stream_parts((header, body)) == encode_stream_frame(header + bytes(body))


@pytest.mark.parametrize("size", [0, SMALL_MAX + 1])
def test_parts_encoder_refuses_empty_or_oversized_frames(size: int) -> None:
    with pytest.raises(FrameError):
        encode_stream_parts((bytes(size // 2), bytes(size - size // 2)), SMALL_MAX)


def test_several_frames_of_parts_are_framed_one_after_another() -> None:
    frames = [(b"h1", b"first body"), (b"h2", memoryview(b"second")), (b"h3", b"")]
    expected = b"".join(encode_stream_frame(header + bytes(body)) for header, body in frames)
    assert encode_stream_frames(frames) == expected
    with pytest.raises(FrameError):
        encode_stream_frames([(b"", b"")])
