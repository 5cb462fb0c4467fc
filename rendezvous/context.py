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
from rendezvous.service_keys import ServiceKeys
from rendezvous.signed_requests import SignedPayloadVerifier
from rendezvous.store import Store

if TYPE_CHECKING:
    from rendezvous.audit_trail import AuditTrail
    from rendezvous.control_channel import AgentConnections


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

    def __post_init__(self) -> None:
        self.signed_payloads = SignedPayloadVerifier(self.config.clock_skew_seconds)
        self.unauthenticated_requests = AddressRateLimiter(
            self.config.auth_rate_limit, self.config.auth_rate_burst
        )

    def now(self) -> float:
        """The current Unix time as this instance sees it."""
        return self.clock()
