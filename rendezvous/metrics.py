"""Prometheus metrics of one rendezvous instance, on its own registry, and their ASGI timer.

Under ``serve --workers N`` every worker process writes its values to files in the private
directory named by ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, chosen
when the library is imported), and ``/metrics`` on any worker reports the sum over all of them.

Every refused authentication counted in ``tucdesk_auth_failures_total`` is also logged, once,
with the client's address and the reason (``RefusedAuthenticationLog``, rate-limited per
address), so fail2ban and the like can act on it; the token or key refused is never logged.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MULTIPROCESS_DIRECTORY_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
UNMATCHED_ROUTE = "unmatched"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

AUTH_REFUSAL_LOGGER = "tucdesk.rendezvous.auth"
# Per client address (IPv6: per /64, which one host or site usually holds whole): this many
# lines per window, then one line saying the rest are suppressed, and when the window is over
# one line with their count (a flood cannot fill the disk).
REFUSAL_LINES_PER_ADDRESS = 5
REFUSAL_WINDOW_SECONDS = 60.0
IPV6_AGGREGATE_PREFIX = 64
# All addresses together (a flood from many addresses): at most this many repeat lines per
# window. The first line of an address in its window is always logged, so decoy addresses
# spending the budget cannot hide another address from fail2ban.
REFUSAL_LINES_PER_WINDOW = 300
# Refusals of a wrong or unusable credential: what a ban filter should count (the documented
# failregex lists them). Others (a malformed request, a disabled operator, a stale login
# challenge) are logged as refusals too, but say nothing about guessing.
CREDENTIAL_REFUSAL_REASONS = frozenset({
    "invalid_token", "revoked_token", "malformed_token", "unknown_api_key", "revoked_api_key",
    "missing_proof", "invalid_proof", "replayed_proof", "unknown_operator", "bad_signature",
    "invalid_enrollment", "invalid_invite", "invite_unknown", "invite_used", "invite_expired",
    "invite_revoked", "agent_channel", "agent_removed", "registration_invalid_payload",
    "registration_replayed", "registration_malformed_key", "registration_key_unknown",
    "registration_key_used", "registration_key_expired", "registration_key_revoked",
})  # fmt: skip
# Throttling refuses a request before any credential is looked at: logged as such, not as a
# refused authentication (a fleet behind one NAT address must not be banned for it).
THROTTLED_REASONS = frozenset({"rate_limited"})
# Addresses whose window is remembered; the oldest is forgotten first (bounded memory).
MAX_TRACKED_REFUSAL_ADDRESSES = 4096
UNKNOWN_ADDRESS = "unknown"
# Refusals of the login endpoints before any credential is looked at (a malformed body).
LOGIN_PATH_PREFIX = "/v1/auth/"
MALFORMED_LOGIN_STATUSES = frozenset({400, 422})
MALFORMED_LOGIN_REASON = "malformed_login_request"

refusal_logger = logging.getLogger(AUTH_REFUSAL_LOGGER)


@dataclass
class _RequestPeer:
    """The client of the request being served, and whether a refusal was logged for it."""

    address: str
    refusal_logged: bool = False


_request_peer: ContextVar[_RequestPeer | None] = ContextVar("tucdesk_request_peer", default=None)


@dataclass
class _AddressWindow:
    started: float
    logged: int = 0
    suppressed: int = 0


class RefusedAuthenticationLog:
    """Log each refused authentication as one WARNING line,
    ``authentication refused from ADDRESS: reason=REASON``, rate-limited per address and in
    total; suppressed lines are counted in a later ``suppressed N ...`` line."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._windows: OrderedDict[str, _AddressWindow] = OrderedDict()
        self._total_started = clock()
        self._total_logged = 0
        self._total_suppressed = 0

    def refused(self, reason: str, address: str | None = None) -> None:
        """Record one refusal of ``reason`` from ``address`` (default: the current request's
        client, as the ASGI server saw it)."""
        peer = _request_peer.get()
        if address is None:
            address = peer.address if peer is not None else UNKNOWN_ADDRESS
        if peer is not None:
            peer.refusal_logged = True
        now = self._clock()
        self._roll_total_window(now)
        window = self._window_of(_aggregate(address), now)
        if window.logged >= REFUSAL_LINES_PER_ADDRESS:
            window.suppressed += 1
            return
        # An address's first line in its window is never suppressed by the total cap (it is
        # bounded by the addresses refused, each one line per window, or per return after
        # being forgotten when more than MAX_TRACKED_REFUSAL_ADDRESSES are refused).
        if window.logged and self._total_logged >= REFUSAL_LINES_PER_WINDOW:
            self._total_suppressed += 1
            return
        window.logged += 1
        self._total_logged += 1
        if reason in THROTTLED_REASONS:
            refusal_logger.warning("requests throttled from %s: reason=%s", address, reason)
        else:
            refusal_logger.warning("authentication refused from %s: reason=%s", address, reason)
        if window.logged == REFUSAL_LINES_PER_ADDRESS:
            refusal_logger.warning(
                "authentication refused from %s: further refusals from this address are "
                "not logged for %d s", address, REFUSAL_WINDOW_SECONDS,
            )  # fmt: skip

    def _window_of(self, address: str, now: float) -> _AddressWindow:
        window = self._windows.get(address)
        if window is not None and now - window.started >= REFUSAL_WINDOW_SECONDS:
            self._report_suppressed(address, window)
            window = None
        if window is None:
            window = _AddressWindow(started=now)
            self._windows[address] = window
            while len(self._windows) > MAX_TRACKED_REFUSAL_ADDRESSES:
                forgotten, old = self._windows.popitem(last=False)
                self._report_suppressed(forgotten, old)
        self._windows.move_to_end(address)
        return window

    def _report_suppressed(self, address: str, window: _AddressWindow) -> None:
        if window.suppressed:
            refusal_logger.warning(
                "authentication refused from %s: suppressed %d more refusal(s) from this "
                "address", address, window.suppressed,
            )  # fmt: skip

    def _roll_total_window(self, now: float) -> None:
        if now - self._total_started < REFUSAL_WINDOW_SECONDS:
            return
        if self._total_suppressed:
            refusal_logger.warning(
                "authentication refusals: suppressed %d more line(s) over the limit of %d per "
                "%d s", self._total_suppressed, REFUSAL_LINES_PER_WINDOW, REFUSAL_WINDOW_SECONDS,
            )  # fmt: skip
        self._total_started, self._total_logged, self._total_suppressed = now, 0, 0


