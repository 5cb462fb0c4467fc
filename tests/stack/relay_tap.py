"""A TCP tee in front of the relay: forwards every connection and keeps a copy of the bytes.

The rendezvous advertises the tap's address as the relay, so both sides of every session go
through it unchanged; afterwards a test searches ``captured()`` for plaintext that must not be
there. Runs in a thread of the test process with plain sockets, so it needs no event loop.
"""

from __future__ import annotations

import selectors
import socket
import threading

_CHUNK = 65536
_POLL_SECONDS = 0.1


class RelayTap:
    """Listen on a free 127.0.0.1 port and forward each connection to ``upstream``."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._captured = bytearray()
        self.connections = 0
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> RelayTap:
        self._accepter.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def captured(self) -> bytes:
        """Every byte seen so far, both directions, all connections."""
        with self._lock:
            return bytes(self._captured)

    def close(self) -> None:
        """Stop accepting and end the forwarding threads."""
        self._stopping.set()
        self._listener.close()
        for thread in [self._accepter, *self._threads]:
            thread.join(timeout=5)

    def _accept_loop(self) -> None:
        self._listener.settimeout(_POLL_SECONDS)
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._forward, args=(client,), daemon=True)
            self._threads.append(thread)
            self.connections += 1
            thread.start()

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        peers = {client: upstream, upstream: client}
        with selectors.DefaultSelector() as selector, client, upstream:
            for sock in peers:
                sock.setblocking(True)
                selector.register(sock, selectors.EVENT_READ)
            open_readers = 2
            while open_readers and not self._stopping.is_set():
                for key, _ in selector.select(_POLL_SECONDS):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    try:
                        data = source.recv(_CHUNK)
                    except OSError:
                        data = b""
                    target = peers[source]
                    if not data:
                        selector.unregister(source)
                        open_readers -= 1
                        try:
                            target.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        continue
                    with self._lock:
                        self._captured.extend(data)
                    try:
                        target.sendall(data)
                    except OSError:
                        return
