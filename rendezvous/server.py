"""Serving the rendezvous: Hypercorn's trio worker, TLS 1.2+ (or loopback-only plain HTTP).

``run_service`` opens the store, loads the service keys, builds the app and serves it until
cancelled; ``task_status.started`` reports the bound URLs (useful with port 0 in tests).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from rendezvous.app import create_app
from rendezvous.audit_trail import AuditTrail
from rendezvous.config import ServiceConfig
from rendezvous.context import ServiceContext
from rendezvous.control_channel import AgentConnections
from rendezvous.errors import ConfigError
from rendezvous.offer_bus import listen_for_offers
from rendezvous.service_keys import load_service_keys
from rendezvous.store import Store, backend_for, open_store

logger = logging.getLogger("tucdesk.rendezvous")

PRUNE_INTERVAL_SECONDS = 60.0
MAX_HEADER_BYTES = 16 * 1024
KEEP_ALIVE_SECONDS = 30
WEBSOCKET_MAX_MESSAGE_BYTES = 64 * 1024
GRACEFUL_SHUTDOWN_SECONDS = 3
SQLITE_SERVE_LOCK_SUFFIX = ".serve-lock"
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2


def hypercorn_config(
    config: ServiceConfig, listening_socket: socket.socket | None = None
) -> HypercornConfig:
    """Hypercorn settings for ``config``: one bind (or the given listening socket), TLS when
    configured, tight limits."""
    config.validate_for_serving()
    hyper = HypercornConfig()
    host, port = config.listen_host, config.listen_port
    if listening_socket is not None:
        hyper.bind = [f"fd://{listening_socket.fileno()}"]
    else:
        hyper.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if config.tls_cert is not None and config.tls_key is not None:
        hyper.certfile = str(config.tls_cert)
        hyper.keyfile = str(config.tls_key)
    hyper.accesslog = None
    hyper.errorlog = logger
    hyper.include_server_header = False
    hyper.h11_max_incomplete_size = MAX_HEADER_BYTES
    hyper.keep_alive_timeout = KEEP_ALIVE_SECONDS
    hyper.websocket_max_message_size = WEBSOCKET_MAX_MESSAGE_BYTES
    hyper.graceful_timeout = GRACEFUL_SHUTDOWN_SECONDS
    if hyper.ssl_enabled:
        context = hyper.create_ssl_context()
        # Hypercorn sets this itself today; checked so an upgrade cannot silently lower it.
        if context is None or context.minimum_version < MINIMUM_TLS_VERSION:
            raise RuntimeError("the TLS context must refuse versions older than TLS 1.2")
    return hyper


def build_context(config: ServiceConfig, store: Store) -> ServiceContext:
    """The ServiceContext for one instance serving ``store`` with the data dir's keys."""
    keys = load_service_keys(config.data_dir)
    audit = AuditTrail(store.audit, keys.audit_signer, origin=config.issuer)
    ctx = ServiceContext(config=config, store=store, keys=keys, audit=audit)
    ctx.connections = AgentConnections(ctx)
    return ctx


async def run_service(
    config: ServiceConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    listening_socket: socket.socket | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled or ``shutdown_trigger`` returns; report bound URLs when listening.

    With ``listening_socket`` (already bound and listening) the instance accepts on it instead
    of binding ``config.listen``: how the workers of ``serve --workers N`` share one address.
    """
    hyper = hypercorn_config(config, listening_socket)
    with sole_sqlite_server(config.database_url) as sole:
        async with open_store(config.database_url) as store:
            ctx = build_context(config, store)
            if sole:
                # No other instance can be serving this database, so every connection recorded
                # in it belongs to one that died without clearing it (killed, or power lost).
                await store.clear_other_instances_connections(ctx.instance_id, ctx.now())
            await _serve_instance(ctx, store, hyper, shutdown_trigger, task_status)


async def _serve_instance(
    ctx: ServiceContext,
    store: Store,
    hyper: HypercornConfig,
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    await store.clear_instance_connections(ctx.instance_id, ctx.now())
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_prune_forever, ctx)
            await nursery.start(listen_for_offers, ctx)
            binds = await nursery.start(
                _serve_then_stop, create_app(ctx), hyper, shutdown_trigger, nursery.cancel_scope
            )
            task_status.started(binds)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            await store.clear_instance_connections(ctx.instance_id, ctx.now())


@contextlib.contextmanager
def sole_sqlite_server(database: str) -> Iterator[bool]:
    """On SQLite, hold the database's serve lock for the block (True); else nothing (False).

    One instance serves a SQLite database: a second would hold agent channels that the first
    cannot offer sessions to. The lock is an flock on ``DATABASE.serve-lock``, released when the
    process ends however it ends; admin commands (team, invite, keys) do not take it.
    """
    kind, location = backend_for(database)
    if kind != "sqlite" or location == ":memory:":
        yield False
        return
    path = location + SQLITE_SERVE_LOCK_SUFFIX
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise ConfigError(
                f"another tucdesk-rendezvous (pid {holder}) is already serving {location}; "
                "one instance serves a SQLite database (use PostgreSQL for several)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield True
    finally:
        os.close(fd)


async def _serve_then_stop(
    app: object,
    hyper: HypercornConfig,
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    scope: trio.CancelScope,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve; when Hypercorn returns (shutdown), stop the instance's other tasks too."""
    await serve(app, hyper, shutdown_trigger=shutdown_trigger, task_status=task_status)  # type: ignore[arg-type]
    scope.cancel()


async def _prune_forever(ctx: ServiceContext) -> None:
    while True:
        await trio.sleep(PRUNE_INTERVAL_SECONDS)
        try:
            await ctx.store.prune_expired(ctx.now())
        except Exception as error:  # noqa: BLE001 - pruning is best effort; the next round retries
            logger.warning("pruning expired rows failed: %s", type(error).__name__)


async def termination_signal() -> None:
    """Return on SIGTERM or SIGINT, so the service shuts down gracefully."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for received in signals:
            logger.info("received %s; shutting down", signal.Signals(received).name)
            return
