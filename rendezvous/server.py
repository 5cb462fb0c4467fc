"""Serving the rendezvous: Hypercorn's trio worker, TLS 1.2+ (or loopback-only plain HTTP).

``run_service`` opens the store, loads the service keys, builds the app and serves it until
cancelled; ``task_status.started`` reports the bound URLs (useful with port 0 in tests).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import resource
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import hypercorn.trio.run
import hypercorn.trio.tcp_server
import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from hypercorn.trio.tcp_server import TCPServer

from relay.fdlimit import raise_open_file_limit_to_hard
from rendezvous.app import create_app
from rendezvous.audit_trail import AuditTrail, RefusalBudget
from rendezvous.config import ServiceConfig, split_listen
from rendezvous.context import ServiceContext
from rendezvous.control_channel import AgentConnections, end_sessions_of_absent_agents
from rendezvous.errors import ConfigError
from rendezvous.http_versions import HTTP_1_ONLY_ALPN, speak_http_1_only
from rendezvous.key_rotation import reload_if_pins_changed, reload_service_keys
from rendezvous.metrics import ClientAddressMiddleware, MetricsOnlyApp, ServiceMetrics
from rendezvous.offer_bus import end_disabled_operators_sessions_here, listen_for_offers
from rendezvous.relay_health import check_relays_forever
from rendezvous.service_keys import check_pinned_keys, load_service_keys, with_retired_keys
from rendezvous.store import Store, backend_for, open_store
from rendezvous.store.schema_watch import watch_schema_version
from rendezvous.workers import refuse_if_in_use

logger = logging.getLogger("tucdesk.rendezvous")

PRUNE_INTERVAL_SECONDS = 60.0
MAX_HEADER_BYTES = 16 * 1024
KEEP_ALIVE_SECONDS = 30
WEBSOCKET_MAX_MESSAGE_BYTES = 64 * 1024
GRACEFUL_SHUTDOWN_SECONDS = 3
SQLITE_SERVE_LOCK_SUFFIX = ".serve-lock"
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2
CERTIFICATE_EXPIRY_WARNING_SECONDS = 14 * 24 * 3600
# trio logs each failed accept (out of files: EMFILE/ENFILE, ENOBUFS, ENOMEM) with a traceback
# and retries every 0.1 s; this many seconds between lines instead, each with the count.
ACCEPT_ERROR_LOG_INTERVAL_SECONDS = 10.0
TRIO_ACCEPT_LOGGER = "trio.serve_listeners"


class ConnectionReleasingTCPServer(TCPServer):
    """Hypercorn's trio connection, closed as soon as the client has closed it.

    Hypercorn 0.18 ends its read loop when the peer's FIN (or TLS close) arrives, but the
    connection's task group still waits for the keep-alive timer of an idle connection, so the
    socket stayed in CLOSE-WAIT, holding a file, for ``keep_alive_timeout`` (30 s): one per
    finished CLI call, which ran a busy instance out of open files. Stopping the timer once
    reading is over lets the connection close at once.
    """

    async def _read_data(self) -> None:
        try:
            await super()._read_data()
        finally:
            await self.idle_task.stop()


def release_closed_connections() -> None:
    """Make Hypercorn's trio worker close a connection when its client closes it (idempotent).

    Raises RuntimeError when the installed Hypercorn no longer has the internals this relies on.
    """
    # Every internal the override touches, checked here: Hypercorn 0.16 has ``_read_data`` but
    # no ``idle_task``, and found out at the first client close it would kill the service.
    # (``idle_task`` is set in ``__init__``: its name is among the attributes that code sets.)
    init_code = getattr(TCPServer.__init__, "__code__", None)
    idle_task_class = getattr(hypercorn.trio.tcp_server, "TrioSingleTask", None)
    if not (
        callable(getattr(TCPServer, "_read_data", None))
        and init_code is not None
        and "idle_task" in init_code.co_names
        and callable(getattr(idle_task_class, "stop", None))
        and getattr(hypercorn.trio.run, "TCPServer", None)
        in (TCPServer, ConnectionReleasingTCPServer)
    ):
        raise RuntimeError(
            "this Hypercorn version's connections cannot be released early (rendezvous/server.py)"
        )
    setattr(hypercorn.trio.run, "TCPServer", ConnectionReleasingTCPServer)  # noqa: B010


class AcceptErrorThrottle(logging.Filter):
    """Lets one of trio's failed-accept lines through per interval, rewritten to one line with
    the count and without the traceback (out of files, trio retries every 0.1 s)."""

    def __init__(
        self,
        interval: float = ACCEPT_ERROR_LOG_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self.last_logged: float | None = None
        self.failures = 0

    def filter(self, record: logging.LogRecord) -> bool:
        """Count the failure; keep the record (rewritten) once per interval."""
        if getattr(record, "accept_errors_counted", False):
            return True  # already rewritten by another throttle on the way
        self.failures += 1
        now = self.clock()
        if self.last_logged is not None and now - self.last_logged < self.interval:
            return False
        error = record.args[0] if isinstance(record.args, tuple) and record.args else "error"
        reason = record.args[1] if isinstance(record.args, tuple) and len(record.args) > 1 else ""
        record.msg = (
            "accepting connections failed %d time(s) since the last report: %s (%s); trio "
            "retries every 0.1 s; if out of open files raise LimitNOFILE (ulimit -n)"
        )
        record.args = (self.failures, error, reason)
        record.exc_info = None
        record.exc_text = None
        record.accept_errors_counted = True
        self.last_logged, self.failures = now, 0
        return True


def throttle_accept_errors() -> None:
    """Install ``AcceptErrorThrottle`` on trio's accept logger, once per process."""
    trio_logger = logging.getLogger(TRIO_ACCEPT_LOGGER)
    if not any(isinstance(existing, AcceptErrorThrottle) for existing in trio_logger.filters):
        trio_logger.addFilter(AcceptErrorThrottle())


