"""Output pumping: what is already readable goes on as one chunk, in order, never past a frame's
worth for a PTY, and the end of output is never lost in the middle of a chunk."""

from __future__ import annotations

import fcntl
import os
import struct
import termios
import tty
import types
from contextlib import AbstractContextManager

import pytest
import trio
import trio.testing

from agent.exec_session import EXEC_OUTPUT_CHUNK_SIZE, ExecSessionSpec, open_exec_session
from agent.process_group import OUTPUT_CHUNK_SIZE, ExitStatus, OutputPump, OutputStream
from tests.agent.session_helpers import trio_test, wait_until
from tests.relay.lock_calls import calls_recorded

# A PTY master hands out at most this much per read (the line discipline's buffer, less one).
PTY_READ_LIMIT = 4095


class Chunks:
    """Records each chunk handed on, per stream."""

    def __init__(self) -> None:
        self.chunks: list[tuple[OutputStream, bytes]] = []

    async def on_output(self, stream: OutputStream, data: bytes) -> None:
        self.chunks.append((stream, bytes(data)))

    def joined(self, stream: OutputStream = OutputStream.STDOUT) -> bytes:
        return b"".join(data for kind, data in self.chunks if kind is stream)


def readable_bytes(fd: int) -> int:
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])


def fill_without_blocking(fd: int, pattern: bytes, limit: int) -> bytes:
    """Write ``pattern`` repeatedly into non-blocking ``fd`` until ``limit`` or it is full."""
    written = bytearray()
    os.set_blocking(fd, False)
    try:
        while len(written) < limit:
            try:
                count = os.write(fd, pattern[: limit - len(written)])
            except BlockingIOError:
                break
            written += pattern[:count]
    finally:
        os.set_blocking(fd, True)
    return bytes(written)


@trio_test
async def test_pty_output_already_readable_is_coalesced_into_frame_sized_chunks() -> None:
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        pattern = bytes(range(256)) * 64
        written = fill_without_blocking(slave, pattern, 3 * OUTPUT_CHUNK_SIZE)
        assert len(written) > 2 * PTY_READ_LIMIT, "the PTY took too little to test with"
        chunks = Chunks()
        pump = OutputPump(master, OutputStream.STDOUT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run, chunks.on_output)
            await wait_until(lambda: len(chunks.joined()) == len(written))
            pump.child_exited()
        assert chunks.joined() == written  # order kept, nothing lost or repeated
        sizes = [len(data) for _, data in chunks.chunks]
        assert max(sizes) > PTY_READ_LIMIT  # several reads went out as one chunk
        assert max(sizes) <= OUTPUT_CHUNK_SIZE
    finally:
        os.close(master)
        os.close(slave)


def cancel_scopes_entered_by_the_pump() -> AbstractContextManager[list[str]]:
    """Record the functions of agent/process_group.py that enter a trio.CancelScope."""

    def label(frame: types.FrameType) -> str | None:
        caller = frame.f_back
        if (
            frame.f_code.co_name == "__enter__"
            and isinstance(frame.f_locals.get("self"), trio.CancelScope)
            and caller is not None
            and caller.f_code.co_filename.endswith("process_group.py")
        ):
            return caller.f_code.co_name
        return None

    return calls_recorded(label)


@trio_test
async def test_a_single_keystroke_echo_goes_out_alone_and_at_once() -> None:
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        chunks = Chunks()
        pump = OutputPump(master, OutputStream.STDOUT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run, chunks.on_output)
            await trio.testing.wait_all_tasks_blocked()
            with cancel_scopes_entered_by_the_pump() as scopes:
                for key in (b"a", b"b", b"c"):
                    os.write(slave, key)
                    with trio.fail_after(1):
                        await wait_until(lambda key=key: chunks.joined().endswith(key))
            pump.child_exited()
        assert [data for _, data in chunks.chunks] == [b"a", b"b", b"c"]
        # One cancel scope per run, none per wait: a scope per wait cost about as much as the
        # rest of an echo's handling.
        assert scopes == []
    finally:
        os.close(master)
        os.close(slave)


