"""Batched wake-ups in bulk transfer: fixed buffers only, bounded, never for small reads."""

from __future__ import annotations

import socket

import pytest
import trio

from protocol.identity import SigningIdentity
from relay.forwarding import (
    BULK_LOW_WATER,
    BULK_WAIT_LIMIT_SECONDS,
    MIN_BULK_LOW_WATER,
    SourceWaiter,
    bulk_low_water,
)
from relay.tcp import kernel_socket_buffer_maxima, usable_socket_buffer

from .harness import running_relay, trio_test
from .test_tcp_relay import pair

MIB = 1 << 20
LOW_WATER = MIN_BULK_LOW_WATER  # within every kernel's cap (half of tcp_rmem's maximum)


@pytest.fixture
def signer() -> SigningIdentity:
    return SigningIdentity.generate()


@pytest.fixture
def connected_pair():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        writer = socket.create_connection(listener.getsockname()[:2])
        reader, _ = listener.accept()
    reader.setblocking(False)
    with reader, writer:
        yield reader, writer


def low_water_of(sock: socket.socket) -> int:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT)


@pytest.mark.parametrize(
    ("socket_buffer", "low_water"),
    [
        (4 * MIB, BULK_LOW_WATER),
        (64 * MIB, BULK_LOW_WATER),
        (1 * MIB, 256 * 1024),  # a quarter of the buffer, so the window never waits on it
        (512 * 1024, 0),  # too little to gain: woken per arrival as before
        (0, 0),  # autotuned: Linux would clamp the receive window to the low-water mark
    ],
)
def test_batching_is_used_only_with_fixed_buffers_large_enough_to_gain(socket_buffer, low_water):
    assert bulk_low_water(socket_buffer) == low_water


def test_a_large_read_starts_batching_and_a_small_read_ends_it(connected_pair):
    reader, _ = connected_pair
    waiter = SourceWaiter(reader, LOW_WATER)
    waiter.observe(100)
    assert (waiter.batching, low_water_of(reader)) == (False, 1)
    waiter.observe(LOW_WATER // 4)
    assert (waiter.batching, low_water_of(reader)) == (True, LOW_WATER)
    waiter.observe(LOW_WATER // 4 - 1)
    assert (waiter.batching, low_water_of(reader)) == (False, 1)


def test_without_a_low_water_mark_nothing_is_batched(connected_pair):
    reader, _ = connected_pair
    waiter = SourceWaiter(reader, 0)
    waiter.observe(64 * MIB)
    assert (waiter.batching, low_water_of(reader)) == (False, 1)


@trio_test
async def test_a_batched_wait_lets_a_small_tail_through_within_its_limit(connected_pair):
    reader, writer = connected_pair
    waiter = SourceWaiter(reader, LOW_WATER)
    waiter.observe(LOW_WATER)
    writer.sendall(b"tail")  # far below the low-water mark: the kernel alone would not wake us
    started = trio.current_time()
    with trio.fail_after(1):
        await waiter.wait()
    assert trio.current_time() - started < BULK_WAIT_LIMIT_SECONDS + 0.25
    assert (waiter.batching, low_water_of(reader)) == (False, 1)
    assert reader.recv(16) == b"tail"
    with trio.fail_after(1):  # batching is over: the next message wakes the waiter at once
        writer.sendall(b"next")
        await waiter.wait()
    assert reader.recv(16) == b"next"


@trio_test
async def test_end_of_stream_wakes_a_batched_wait(connected_pair):
    reader, writer = connected_pair
    waiter = SourceWaiter(reader, LOW_WATER)
    waiter.observe(LOW_WATER)
    writer.shutdown(socket.SHUT_WR)
    with trio.fail_after(1):
        await waiter.wait()
    assert reader.recv(16) == b""


@trio_test
async def test_relay_batches_only_when_its_buffers_are_fixed(signer):
    async with running_relay(signer, socket_buffer=0) as relay:
        assert relay.tcp is not None and relay.tcp.low_water == 0
    async with running_relay(signer, socket_buffer=4 * MIB) as relay:
        usable = usable_socket_buffer(4 * MIB, kernel_socket_buffer_maxima())
        assert relay.tcp is not None and relay.tcp.low_water == bulk_low_water(usable)


@trio_test
async def test_a_small_message_right_after_a_bulk_burst_is_not_held_back(signer):
    async with running_relay(signer) as relay:
        operator, agent = await pair(relay.tcp_address, signer, "s-bulk")
        burst = b"x" * (8 * MIB)
        received = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(operator.send_all, burst)
            while received < len(burst):
                received += len(await agent.receive_some(MIB))
        await operator.send_all(b"keystroke")
        with trio.fail_after(0.5):
            assert await agent.receive_some(64) == b"keystroke"