def raise_open_files_for_serving() -> None:
    """Raise the soft open-file limit to the hard one (each connection is a file); log it."""
    soft, hard, warning = raise_open_file_limit_to_hard()
    if warning is not None:
        logger.warning("%s; each connection holds a file: raise LimitNOFILE (ulimit -n)", warning)
    hard_text = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    logger.info("open-file limit %d (hard limit %s)", soft, hard_text)


class ReloadableTlsConfig(HypercornConfig):
    """Hypercorn settings whose TLS context is made once and kept, so SIGHUP can load a renewed
    certificate into the very context the listener uses (new connections get it)."""

    _kept_ssl_context: ssl.SSLContext | None = None
    # The kind of key the context serves: OpenSSL keeps one certificate per kind, so loading a
    # key of another kind adds a second certificate beside the old one instead of replacing it.
    served_key_kind: str | None = None

    def create_ssl_context(self) -> ssl.SSLContext | None:
        """The one TLS context of this instance (None for plain HTTP)."""
        if self._kept_ssl_context is None:
            self._kept_ssl_context = super().create_ssl_context()
        return self._kept_ssl_context


def hypercorn_config(
    config: ServiceConfig, listening_socket: socket.socket | None = None
) -> ReloadableTlsConfig:
    """Hypercorn settings for ``config``: one bind (or the given listening socket), TLS when
    configured, tight limits."""
    config.validate_for_serving()
    hyper = ReloadableTlsConfig()
    host, port = config.listen_host, config.listen_port
    if listening_socket is not None:
        hyper.bind = [f"fd://{listening_socket.fileno()}"]
    else:
        hyper.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    if config.tls_cert is not None and config.tls_key is not None:
        hyper.served_key_kind = check_tls_files(config.tls_cert, config.tls_key, time.time())
        hyper.certfile = str(config.tls_cert)
        hyper.keyfile = str(config.tls_key)
    hyper.accesslog = None
    hyper.errorlog = logger
    hyper.include_server_header = False
    hyper.alpn_protocols = HTTP_1_ONLY_ALPN
    hyper.h11_max_incomplete_size = MAX_HEADER_BYTES
    hyper.keep_alive_timeout = KEEP_ALIVE_SECONDS
    hyper.websocket_max_message_size = WEBSOCKET_MAX_MESSAGE_BYTES
    hyper.graceful_timeout = GRACEFUL_SHUTDOWN_SECONDS
    if hyper.ssl_enabled:
        try:
            context = hyper.create_ssl_context()
        except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
            raise ConfigError(
                f"TLS certificate {config.tls_cert} and key {config.tls_key} cannot be used: "
                f"{error}"
            ) from None
        # Hypercorn sets this itself today; checked so an upgrade cannot silently lower it.
        if context is None or context.minimum_version < MINIMUM_TLS_VERSION:
            raise RuntimeError("the TLS context must refuse versions older than TLS 1.2")
    return hyper


