"""The copy pump's reads: a read that empties the source is followed by a wait, not by a read
that finds nothing (a system call and an exception per forwarded keystroke)."""

from __future__ import annotations

import socket

import trio

from relay.forwarding import pump

from .harness import trio_test

MESSAGES = 20


class CountingSocket(socket.socket):
    """A socket that counts the reads that found nothing to read."""

    empty_reads = 0

    def recv_into(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return super().recv_into(*args, **kwargs)
        except BlockingIOError:
            self.empty_reads += 1
            raise


def counting(sock: socket.socket) -> CountingSocket:
    wrapped = CountingSocket(sock.family, sock.type, fileno=sock.detach())
    wrapped.setblocking(False)
    return wrapped


@trio_test
async def test_small_messages_are_forwarded_without_reads_that_find_nothing():
    client, relay_in = socket.socketpair()
    relay_out, server = socket.socketpair()
    source = counting(relay_in)
    relay_out.setblocking(False)
    client.setblocking(False)
    server.setblocking(False)
    client_end = trio.socket.from_stdlib_socket(client)
    server_end = trio.socket.from_stdlib_socket(server)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: pump(source, relay_out, lambda _: 0.0, use_splice=False))
        for index in range(MESSAGES):
            message = b"key %d" % index
            await client_end.send(message)
            assert await server_end.recv(100) == message
        client_end.shutdown(socket.SHUT_WR)
        assert await server_end.recv(100) == b""  # EOF passed on (half-close)
    assert source.empty_reads == 0
    for sock in (source, relay_out, client_end, server_end):
        sock.close()
