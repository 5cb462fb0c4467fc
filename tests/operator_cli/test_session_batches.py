"""The operator's receive path in batches: frames that arrive together come out together, in
order, each stream's output written with as few system calls as possible and never mixed."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from operator_cli.session_client import (
    Closed,
    Exited,
    Output,
    SessionError,
    SessionEvent,
    output_runs,
)
from operator_cli.stdio import OutputWriter
from protocol.control import ExitStatus, encode_control
from protocol.frames import FrameType
from protocol.stream_framing import encode_stream_frame, encode_stream_parts
from tests.operator_cli.test_sessions_client import AgentPeer, exec_through, with_agent


async def send_together(peer: AgentPeer, frames: list[tuple[FrameType, bytes]]) -> None:
    """Seal ``frames`` and send them in one write, so they arrive together."""
    now = time.monotonic()
    await peer.stream.send_all(
        b"".join(encode_stream_parts(peer.channel.seal_parts(kind, data, now))
                 for kind, data in frames)
    )


def test_frames_that_arrive_together_come_out_as_one_batch_in_order(tmp_path: Path) -> None:
    async def script(peer: AgentPeer) -> None:
        await send_together(peer, [
            (FrameType.STDOUT, b"one "), (FrameType.STDERR, b"two "),
            (FrameType.STDOUT, b"three"),
            (FrameType.CONTROL, encode_control(ExitStatus(code=4))), (FrameType.CLOSE, b""),
        ])

    async def operator(session: Any) -> list[SessionEvent]:
        events: list[SessionEvent] = await session.receive_batch()
        assert await session.receive_batch() == []  # the session has ended cleanly
        assert await session.receive() is None
        return events

    events = trio.run(with_agent, tmp_path, script, operator)
    assert events == [
        Output("stdout", b"one "), Output("stderr", b"two "), Output("stdout", b"three"),
        Exited(ExitStatus(code=4)), Closed(None),
    ]


def test_a_bad_frame_is_reported_after_the_good_ones_before_it(tmp_path: Path) -> None:
    async def script(peer: AgentPeer) -> None:
        good = peer.channel.seal(FrameType.STDOUT, b"fine", time.monotonic())
        bad = bytearray(peer.channel.seal(FrameType.STDOUT, b"tampered", time.monotonic()))
        bad[-1] ^= 1
        await peer.stream.send_all(encode_stream_frame(good) + encode_stream_frame(bytes(bad)))
        await trio.sleep_forever()

    async def operator(session: Any) -> tuple[list[SessionEvent], str]:
        events = await session.receive_batch()
        with pytest.raises(SessionError) as refused:
            await session.receive_batch()
        return events, str(refused.value)

    events, reason = trio.run(with_agent, tmp_path, script, operator)
    assert events == [Output("stdout", b"fine")]
    assert "refused" in reason


def test_many_full_frames_at_once_reach_stdout_and_stderr_whole(tmp_path: Path) -> None:
    out = os.urandom(10 * 65536)
    err = os.urandom(70_000)

    async def script(peer: AgentPeer) -> None:
        frames = [(FrameType.STDOUT, out[i : i + 65536]) for i in range(0, len(out), 65536)]
        frames.insert(3, (FrameType.STDERR, err[:65536]))
        frames.append((FrameType.STDERR, err[65536:]))
        await send_together(peer, frames)
        await peer.exit(ExitStatus(code=0))

    assert exec_through(tmp_path, script, None) == (0, out, err)


def test_output_runs_gather_each_streams_consecutive_output_and_keep_order() -> None:
    exited = Exited(ExitStatus(code=0))
    events: list[SessionEvent] = [
        Output("stdout", b"a"), Output("stdout", b"b"), Output("stderr", b"c"),
        Output("stdout", b"d"), exited, Output("stdout", b"e"), Closed(None),
    ]
    assert list(output_runs(events)) == [
        ("stdout", [b"a", b"b"], None), ("stderr", [b"c"], None), ("stdout", [b"d"], None),
        (None, [], exited), ("stdout", [b"e"], None), (None, [], Closed(None)),
    ]


def test_write_many_writes_every_buffer_in_order_through_a_full_pipe() -> None:
    read_end, write_end = os.pipe()
    received = bytearray()

    def drain() -> None:
        while data := os.read(read_end, 7_000):  # slower than the writer: partial writes
            received.extend(data)

    reader = threading.Thread(target=drain)
    reader.start()
    chunks = [os.urandom(size) for size in (150_000, 1, 0, 65_536, 99_999)]
    writer = OutputWriter(write_end)
    try:
        assert trio.run(writer.write_many, chunks)
    finally:
        writer.close()
        os.close(write_end)
        reader.join()
        os.close(read_end)
    assert bytes(received) == b"".join(chunks)


def test_write_many_reports_a_reader_that_went_away() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    writer = OutputWriter(write_end)
    try:
        assert not trio.run(writer.write_many, [b"a", b"b"])
        assert writer.broken
    finally:
        writer.close()
        os.close(write_end)


def test_a_write_to_a_reader_that_lags_leaves_the_loop_free_and_can_be_cancelled() -> None:
    # The terminal of an operator whose remote shell floods it: it takes nothing for now.
    read_end, write_end = os.pipe()
    writer = OutputWriter(write_end)
    ticks = 0

    async def main() -> None:
        nonlocal ticks
        async with trio.open_nursery() as nursery:

            async def flood() -> None:
                with trio.move_on_after(0.3) as scope:
                    await writer.write_many([b"y\n" * 500_000])
                assert scope.cancelled_caught  # ~. : the pending output is dropped
                nursery.cancel_scope.cancel()

            async def keystrokes() -> None:
                nonlocal ticks
                while True:
                    await trio.sleep(0.01)
                    ticks += 1

            nursery.start_soon(flood)
            nursery.start_soon(keystrokes)

    try:
        started = time.monotonic()
        trio.run(main)
        assert time.monotonic() - started < 2
        assert ticks >= 10  # the other task ran all along
    finally:
        os.close(read_end)  # a writer thread still in its last slice fails (EPIPE) and ends
        writer.close()
        os.close(write_end)
