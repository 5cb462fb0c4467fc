"""The relay service: binds its sockets, runs the front ends, and shuts down gracefully.

Everything runs in one nursery. ``shutdown()`` refuses newcomers and waiting sides with
``shutting_down``, lets paired sessions drain for the grace period and then closes what is left.
"""

from __future__ import annotations

import functools
import logging
import socket
from collections.abc import Callable
from typing import Any

import trio

from protocol.version import installed_version
from relay.admission import Admission, SpareDescriptor, accept_failure_reason
from relay.config import HostPort, RelayConfig
from relay.errors import KeySetError, RelayError
from relay.keyset import (
    JwksRefresher,
    TokenKeySet,
    fetch_jwks,
    load_key_files,
    unknown_key_refetch_for,
)
from relay.metrics import RelayMetrics
from relay.metrics_http import serve_metrics
from relay.tcp import (
    TcpFrontEnd,
    detect_dead_peers,
    kernel_socket_buffer_maxima,
    open_tcp_listener,
    usable_socket_buffer,
)
from relay.udp import UdpFrontEnd, open_udp_socket
from relay.wire import Reason

MAX_SWEEP_INTERVAL_SECONDS = 1.0

log = logging.getLogger("tucdesk.relay")


class Relay:
    """One relay process's service. Create, then ``await serve()`` inside a nursery."""

    def __init__(
        self,
        config: RelayConfig,
        key_set: TokenKeySet | None = None,
        metrics: RelayMetrics | None = None,
    ) -> None:
        self.config = config
        self.key_set = key_set
        self.metrics = metrics or RelayMetrics()
        self.tcp_address: tuple[str, int] | None = None
        self.udp_address: tuple[str, int] | None = None
        self.metrics_address: tuple[str, int] | None = None
        self.tcp: TcpFrontEnd | None = None
        self.udp: UdpFrontEnd | None = None
        self._shutdown = trio.Event()
        self._activity_ended = trio.Event()
        self._jwks_refresher: JwksRefresher | None = None

    def _on_activity_ended(self) -> None:
        self._activity_ended.set()

    def shutdown(self) -> None:
        """Begin a graceful shutdown (safe to call more than once)."""
        self._shutdown.set()

    def reload(self) -> None:
        """Re-read the relay-token keys (SIGHUP); on any error keep the keys in use.

        --token-key files are read again; with --jwks the JWKS is fetched now. Other settings
        take effect on restart. Live sessions are untouched either way.
        """
        if self.key_set is None:
            log.warning("reload_ignored reason=not_started")
            return
        if self._jwks_refresher is not None:
            # Fetched in the refresher's task; it logs reload / reload_failed and counts the
            # result (_count_reload), as below for the key files.
            log.info("reload jwks=%s refreshing_now", self.config.jwks)
            self._jwks_refresher.refresh_soon()
            return
        try:
            keys = load_key_files(self.config.token_key)
        except KeySetError as error:
            self.metrics.key_reloads.labels("failed").inc()
            log.warning(
                "reload_failed error=%s keeping=%s", error, ",".join(self.key_set.fingerprints())
            )
            return
        before = self.key_set.fingerprints()
        self.key_set.replace(keys)
        self.metrics.key_reloads.labels("ok").inc()
        log.info(
            "reload token_keys=%s changed=%s (other settings take effect on restart)",
            ",".join(self.key_set.fingerprints()),
            "yes" if self.key_set.fingerprints() != before else "no",
        )

    def _count_metrics_accept_failure(self, error: OSError) -> None:
        self.metrics.accept_failures.labels("metrics", accept_failure_reason(error)).inc()

    def _count_reload(self, ok: bool) -> None:
        self.metrics.key_reloads.labels("ok" if ok else "failed").inc()

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run until shut down; ``task_status.started(self)`` once the sockets are bound."""
        if self.key_set is None:
            self.key_set = await self._initial_key_set()
        if self.config.jwks and not self.config.token_key:
            self._jwks_refresher = JwksRefresher(
                self.key_set, self.config.jwks, self.config.jwks_ca, self.config.jwks_refresh,
                self.metrics.jwks_refresh_failures.inc, self._count_reload,
                unknown_key_refetch=unknown_key_refetch_for(self.config.hello_timeout),
            )
        admission = Admission(self.config, self.key_set, self.metrics, trio.current_time())
        sockets: list[socket.socket] = []
        metrics_spare: SpareDescriptor | None = None
        try:
            socket_buffer = self._socket_buffer()
            listener = _bind(
                functools.partial(open_tcp_listener, socket_buffer=socket_buffer),
                "--listen", self.config.listen,
            )
            sockets.append(listener)
            detect_dead_peers(listener, self.config.dead_peer_timeout)
            self.tcp_address = listener.getsockname()[:2]
            self.tcp = TcpFrontEnd(
                admission, listener, self._on_activity_ended, socket_buffer=socket_buffer
            )
            if self.config.udp is not None:
                udp_socket = _bind(open_udp_socket, "--udp", self.config.udp)
                sockets.append(udp_socket)
                self.udp_address = udp_socket.getsockname()[:2]
                self.udp = UdpFrontEnd(admission, udp_socket, self._on_activity_ended)
            metrics_listener = None
            if self.config.metrics is not None:
                metrics_listener = _bind(open_tcp_listener, "--metrics", self.config.metrics)
                sockets.append(metrics_listener)
                self.metrics_address = metrics_listener.getsockname()[:2]
                # Opened before any client is accepted: /metrics answers under fd exhaustion.
                metrics_spare = SpareDescriptor()
            await self._run(admission, metrics_listener, metrics_spare, task_status)
        finally:
            admission.close()
            if metrics_spare is not None:
                metrics_spare.close()
            for sock in sockets:
                if sock.fileno() != -1:
                    trio.lowlevel.notify_closing(sock)
                sock.close()

    def _socket_buffer(self) -> int:
        requested = self.config.socket_buffer
        maxima = kernel_socket_buffer_maxima()
        usable = usable_socket_buffer(requested, maxima)
        if requested and not usable:
            shown = ["unknown" if value is None else value for value in maxima]
            log.warning(
                "socket_buffer_autotuned requested=%d rmem_max=%s wmem_max=%s: raise "
                "net.core.rmem_max and wmem_max (sysctl) to use fixed buffers, or set "
                "--socket-buffer 0 to silence this", requested, *shown,
            )
        return usable

    async def _initial_key_set(self) -> TokenKeySet:
        if self.config.token_key:
            return TokenKeySet.from_files(self.config.token_key)
        assert self.config.jwks is not None
        try:
            return TokenKeySet(await fetch_jwks(self.config.jwks, self.config.jwks_ca))
        except KeySetError as error:
            raise KeySetError(f"cannot start without relay-token keys: {error}") from None

    async def _run(
        self,
        admission: Admission,
        metrics_listener: socket.socket | None,
        metrics_spare: SpareDescriptor | None,
        task_status: Any,
    ) -> None:
        assert self.tcp is not None
        tcp, udp = self.tcp, self.udp
        async with trio.open_nursery() as nursery:
            services = trio.CancelScope()

            async def accept() -> None:
                # Runs through the drain too: newcomers are accepted and refused with
                # shutting_down at once (the hello protocol's answer), where a listener left
                # open but unserved would let them hang until their own timeout.
                await tcp.accept_loop(nursery)

            async def background() -> None:
                with services:
                    async with trio.open_nursery() as service_nursery:
                        service_nursery.start_soon(self._sweep_forever)
                        if metrics_listener is not None:
                            service_nursery.start_soon(
                                functools.partial(
                                    serve_metrics, metrics_listener, self.metrics.exposition,
                                    spare=metrics_spare,
                                    on_accept_failed=self._count_metrics_accept_failure,
                                )
                            )
                        if self._jwks_refresher is not None:
                            service_nursery.start_soon(self._jwks_refresher.run)

            nursery.start_soon(accept)
            nursery.start_soon(background)
            udp_scope = trio.CancelScope()
            if udp is not None:

                async def receive() -> None:
                    with udp_scope:
                        await udp.receive_loop()

                nursery.start_soon(receive)
            assert self.key_set is not None
            log.info(
                "relay_started version=%s relay_id=%s tcp=%s udp=%s metrics=%s keys_from=%s "
                "keys=%s",
                installed_version(), self.config.relay_id, _show(self.tcp_address),
                _show(self.udp_address), _show(self.metrics_address),
                "jwks" if self._jwks_refresher is not None else "token_key",
                ",".join(self.key_set.fingerprints()),
            )
            log.info("relay_limits %s", self.config.limits_summary())
            task_status.started(self)
            await self._shutdown.wait()
            log.info("relay_stopping grace_s=%s", self.config.grace)
            admission.shutting_down = True
            tcp.refuse_waiting_for_shutdown()
            if udp is not None:
                udp.refuse_waiting_for_shutdown()
            with trio.move_on_after(self.config.grace):
                while tcp.busy or (udp is not None and udp.busy):
                    drained = self._activity_ended = trio.Event()
                    await drained.wait()
            tcp.close_all_sessions(Reason.SHUTTING_DOWN)
            if udp is not None:
                udp.close_all_sessions(Reason.SHUTTING_DOWN)
            udp_scope.cancel()
            services.cancel()
            # Mid-hello connections have at most hello_timeout left; cut them short.
            nursery.cancel_scope.cancel()
        log.info("relay_stopped")

    async def _sweep_forever(self) -> None:
        interval = min(
            MAX_SWEEP_INTERVAL_SECONDS, self.config.idle_timeout / 4, self.config.pair_timeout / 4
        )
        while True:
            await trio.sleep(interval)
            now = trio.current_time()
            if self.tcp is not None:
                self.tcp.admission.refusal_log.flush(now)
                self.tcp.admission.accept_failure_log.flush(now)
                # Take the spare descriptor back if a reopen lost it to another thread.
                self.tcp.admission.spare.reopen()
                self.tcp.sweep_idle(now, interval)
            if self.udp is not None:
                self.udp.sweep(now)



def _bind(
    open_socket: Callable[[str, int], socket.socket], option: str, address: HostPort
) -> socket.socket:
    try:
        return open_socket(address.host, address.port)
    except OSError as error:
        raise RelayError(
            f"cannot bind {option} {address}: {error.strerror or error}; pick another address"
        ) from None


def _show(address: tuple[str, int] | None) -> str:
    return "off" if address is None else f"{address[0]}:{address[1]}"
