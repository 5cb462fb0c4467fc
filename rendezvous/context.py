"""Everything a request handler needs, built once per service instance."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from protocol.rate_limits import AddressRateLimiter
from protocol.tokens import VerifiedTokenCache
from rendezvous.config import ServiceConfig
from rendezvous.metrics import ServiceMetrics
from rendezvous.relay_health import RelayHealth
from rendezvous.service_keys import ServiceKeys
from rendezvous.signed_requests import SignedPayloadVerifier
from rendezvous.store import Store

if TYPE_CHECKING:
    from rendezvous.audit_trail import AuditTrail
    from rendezvous.control_channel import AgentConnections


@dataclass(frozen=True)
class StoreFailure:
    """A store operation that failed for want of the database (not a refused value)."""

    reason: str
    at: float


@dataclass
class StoreHealth:
    """What this instance last saw of its store's writes, for ``/healthz``.

    A full disk refuses the writes that need new space while small in-place ones still pass, so
    a failure seen anywhere (the agent channel, the health probe) stands until a health probe
    write, which needs more space than the service's writes do, succeeds again.
    """

    failure: StoreFailure | None = None
    last_good_write: float | None = None

    def failed(self, reason: str, now: float) -> None:
        """Record that the store refused an operation now, for ``reason`` (no secrets in it);
        ``failure.at`` stays the start of an unbroken run of failures."""
        since = self.failure.at if self.failure is not None else now
        self.failure = StoreFailure(reason, since)
        self.last_good_write = None

    def wrote(self, now: float) -> None:
        """Record a successful health probe write: the store takes writes again."""
        self.failure = None
        self.last_good_write = now

    def probe_due(self, now: float, interval: float) -> bool:
        """Whether ``/healthz`` must write now: a failure is known, or the last good write is
        ``interval`` seconds old (or the clock went back)."""
        last = self.last_good_write
        return self.failure is not None or last is None or not 0 <= now - last < interval


def new_instance_id() -> str:
    """A random id naming this service process among instances sharing one database."""
    return "inst_" + secrets.token_hex(8)


@dataclass
class ServiceContext:
    """The configuration, store, keys, metrics, audit trail and clock of one instance."""

    config: ServiceConfig
    store: Store
    keys: ServiceKeys
    audit: AuditTrail
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics)
    clock: Callable[[], float] = time.time
    instance_id: str = field(default_factory=new_instance_id)
    connections: AgentConnections | None = None
    signed_payloads: SignedPayloadVerifier = field(init=False)
    unauthenticated_requests: AddressRateLimiter = field(init=False)
    verified_tokens: VerifiedTokenCache = field(default_factory=VerifiedTokenCache)
    store_health: StoreHealth = field(default_factory=StoreHealth)
    relay_health: RelayHealth = field(default_factory=RelayHealth)

    def __post_init__(self) -> None:
        self.signed_payloads = SignedPayloadVerifier(self.config.clock_skew_seconds)
        self.unauthenticated_requests = AddressRateLimiter(
            self.config.auth_rate_limit, self.config.auth_rate_burst
        )

    def now(self) -> float:
        """The current Unix time as this instance sees it."""
        return self.clock()
