"""Sending on a relay connection from several tasks (relay.client.send_gathered_in_turn): whole
messages in turn, and a message the socket takes at once without touching the lock."""

from __future__ import annotations

import socket

import trio
import trio.testing

from relay.client import send_gathered_in_turn

from .harness import trio_test
from .lock_calls import lock_operations

SMALL_SEND_BUFFER = 4096
BIG_MESSAGE_BYTES = 2 * 1024 * 1024


def _pair() -> tuple[trio.socket.SocketType, trio.socket.SocketType]:
    ours, theirs = trio.socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SEND_BUFFER)
    return ours, theirs


async def _read_exactly(sock: trio.socket.SocketType, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        data = await sock.recv(size - len(received))
        assert data, "the sender closed early"
        received += data
    return bytes(received)


@trio_test
async def test_a_message_the_socket_takes_at_once_goes_out_without_taking_the_lock() -> None:
    ours, theirs = _pair()
    lock = trio.Lock()
    with ours, theirs:
        with lock_operations() as called:
            await send_gathered_in_turn(ours, [b"\x00\x00\x00\x01", b"k"], lock)
        assert called == []
        assert not lock.locked()
        assert await _read_exactly(theirs, 5) == b"\x00\x00\x00\x01k"


@trio_test
async def test_a_message_that_fills_the_socket_keeps_the_turn_until_it_is_all_written() -> None:
    ours, theirs = _pair()
    lock = trio.Lock()
    big = bytes(range(256)) * (BIG_MESSAGE_BYTES // 256)
    with ours, theirs:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_gathered_in_turn, ours, [b"B", big], lock)
            await trio.testing.wait_all_tasks_blocked()
            # The big message is partly written and waits for room: it holds the turn.
            assert lock.locked()
            nursery.start_soon(send_gathered_in_turn, ours, [b"s", b"mall"], lock)
            await trio.testing.wait_all_tasks_blocked()
            received = await _read_exactly(theirs, 1 + len(big) + 5)
    # Nothing of the second message got in between the first one's bytes.
    assert received == b"B" + big + b"small"
    assert not lock.locked()


@trio_test
async def test_a_sender_finding_the_lock_held_waits_for_its_turn() -> None:
    ours, theirs = _pair()
    lock = trio.Lock()
    with ours, theirs:
        async with trio.open_nursery() as nursery:
            await lock.acquire()
            nursery.start_soon(send_gathered_in_turn, ours, [b"late"], lock)
            await trio.testing.wait_all_tasks_blocked()
            await ours.send(b"first")  # the holder's own message goes out first
            lock.release()
        assert await _read_exactly(theirs, 9) == b"firstlate"
