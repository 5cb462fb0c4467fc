"""Client side of the relay, for the agent and the operator CLI: connect, get paired, talk.

``connect_tcp`` returns a trio stream once the relay says ``paired``; ``connect_udp`` returns a
UdpRelaySession that sends and receives datagrams through the relay and can prove itself from
a new address after a NAT rebinding.
"""

from __future__ import annotations

import errno
import os
import random
import socket

import trio

from relay.datagram import (
    CLOSE,
    DATA,
    MAX_DATAGRAM_SIZE,
    REBIND,
    STATUS,
    encode_credential_proof,
    encode_data,
    encode_udp_hello,
    parse_status_datagram,
)
from relay.errors import HelloError, RelayError, RelayRefusedError
from relay.wire import MAX_STATUS_LINE_SIZE, Reason, encode_hello, parse_status

DEFAULT_CONNECT_TIMEOUT_SECONDS = 10.0
DEFAULT_PAIR_WAIT_SECONDS = 35.0
HELLO_RESEND_SECONDS = 0.5
REBIND_RESEND_SECONDS = 0.25
REBIND_ATTEMPTS = 8
# Refusals the relay sends only before it has read the token (at accept, or while the hello was
# still arriving: relay/admission.py; hello_timeout when the whole hello did not arrive within
# its hello_timeout, relay/tcp.py _read_hello, as on a loaded host), so the single-use token is
# still unspent and trying again is safe. Every other refusal may come after the token was
# checked and remembered: never retried.
RETRYABLE_REFUSALS = frozenset(
    {Reason.RATE_LIMITED, Reason.TOO_MANY_CONNECTIONS, Reason.HELLO_TIMEOUT}
)
# A refused burst is ridden out, not failed: pauses start at RETRY_FIRST_BACKOFF_SECONDS and
# double up to RETRY_MAX_BACKOFF_SECONDS, each jittered to 50-150 % so that clients refused
# together do not come back together, and all retries end within MAX_RETRY_SECONDS. At the
# relay's default rate (10 new connections a second per source after a burst of 40) that
# carries some 150 connections from one address at once (a CI runner's fleet-wide exec; 160
# measured to pair within 12.5 s). The bound stays well inside the pairing window: a side that
# got in first waits the relay's pair_timeout (30 s by default) for this one, and the relay
# tokens live 60 s (rendezvous SESSION_OFFER_SECONDS).
RETRY_FIRST_BACKOFF_SECONDS = 0.25
RETRY_MAX_BACKOFF_SECONDS = 1.0
MAX_RETRY_SECONDS = 15.0


class _RefusedBeforeToken(RelayRefusedError):
    """A retryable refusal (RETRYABLE_REFUSALS) that came as the relay's first answer."""


class PairingTimeout(RelayError):
    """The relay took the token but the other side never joined within the pairing wait: the
    relay is fine; the caller may know better why the peer did not come."""

    def __init__(self) -> None:
        super().__init__("timed out waiting for the relay to pair this session")


async def connect_tcp(
    host: str,
    port: int,
    token: str,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_SECONDS,
    pair_timeout: float = DEFAULT_PAIR_WAIT_SECONDS,
    local_host: str | None = None,
) -> trio.SocketStream:
    """Connect to the relay, present ``token`` and return the stream once paired.

    A refusal sent before the relay read the token (rate_limited, too_many_connections,
    hello_timeout: a busy relay or host, or a burst from one address) is retried with jittered
    backoff for up to MAX_RETRY_SECONDS; no other refusal is. Raises RelayRefusedError with the
    relay's reason code, or RelayError on timeout or a malformed reply. ``local_host`` picks
    the address to connect from (default: the system's choice).
    """
    started = trio.current_time()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await _connect_once(
                host, port, token, connect_timeout, pair_timeout, local_host
            )
        except _RefusedBeforeToken as refused:
            delay = _retry_delay(attempt, trio.current_time() - started)
            if delay is None:
                raise RelayRefusedError(refused.reason) from None
        await trio.sleep(delay)