def metrics_hypercorn_config(
    config: ServiceConfig, listening_socket: socket.socket | None = None
) -> HypercornConfig:
    """Hypercorn settings for the separate metrics address (plain HTTP, tight limits)."""
    assert config.metrics_listen is not None
    hyper = HypercornConfig()
    if listening_socket is not None:
        hyper.bind = [f"fd://{listening_socket.fileno()}"]
    else:
        host, port = split_listen(config.metrics_listen)
        hyper.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hyper.accesslog = None
    hyper.errorlog = logger
    hyper.include_server_header = False
    hyper.alpn_protocols = HTTP_1_ONLY_ALPN
    hyper.h11_max_incomplete_size = MAX_HEADER_BYTES
    hyper.keep_alive_timeout = KEEP_ALIVE_SECONDS
    hyper.graceful_timeout = GRACEFUL_SHUTDOWN_SECONDS
    return hyper


def check_tls_files(cert_path: Path, key_path: Path, now: float) -> str:
    """Raise ConfigError naming the file and the fault (missing, not PEM, key not the
    certificate's, certificate expired); log a warning when it expires within two weeks.
    Returns the kind of key ("RSA", "EC", ...)."""
    cert_data = _read_tls_file(cert_path, "certificate")
    key_data = _read_tls_file(key_path, "key")
    try:
        chain = x509.load_pem_x509_certificates(cert_data)
    except ValueError:
        raise ConfigError(
            f"TLS certificate {cert_path} is not a PEM certificate chain "
            "(-----BEGIN CERTIFICATE-----)"
        ) from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise ConfigError(
            f"TLS key {key_path} is encrypted; give the key without a passphrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigError(
            f"TLS key {key_path} is not a PEM private key (-----BEGIN PRIVATE KEY-----)"
        ) from None
    leaf = chain[0]
    if _public_key_bytes(key.public_key()) != _public_key_bytes(leaf.public_key()):
        raise ConfigError(
            f"TLS key {key_path} does not match the certificate {cert_path} (the first "
            "certificate in the file must be the server's own)"
        )
    expires = leaf.not_valid_after_utc
    left = expires.timestamp() - now
    if left <= 0:
        raise ConfigError(
            f"TLS certificate {cert_path} expired on {expires:%Y-%m-%d %H:%M} UTC; renew it "
            "(the rendezvous refuses to start with an expired certificate: no client would "
            "connect)"
        )
    if left < CERTIFICATE_EXPIRY_WARNING_SECONDS:
        logger.warning(
            "TLS certificate %s expires on %s UTC, in %.1f days; renew it and send SIGHUP "
            "(or restart) to load the new one", cert_path, f"{expires:%Y-%m-%d %H:%M}",
            left / 86400,
        )  # fmt: skip
    return _key_kind(key)