def _aggregate(address: str) -> str:
    """The key an address is limited under: itself, or its /64 for an IPv6 address."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if parsed.version == 6 and parsed.ipv4_mapped is None:
        network = ipaddress.IPv6Network((parsed, IPV6_AGGREGATE_PREFIX), strict=False)
        return str(network)
    return address


class _LoggedAuthFailure:
    """One reason's child of ``tucdesk_auth_failures_total`` whose ``inc`` also logs."""

    def __init__(self, child: Any, reason: str, log: RefusedAuthenticationLog) -> None:
        self._child = child
        self._reason = reason
        self._log = log

    def inc(self, amount: float = 1) -> None:
        """Count the refusal and log it (with the client's address)."""
        self._child.inc(amount)
        self._log.refused(self._reason)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._child, name)


class AuthFailureCounter:
    """``tucdesk_auth_failures_total``: counted and logged in the same call, so every place
    that refuses a credential leaves a log line without having to remember to."""

    def __init__(self, counter: Counter, log: RefusedAuthenticationLog) -> None:
        self.counter = counter
        self.log = log

    def labels(self, reason: str) -> _LoggedAuthFailure:
        """The counter of ``reason``."""
        return _LoggedAuthFailure(self.counter.labels(reason), reason, self.log)


class ServiceMetrics:
    """The counters, histograms and gauges ``GET /metrics`` exposes."""

    def __init__(self) -> None:
        self.multiprocess_directory = os.environ.get(MULTIPROCESS_DIRECTORY_VARIABLE)
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "tucdesk_http_requests_total",
            "HTTP requests by route template, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "tucdesk_http_request_seconds",
            "HTTP request latency by route template, method and status.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.refusal_log = RefusedAuthenticationLog()
        self.auth_failures = AuthFailureCounter(
            Counter(
                "tucdesk_auth_failures_total",
                "Refused authentications by reason.",
                ["reason"],
                registry=self.registry,
            ),
            self.refusal_log,
        )
        self.registrations = Counter(
            "tucdesk_agent_registrations_total",
            "Agent registration attempts by outcome (ok or the refusal reason).",
            ["outcome"],
            registry=self.registry,
        )
        self.connected_agents = Gauge(
            "tucdesk_connected_agents",
            "Agent control channels currently open on this service (all its live workers).",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.relays_up = Gauge(
            "tucdesk_relay_up",
            "Whether this instance's last check reached the relay (1) or not (0); checked only "
            "when more than one relay is configured.",
            ["relay"],
            registry=self.registry,
            multiprocess_mode="max",
        )
        self.clone_anomalies = Counter(
            "tucdesk_clone_anomalies_total",
            "Agent identities seen live twice or with a second machine fingerprint.",
            ["kind"],
            registry=self.registry,
        )
        self.agent_audit_events = Counter(
            "tucdesk_agent_audit_events_total",
            "Agent-signed audit events accepted, by outcome: stored, or already_held (a resend "
            "or replay of one the log holds, acknowledged again without a second record).",
            ["outcome"],
            registry=self.registry,
        )
        self.audit_refusals_suppressed = Counter(
            "tucdesk_audit_refusals_suppressed_total",
            "Refused requests not written to the audit log because their caller was over its "
            "budget of refusal records (the caller's next record carries the count).",
            registry=self.registry,
        )
        self.rejected_inputs = Counter(
            "tucdesk_rejected_inputs_total",
            "Inputs refused as oversized or malformed, by reason: HTTP requests before their "
            "handler (invalid, oversized, ...), agent audit events, messages that closed an "
            "agent's control channel (agent_channel_message), inter-instance notices "
            "(bus_notice, bus_offer_notice, bus_superseded_notice, bus_policy_notice).",
            ["reason"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        """The Prometheus text exposition of this registry (of every worker's, when several)."""
        if self.multiprocess_directory is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, self.multiprocess_directory)  # type: ignore[no-untyped-call]
        return generate_latest(merged)


class RequestMetricsMiddleware:
    """ASGI middleware counting HTTP requests and their latency by route template and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Time the request and label it with the matched route once it is done."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_and_record_status)
        finally:
            route = scope.get("route")
            route_label = getattr(route, "path", UNMATCHED_ROUTE)
            labels = (route_label, scope.get("method", ""), str(status))
            self.metrics.requests.labels(*labels).inc()
            self.metrics.latency.labels(*labels).observe(time.perf_counter() - started)


class ClientAddressMiddleware:
    """ASGI middleware that makes the request's client address known to the refusal log, and
    logs a malformed request to the login endpoints (refused before any credential check)."""

    def __init__(self, app: ASGIApp, log: RefusedAuthenticationLog) -> None:
        self.app = app
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request with its peer recorded for the refusal log."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        # The TCP peer as the server accepted it: the service honours no forwarding header.
        client = scope.get("client")
        peer = _RequestPeer(str(client[0]) if client else UNKNOWN_ADDRESS)
        login = scope["type"] == "http" and str(scope.get("path", "")).startswith(LOGIN_PATH_PREFIX)

        async def send_and_watch(message: Message) -> None:
            if (
                login
                and message["type"] == "http.response.start"
                and message["status"] in MALFORMED_LOGIN_STATUSES
                and not peer.refusal_logged
            ):
                self.log.refused(MALFORMED_LOGIN_REASON)
            await send(message)

        token = _request_peer.set(peer)
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            _request_peer.reset(token)


PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class MetricsOnlyApp:
    """A minimal ASGI app answering ``GET /metrics`` (and 404 to anything else): what the
    separate metrics address (``metrics_listen``) serves, away from the public API port."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one request, or Hypercorn's lifespan events."""
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        if scope.get("path") == "/metrics" and scope.get("method") in {"GET", "HEAD"}:
            status, body, content_type = 200, self.metrics.exposition(), PROMETHEUS_CONTENT_TYPE
        else:
            status, body, content_type = 404, b"not found: only /metrics is served here\n", (
                "text/plain; charset=utf-8"
            )
        headers = [(b"content-type", content_type.encode()),
                   (b"content-length", str(len(body)).encode())]  # fmt: skip
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
