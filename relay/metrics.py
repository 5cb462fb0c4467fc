"""The relay's Prometheus metrics, in a registry of their own so relays can share a process."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from relay.wire import PROBE_ANSWERS, REFUSAL_REASONS, SESSION_END_REASONS

TRANSPORTS = ("tcp", "udp")
DATAGRAM_DROP_REASONS = (
    "unknown_source",
    "malformed",
    "bad_credential",
    "stale_counter",
    "bandwidth",
    "send_failed",
)
KEY_RELOAD_RESULTS = ("ok", "failed")
# Counted with the refusals but never sent: the client left before the relay had its hello.
HELLO_ABANDONED = "hello_abandoned"
# Why a connection still in its hello phase was dropped (it is also refused with
# too_many_connections, which a client may retry: its token was never read).
PER_SOURCE_CAP = "per_source_cap"
OLDEST_DROPPED = "oldest_dropped"
PENDING_DROP_REASONS = (PER_SOURCE_CAP, OLDEST_DROPPED)
# Why accept() failed; under too_many_open_files the relay sheds the connection it could not
# take (with its spare descriptor) instead of leaving it in the backlog.
TOO_MANY_OPEN_FILES = "too_many_open_files"
ACCEPT_FAILURE_REASONS = (TOO_MANY_OPEN_FILES, "out_of_memory", "other")
PAIRING_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0)


class RelayMetrics:
    """Every metric the relay exports; each refusal reason is present from the start at zero."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Called before every exposition: counters kept elsewhere between scrapes catch up.
        self.before_collect: list[Callable[[], None]] = []
        self.sessions_active = Gauge(
            "tucdesk_relay_sessions_active", "Paired sessions now forwarding.",
            ["transport"], registry=self.registry,
        )
        self.sessions_waiting = Gauge(
            "tucdesk_relay_sessions_waiting", "Sides waiting for their peer.",
            ["transport"], registry=self.registry,
        )
        self.connections_pending = Gauge(
            "tucdesk_relay_connections_pending", "TCP connections that have not finished a hello.",
            registry=self.registry,
        )
        self.probes = Counter(
            "tucdesk_relay_probes", "Health-check probes answered, by answer (ok, "
            "shutting_down, too_many_sessions, no_keys).", ["answer"], registry=self.registry,
        )
        self.connections_accepted = Counter(
            "tucdesk_relay_connections_accepted",
            "TCP connections accepted, before any check (refused ones too).",
            registry=self.registry,
        )
        self.accept_failures = Counter(
            "tucdesk_relay_accept_failures", "Failed accept() calls on a listener, by reason.",
            ["listener", "reason"], registry=self.registry,
        )
        self.pending_dropped = Counter(
            "tucdesk_relay_pending_dropped",
            "TCP connections still in their hello refused or dropped by a limit, by reason: "
            "per_source_cap (their source had too many hellos open), oldest_dropped (the "
            "oldest hello, to make room when max_pending were open).",
            ["reason"], registry=self.registry,
        )
        self.bytes_forwarded = Counter(
            "tucdesk_relay_bytes_forwarded", "Payload bytes forwarded between paired sides.",
            ["transport"], registry=self.registry,
        )
        self.datagrams_forwarded = Counter(
            "tucdesk_relay_datagrams_forwarded", "UDP datagrams forwarded between paired sides.",
            registry=self.registry,
        )
        self.datagrams_dropped = Counter(
            "tucdesk_relay_datagrams_dropped", "UDP datagrams dropped, by reason.",
            ["reason"], registry=self.registry,
        )
        self.refusals = Counter(
            "tucdesk_relay_refusals", "Clients refused, by reason code.",
            ["transport", "reason"], registry=self.registry,
        )
        self.sessions_closed = Counter(
            "tucdesk_relay_sessions_closed", "Paired sessions ended, by close reason.",
            ["transport", "reason"], registry=self.registry,
        )
        self.sessions_paired = Counter(
            "tucdesk_relay_sessions_paired", "Sessions whose two sides were paired.",
            ["transport"], registry=self.registry,
        )
        self.pairing_latency = Histogram(
            "tucdesk_relay_pairing_latency_seconds",
            "Time from the first side's hello to pairing.",
            ["transport"], buckets=PAIRING_LATENCY_BUCKETS, registry=self.registry,
        )
        self.jwks_refresh_failures = Counter(
            "tucdesk_relay_jwks_refresh_failures",
            "JWKS refreshes that failed (the relay kept its previous relay-token keys).",
            registry=self.registry,
        )
        self.key_reloads = Counter(
            "tucdesk_relay_key_reloads",
            "Token-key reloads on SIGHUP (--token-key files or --jwks), by result.",
            ["result"], registry=self.registry,
        )
        for result in KEY_RELOAD_RESULTS:
            self.key_reloads.labels(result)
        for transport in TRANSPORTS:
            self.sessions_active.labels(transport)
            self.sessions_waiting.labels(transport)
            self.bytes_forwarded.labels(transport)
            self.sessions_paired.labels(transport)
            self.pairing_latency.labels(transport)
            for reason in REFUSAL_REASONS:
                self.refusals.labels(transport, reason.value)
        self.refusals.labels("tcp", HELLO_ABANDONED)
        for answer in PROBE_ANSWERS:
            self.probes.labels(answer.value)
        for pending_reason in PENDING_DROP_REASONS:
            self.pending_dropped.labels(pending_reason)
        for listener in ("relay", "metrics"):
            for failure in ACCEPT_FAILURE_REASONS:
                self.accept_failures.labels(listener, failure)
            for reason in SESSION_END_REASONS:
                self.sessions_closed.labels(transport, reason.value)
        for drop in DATAGRAM_DROP_REASONS:
            self.datagrams_dropped.labels(drop)

    def refusal_count(self, transport: str, reason: str) -> float:
        """The current count of refusals for ``reason`` (for tests and the shutdown summary)."""
        value = self.registry.get_sample_value(
            "tucdesk_relay_refusals_total", {"transport": transport, "reason": reason}
        )
        return value or 0.0

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric (counters brought up to date first)."""
        for catch_up in self.before_collect:
            catch_up()
        return generate_latest(self.registry)