def _key_kind(key: Any) -> str:
    kinds = (
        (rsa.RSAPrivateKey, "RSA"), (ec.EllipticCurvePrivateKey, "EC"),
        (ed25519.Ed25519PrivateKey, "Ed25519"), (ed448.Ed448PrivateKey, "Ed448"),
    )  # fmt: skip
    return next((name for kind, name in kinds if isinstance(key, kind)), type(key).__name__)


def reload_tls(config: ServiceConfig, hyper: HypercornConfig) -> None:
    """Load the certificate and key files again into the listener's TLS context.

    The files are checked first (ConfigError naming the fault), so a bad renewal leaves the
    current certificate in service instead of a half-loaded one.
    """
    if config.tls_cert is None or config.tls_key is None:
        raise ConfigError("plain HTTP: there is no TLS certificate to reload")
    kind = check_tls_files(config.tls_cert, config.tls_key, time.time())
    served = getattr(hyper, "served_key_kind", None)
    if served is not None and kind != served:
        # Loaded beside the old one, the old certificate would still go to every client that
        # negotiates its kind of key.
        raise ConfigError(
            f"the new TLS key {config.tls_key} is {kind}, the served one is {served}: "
            "restart to change the key type"
        )
    context = hyper.create_ssl_context()
    if context is None:
        raise ConfigError("plain HTTP: there is no TLS certificate to reload")
    context.load_cert_chain(certfile=str(config.tls_cert), keyfile=str(config.tls_key))


async def reload_tls_on_hangup(
    config: ServiceConfig, hyper: HypercornConfig, ctx: ServiceContext | None = None
) -> None:
    """On each SIGHUP, reload the TLS certificate and key (and, given ``ctx``, the service keys
    after a ``keys rotate``); never stop the service for it."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            if ctx is not None:
                await reload_service_keys(ctx)
            if config.tls_cert is None:
                logger.info(
                    "received SIGHUP; serving plain HTTP, there is no TLS certificate to reload"
                )
                continue
            try:
                reload_tls(config, hyper)
            except (ConfigError, OSError, ValueError) as error:  # ssl.SSLError is an OSError
                logger.error("received SIGHUP; kept the current TLS certificate: %s", error)
            else:
                logger.info(
                    "received SIGHUP; reloaded TLS certificate %s and key %s for new connections",
                    config.tls_cert, config.tls_key,
                )


def _read_tls_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ConfigError(
            f"TLS {what} {path} cannot be read: {error.strerror or error}"
        ) from None


def _public_key_bytes(key: Any) -> bytes:
    data: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def build_context(config: ServiceConfig, store: Store) -> ServiceContext:
    """The ServiceContext for one instance serving ``store`` with the data dir's keys."""
    keys = load_service_keys(config.data_dir)
    metrics = ServiceMetrics()
    budget = RefusalBudget(on_suppressed=metrics.audit_refusals_suppressed.inc)
    audit = AuditTrail(store.audit, keys.audit_signer, origin=config.issuer, refusal_budget=budget)
    ctx = ServiceContext(config=config, store=store, keys=keys, audit=audit, metrics=metrics)
    ctx.connections = AgentConnections(ctx)
    return ctx


