"""Length-prefixed stream framing: any chunking splits correctly, garbage is a FrameError."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import FrameError
from protocol.frames import MAX_SEALED_FRAME_SIZE
from protocol.stream_framing import (
    LENGTH_PREFIX_SIZE,
    StreamDecoder,
    encode_stream_frame,
    length_prefix,
)

SMALL_MAX = 64


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    return [data[start:end] for start, end in zip(points, points[1:], strict=False)]


@settings(max_examples=200, deadline=None)
@given(
    frames=st.lists(st.binary(min_size=1, max_size=SMALL_MAX), max_size=20),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
)
def test_any_chunking_yields_the_same_frames(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_stream_frame(frame, SMALL_MAX) for frame in frames)
    decoder = StreamDecoder(SMALL_MAX)
    received: list[bytes] = []
    for chunk in chunked(stream, cuts):
        received.extend(decoder.feed(chunk))
        assert decoder.buffered <= SMALL_MAX
    assert received == frames
    assert decoder.at_boundary
    decoder.finish()


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_arbitrary_bytes_raise_only_frame_error(data: bytes, cuts: list[int]) -> None:
    decoder = StreamDecoder(SMALL_MAX)
    try:
        for chunk in chunked(data, cuts):
            for frame in decoder.feed(chunk):
                assert 0 < len(frame) <= SMALL_MAX
            assert decoder.buffered <= SMALL_MAX
        decoder.finish()
    except FrameError:
        pass


def test_zero_length_is_refused() -> None:
    with pytest.raises(FrameError, match="length 0"):
        StreamDecoder().feed(b"\x00\x00\x00\x00")


def test_length_over_the_maximum_is_refused_before_buffering() -> None:
    decoder = StreamDecoder()
    with pytest.raises(FrameError, match=f"length {MAX_SEALED_FRAME_SIZE + 1}"):
        decoder.feed((MAX_SEALED_FRAME_SIZE + 1).to_bytes(4, "big") + b"x" * 100)
    assert decoder.buffered == 0


def test_decoder_stays_failed_after_garbage() -> None:
    decoder = StreamDecoder(SMALL_MAX)
    with pytest.raises(FrameError):
        decoder.feed(b"\xff\xff\xff\xff")
    with pytest.raises(FrameError, match="already carried"):
        decoder.feed(encode_stream_frame(b"fine", SMALL_MAX))


def test_large_chunk_of_many_frames_is_not_buffered_whole() -> None:
    frame = bytes(MAX_SEALED_FRAME_SIZE)
    decoder = StreamDecoder()
    stream = encode_stream_frame(frame) * 5 + encode_stream_frame(frame)[:1000]
    assert decoder.feed(stream) == [frame] * 5
    assert decoder.buffered == 1000 - LENGTH_PREFIX_SIZE


def test_stream_ending_inside_a_frame_is_reported() -> None:
    decoder = StreamDecoder(SMALL_MAX)
    decoder.feed(encode_stream_frame(b"abcdef", SMALL_MAX)[:5])
    assert not decoder.at_boundary
    with pytest.raises(FrameError, match="middle of a frame"):
        decoder.finish()


@pytest.mark.parametrize("size", [0, SMALL_MAX + 1])
def test_encoder_refuses_empty_or_oversized_frames(size: int) -> None:
    with pytest.raises(FrameError):
        encode_stream_frame(bytes(size), SMALL_MAX)
    with pytest.raises(FrameError):
        length_prefix(size, SMALL_MAX)