def _retry_delay(attempt: int, elapsed: float) -> float | None:
    """The pause before the next attempt after ``attempt`` failed, ``elapsed`` seconds after
    the first began, or None to give up (MAX_RETRY_SECONDS would be passed)."""
    backoff = RETRY_FIRST_BACKOFF_SECONDS * 2.0 ** min(attempt - 1, 16)
    delay: float = min(backoff, RETRY_MAX_BACKOFF_SECONDS) * random.uniform(0.5, 1.5)  # noqa: S311 (jitter)
    if elapsed + delay > MAX_RETRY_SECONDS:
        return None
    return delay


async def _connect_once(
    host: str,
    port: int,
    token: str,
    connect_timeout: float,
    pair_timeout: float,
    local_host: str | None,
) -> trio.SocketStream:
    with trio.fail_after(connect_timeout):
        stream = await trio.open_tcp_stream(host, port, local_address=local_host)
    try:
        await stream.send_all(encode_hello(token))
        first = True
        with trio.move_on_after(pair_timeout):
            while True:
                reason = await _receive_status(stream)
                if reason == Reason.PAIRED:
                    return stream
                if reason != Reason.WAITING:
                    if first and reason in RETRYABLE_REFUSALS:
                        raise _RefusedBeforeToken(reason)
                    raise RelayRefusedError(reason)
                first = False
        raise PairingTimeout()
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise


async def _receive_status(stream: trio.SocketStream) -> Reason:
    line = bytearray()
    # One byte at a time: bytes after "paired" belong to the session, not to this reader.
    while not line.endswith(b"\n"):
        if len(line) >= MAX_STATUS_LINE_SIZE:
            raise RelayError("relay status line is too long")
        data = await stream.receive_some(1)
        if not data:
            raise RelayError("relay closed the connection without a status")
        line += data
    try:
        return parse_status(bytes(line))
    except HelloError as error:
        raise RelayError(str(error)) from None


class UdpRelaySession:
    """A paired UDP session through the relay."""

    def __init__(
        self, sock: trio.socket.SocketType, relay: tuple[str, int], token: str
    ) -> None:
        # Imported here: the TCP path (every `tucdesk exec`) needs no JWT library at start-up.
        from protocol.relay_token import read_own_relay_token

        own = read_own_relay_token(token)
        self._sock = sock
        self._relay = relay
        self._session_id = own.session_id
        self._side = own.side
        self._credential = own.udp_credential
        self._counter = 0
        self._rebound = trio.Event()

    @property
    def local_address(self) -> tuple[str, int]:
        """The address of this side's UDP socket."""
        address: tuple[str, int] = self._sock.getsockname()[:2]
        return address

    async def send(self, payload: bytes) -> None:
        """Send one datagram to the other side."""
        await self._sock.sendto(encode_data(payload), self._relay)

    async def receive(self) -> bytes:
        """The next datagram from the other side; RelayRefusedError once the relay ends it."""
        while True:
            data, source = await self._sock.recvfrom(MAX_DATAGRAM_SIZE)
            if source[:2] != self._relay or not data:
                continue
            if data[0] == DATA:
                return bytes(data[1:])
            if data[0] == STATUS:
                try:
                    reason = parse_status_datagram(data)
                except HelloError:
                    continue
                if reason not in (Reason.PAIRED, Reason.WAITING, Reason.REBOUND):
                    raise RelayRefusedError(reason)

    def _proof(self, kind: int) -> bytes:
        self._counter += 1
        return encode_credential_proof(
            kind, self._credential, session_id=self._session_id, side=self._side,
            counter=self._counter,
        )

    async def rebind(self, new_socket: trio.socket.SocketType) -> None:
        """Move this side to ``new_socket`` (a new address) and prove it to the relay."""
        self._sock.close()
        self._sock = new_socket
        for _ in range(REBIND_ATTEMPTS):
            await self._sock.sendto(self._proof(REBIND), self._relay)
            with trio.move_on_after(REBIND_RESEND_SECONDS):
                while True:
                    data, source = await self._sock.recvfrom(MAX_DATAGRAM_SIZE)
                    if source[:2] == self._relay and data[:1] == bytes([STATUS]):
                        if parse_status_datagram(data) == Reason.REBOUND:
                            return
        raise RelayError("the relay did not confirm the new address")

    async def close(self) -> None:
        """Tell the relay the session is over (best effort) and close the socket."""
        try:
            await self._sock.sendto(self._proof(CLOSE), self._relay)
        except OSError:
            pass
        self._sock.close()