async def run_service(
    config: ServiceConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    listening_socket: socket.socket | None = None,
    metrics_socket: socket.socket | None = None,
    reload_on_hangup: bool = False,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled or ``shutdown_trigger`` returns; report bound URLs when listening.

    With ``listening_socket`` (already bound and listening) the instance accepts on it instead
    of binding ``config.listen``: how the workers of ``serve --workers N`` share one address.
    ``metrics_socket`` is the same for ``metrics_listen``. With ``reload_on_hangup`` (the
    process's main instance), SIGHUP reloads the TLS files.
    """
    hyper = hypercorn_config(config, listening_socket)
    raise_open_files_for_serving()
    if listening_socket is None:
        # Hypercorn's own bind failure surfaces as an exception group with no address in it.
        refuse_if_in_use(config.listen_host, config.listen_port)
    metrics_hyper = None
    if config.metrics_listen is not None:
        metrics_hyper = metrics_hypercorn_config(config, metrics_socket)
        if metrics_socket is None:
            refuse_if_in_use(*split_listen(config.metrics_listen))
    with sole_sqlite_server(config.database_url) as sole:
        async with open_store(config.database_url, **config.store_options()) as store:
            ctx = build_context(config, store)
            await check_pinned_keys(store, ctx.keys, config.data_dir, ctx.now(), pin=True)
            ctx.keys = await with_retired_keys(store, ctx.keys)
            if sole:
                # No other instance can be serving this database, so every connection recorded
                # in it belongs to one that died without clearing it (killed, or power lost).
                await store.clear_other_instances_connections(ctx.instance_id, ctx.now())
            await _serve_instance(
                ctx, store, hyper, metrics_hyper, shutdown_trigger, reload_on_hangup, task_status
            )


async def _serve_instance(
    ctx: ServiceContext,
    store: Store,
    hyper: HypercornConfig,
    metrics_hyper: HypercornConfig | None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None,
    reload_on_hangup: bool,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    await store.clear_instance_connections(ctx.instance_id, ctx.now())
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_prune_forever, ctx)
            nursery.start_soon(watch_schema_version, store)
            nursery.start_soon(check_relays_forever, ctx)
            if reload_on_hangup:
                nursery.start_soon(reload_tls_on_hangup, ctx.config, hyper, ctx)
            await nursery.start(listen_for_offers, ctx)
            binds = await nursery.start(
                _serve_then_stop,
                ClientAddressMiddleware(create_app(ctx), ctx.metrics.refusal_log),
                hyper,
                shutdown_trigger,
                nursery.cancel_scope,
            )
            if metrics_hyper is not None:
                # Stopped with the rest when the API server returns (it cancels the nursery).
                await nursery.start(
                    partial(serve, MetricsOnlyApp(ctx.metrics), metrics_hyper)  # type: ignore[arg-type]
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
    speak_http_1_only()
    release_closed_connections()
    throttle_accept_errors()
    await serve(app, hyper, shutdown_trigger=shutdown_trigger, task_status=task_status)  # type: ignore[arg-type]
    scope.cancel()


async def _prune_forever(ctx: ServiceContext) -> None:
    while True:
        await trio.sleep(PRUNE_INTERVAL_SECONDS)
        try:
            await ctx.store.prune_expired(ctx.now())
        except Exception as error:  # noqa: BLE001 - pruning is best effort; the next round retries
            logger.warning("pruning expired rows failed: %s", type(error).__name__)
        # Disabled operators' sessions end within one interval on every instance, even if the
        # disable's notice was lost or its ending failed (rendezvous/offer_bus.py).
        try:
            told = await end_disabled_operators_sessions_here(ctx)
        except Exception as error:  # noqa: BLE001 - the next round retries
            logger.warning("ending disabled operators' sessions failed: %s", type(error).__name__)
        else:
            if told:
                logger.info("asked agents here to end %d session(s) of disabled operators", told)
        try:
            lost = await end_sessions_of_absent_agents(ctx)
        except Exception as error:  # noqa: BLE001 - the next round retries
            logger.warning("ending sessions of absent agents failed: %s", type(error).__name__)
        else:
            if lost:
                logger.info("ended %d session(s) whose agent has been gone for an hour", lost)
        # A rotation's notice lost (or SQLite): the service keys follow the database's pins
        # within one interval (rendezvous/key_rotation.py).
        try:
            await reload_if_pins_changed(ctx)
        except Exception as error:  # noqa: BLE001 - the next round retries
            logger.warning("checking the service key pins failed: %s", type(error).__name__)


async def termination_signal() -> None:
    """Return on SIGTERM or SIGINT, so the service shuts down gracefully."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for received in signals:
            logger.info("received %s; shutting down", signal.Signals(received).name)
            return