@trio_test
async def test_after_a_keystroke_echo_the_pump_waits_instead_of_reading_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    master, slave = os.openpty()
    empty_reads: list[int] = []
    real_read = os.read

    def read_counting_empty_ones(fd: int, size: int) -> bytes:
        try:
            return real_read(fd, size)
        except BlockingIOError:
            if fd == master:
                empty_reads.append(fd)
            raise

    monkeypatch.setattr(os, "read", read_counting_empty_ones)
    try:
        tty.setraw(slave)
        chunks = Chunks()
        pump = OutputPump(master, OutputStream.STDOUT)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump.run, chunks.on_output)
            await trio.sleep(0.05)  # the pump finds nothing yet and waits
            before = len(empty_reads)
            for key in (b"a", b"b", b"c"):
                os.write(slave, key)
                with trio.fail_after(1):
                    await wait_until(lambda key=key: chunks.joined().endswith(key))
                await trio.sleep(0.05)  # time enough for a needless read to happen
            after = len(empty_reads)
            pump.child_exited()  # (the drain at the end may find nothing: that is its job)
        # Each echo went out alone, and the pump went back to waiting without a read that
        # could only fail (a system call per keystroke).
        assert [data for _, data in chunks.chunks] == [b"a", b"b", b"c"]
        assert after == before
    finally:
        os.close(master)
        os.close(slave)


@trio_test
async def test_pty_output_read_just_before_the_terminal_closes_is_handed_on() -> None:
    master, slave = os.openpty()
    tty.setraw(slave)
    written = fill_without_blocking(slave, b"last words " * 1000, 11_000)
    os.close(slave)  # the master now reads the rest, then EIO
    chunks = Chunks()
    try:
        await OutputPump(master, OutputStream.STDOUT).run(chunks.on_output)
    finally:
        os.close(master)
    assert chunks.joined() == written


@trio_test
async def test_pipe_output_is_handed_on_with_its_end() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"x" * 1000)
    os.close(write_end)
    chunks = Chunks()
    try:
        await OutputPump(read_end, OutputStream.STDERR).run(chunks.on_output)
    finally:
        os.close(read_end)
    assert chunks.chunks == [(OutputStream.STDERR, b"x" * 1000)]


@trio_test
async def test_exec_output_pipe_lets_bulk_output_go_on_in_chunks_of_several_frames() -> None:
    size = EXEC_OUTPUT_CHUNK_SIZE + 12_345
    spec = ExecSessionSpec(["head", "-c", str(size), "/dev/zero"])
    chunks = Chunks()
    async with open_exec_session(spec) as session:
        await session.close_input()
        # The command can write all of it before anything reads: the pipe was enlarged.
        stdout_fd = session._stdout_fd
        await wait_until(lambda: readable_bytes(stdout_fd) == size)
        status = await session.run(chunks.on_output)
    assert status == ExitStatus(code=0)
    assert [len(data) for _, data in chunks.chunks] == [EXEC_OUTPUT_CHUNK_SIZE, 12_345]


@trio_test
async def test_exec_stdout_and_stderr_are_never_merged_under_bulk_output() -> None:
    script = (
        "i=0; while [ $i -lt 300 ]; do "
        "echo out-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx; echo err-$i >&2; "
        "i=$((i+1)); done"
    )
    chunks = Chunks()
    async with open_exec_session(ExecSessionSpec(["sh", "-c", script])) as session:
        await session.close_input()
        status = await session.run(chunks.on_output)
    assert status == ExitStatus(code=0)
    out = "".join(f"out-{i}-{'x' * 45}\n" for i in range(300)).encode()
    err = "".join(f"err-{i}\n" for i in range(300)).encode()
    assert chunks.joined(OutputStream.STDOUT) == out
    assert chunks.joined(OutputStream.STDERR) == err


@trio_test
async def test_output_that_arrives_as_the_child_exits_is_handed_on_and_the_pump_ends() -> None:
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        chunks = Chunks()
        pump = OutputPump(master, OutputStream.STDOUT)
        with trio.fail_after(2):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump.run, chunks.on_output)
                await trio.testing.wait_all_tasks_blocked()  # the pump waits for readiness
                os.write(slave, b"last")
                pump.child_exited()  # before the pump has seen the output
        assert chunks.joined() == b"last"
    finally:
        os.close(master)
        os.close(slave)
