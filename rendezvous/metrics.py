"""Prometheus metrics of one rendezvous instance, on its own registry, and their ASGI timer.

Under ``serve --workers N`` every worker process writes its values to files in the private
directory named by ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, chosen
when the library is imported), and ``/metrics`` on any worker reports the sum over all of them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
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
        self.auth_failures = Counter(
            "tucdesk_auth_failures_total",
            "Refused authentications by reason.",
            ["reason"],
            registry=self.registry,
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