async def connect_udp(
    host: str,
    port: int,
    token: str,
    *,
    pair_timeout: float = DEFAULT_PAIR_WAIT_SECONDS,
    local_host: str | None = None,
) -> UdpRelaySession:
    """Join a UDP session at the relay with ``token``; return once paired."""
    resolved = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, relay = resolved[0][0], (str(resolved[0][4][0]), int(resolved[0][4][1]))
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"  # noqa: S104 (a client port)
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        await sock.bind((local_host or wildcard, 0))
        hello = encode_udp_hello(token)
        with trio.move_on_after(pair_timeout):
            while True:
                await sock.sendto(hello, relay)
                with trio.move_on_after(HELLO_RESEND_SECONDS):
                    while True:
                        data, source = await sock.recvfrom(MAX_DATAGRAM_SIZE)
                        if source[:2] != relay or data[:1] != bytes([STATUS]):
                            continue
                        reason = parse_status_datagram(data)
                        if reason == Reason.PAIRED:
                            return UdpRelaySession(sock, relay, token)
                        if reason != Reason.WAITING:
                            raise RelayRefusedError(reason)
        raise PairingTimeout()
    except BaseException:
        sock.close()
        raise


# IOV_MAX on Linux: one writev takes at most this many buffers.
MAX_WRITE_BUFFERS = 1024


async def send_gathered_in_turn(
    sock: trio.socket.SocketType, pieces: list[bytes], lock: trio.Lock | trio.StrictFIFOLock
) -> None:
    """Write every byte of ``pieces`` to a relay connection, gathered (writev, no joining copy),
    waiting while the socket is full, for one of several senders taking turns with ``lock``
    (whole messages at a time); a failure is the trio stream error trio would raise.

    When the lock is free and the socket takes every byte at once (a keystroke, an echo), the
    lock is never touched: a call that does not yield cannot be interleaved with another."""
    views = gathered_views(pieces)
    if lock.locked():
        await lock.acquire()
        try:
            write_available(sock, views)
            await send_remaining(sock, views)
        finally:
            lock.release()
        return
    write_available(sock, views)
    if not views:
        return
    lock.acquire_nowait()  # nothing else ran since it was seen free
    try:
        await send_remaining(sock, views)
    finally:
        lock.release()


def gathered_views(pieces: list[bytes]) -> list[memoryview]:
    """``pieces`` as the views ``write_available`` and ``send_remaining`` take (no empty ones)."""
    return [memoryview(piece) for piece in pieces if piece]


def write_available(sock: trio.socket.SocketType, views: list[memoryview]) -> None:
    """Write as much of ``views`` as the socket takes now (never waits), removing what was
    written from the front of ``views``; a failure is the trio stream error."""
    while views:
        try:
            sent = os.writev(sock.fileno(), views[:MAX_WRITE_BUFFERS])
        except BlockingIOError:
            return
        except OSError as error:
            raise link_error(error) from None
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = views[0][sent:]


async def send_remaining(sock: trio.socket.SocketType, views: list[memoryview]) -> None:
    """Write the rest of ``views`` after ``write_available`` left some (the socket was full):
    wait for room and write, until the list is empty."""
    while views:
        await trio.lowlevel.wait_writable(sock)
        write_available(sock, views)


async def acquire_at_once(lock: trio.Lock | trio.StrictFIFOLock) -> None:
    """Take ``lock``: at once when it is free, without the scheduler pass ``acquire`` makes (a
    keystroke goes straight on); otherwise wait for it as ``acquire`` does."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


def link_error(error: OSError) -> trio.BrokenResourceError | trio.ClosedResourceError:
    """The trio stream error for a failed socket call on a relay connection."""
    if error.errno == errno.EBADF:
        return trio.ClosedResourceError("the relay connection was closed")
    return trio.BrokenResourceError(f"the relay connection failed: {error}")
