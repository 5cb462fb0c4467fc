"""Admission: who may talk to the relay. Rate limits, token checks, replay refusal and pairing.

Every refusal goes through ``refuse`` so each one is counted under its reason code and logged
(rate-limited, relay/refusal_log.py). The token checks run offline against the pinned keys; a
token id is remembered only after its signature verified, so forged tokens cannot fill the replay
cache.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from protocol.errors import ReplayError, TokenError
from protocol.nonce_cache import NonceCache
from protocol.rate_limits import AddressRateLimiter, TokenBucket
from protocol.relay_token import (
    TOKEN_ID_MEMORY_SECONDS,
    RelayTokenClaims,
    RelayTokenExpiredError,
    RelayTokenWrongRelayError,
    verify_relay_token,
)
from relay.config import RelayConfig
from relay.keyset import TokenKeySet
from relay.metrics import RelayMetrics
from relay.pairing import PairingRegistry
from relay.refusal_log import RefusalLog
from relay.wire import Reason

MIN_TOKEN_ID_CACHE_SIZE = 100_000
# check_token refusals for tokens whose signature verified: their ids may be logged.
SIGNED_TOKEN_REFUSALS = frozenset({Reason.WRONG_RELAY, Reason.TOKEN_EXPIRED, Reason.TOKEN_REUSED})


class Admission:
    """Shared admission state for the TCP and UDP front ends of one relay."""

    def __init__(
        self, config: RelayConfig, key_set: TokenKeySet, metrics: RelayMetrics, now: float
    ) -> None:
        self.config = config
        self.key_set = key_set
        self.metrics = metrics
        self.shutting_down = False
        self.refusal_log = RefusalLog()
        self.address_limiter = AddressRateLimiter(config.rate_limit, config.rate_burst)
        self.token_ids = NonceCache(
            ttl=TOKEN_ID_MEMORY_SECONDS,
            capacity=max(MIN_TOKEN_ID_CACHE_SIZE, 4 * config.max_sessions),
        )
        self.registry: PairingRegistry[object] = PairingRegistry(
            max_sessions=config.max_sessions, max_waiting=config.max_waiting
        )
        self.total_bandwidth: TokenBucket | None = (
            TokenBucket(config.total_bandwidth, max(config.total_bandwidth, 65536), now)
            if config.total_bandwidth > 0
            else None
        )

    def refuse(
        self,
        transport: str,
        reason: Reason,
        *,
        peer: Callable[[], str] | str = "unknown",
        claims: RelayTokenClaims | None = None,
        token: str | None = None,
    ) -> Reason:
        """Count a refusal under its reason code, log it (rate-limited) and return the reason.

        ``peer`` may be a function, called only if the line is written. ``token``: the token a
        check_token refusal was for; its ids are logged only if its signature verified.
        """
        self.metrics.refusals.labels(transport, reason.value).inc()
        if reason not in SIGNED_TOKEN_REFUSALS:
            token = None
        self.refusal_log.refused(
            trio.current_time(), transport, reason.value,
            peer=peer, claims=claims, token=token,
        )
        return reason

    def address_allowed(self, host: str, now: float) -> bool:
        """Whether a new connection or hello from ``host`` is within the per-address rate."""
        return self.address_limiter.allow(host, now)

    def check_token(self, token: str, now_wall: float) -> RelayTokenClaims | Reason:
        """Verify a relay token and refuse a reused one; return its claims or the refusal reason."""
        try:
            claims = verify_relay_token(
                token,
                self.key_set.keys,
                relay_id=self.config.relay_id,
                issuer=self.config.issuer,
                now=now_wall,
            )
        except RelayTokenExpiredError:
            return Reason.TOKEN_EXPIRED
        except RelayTokenWrongRelayError:
            return Reason.WRONG_RELAY
        except TokenError:
            return Reason.TOKEN_INVALID
        try:
            self.token_ids.check_and_remember(claims.token_id, now_wall)
        except ReplayError:
            return Reason.TOKEN_REUSED
        return claims

    def session_bucket(self, now: float) -> TokenBucket | None:
        """A fresh per-session bandwidth bucket, or None when sessions are not capped."""
        rate = self.config.session_bandwidth
        if rate <= 0:
            return None
        return TokenBucket(rate, max(rate / 4, 16384), now)
