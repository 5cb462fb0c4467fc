"""Verifying protocol.signed_payload envelopes sent to the service: skew, signature and replay.

Nonces are checked twice: in this instance's NonceCache (fast) and in the store, which all
instances sharing a database see, so a payload replayed to another instance is refused too.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

from protocol.domains import Purpose
from protocol.errors import ReplayError
from protocol.identity import PublicIdentity
from protocol.nonce_cache import NonceCache
from protocol.signed_payload import VerifiedPayload, verify_signed_payload

if TYPE_CHECKING:
    from rendezvous.context import ServiceContext


class SignedPayloadVerifier:
    """Verify envelopes for one instance, remembering nonces locally and in the store."""

    # Payloads that spend a single-use credential in the same transaction need no shared nonce:
    # a replay to another instance finds the credential spent. The local cache still applies.
    SINGLE_USE_PURPOSES = frozenset({Purpose.REGISTER, Purpose.OPERATOR_ENROLL})

    def __init__(self, skew_seconds: float) -> None:
        self.skew_seconds = skew_seconds
        self.nonces = NonceCache(ttl=2 * skew_seconds + 1)

    async def verify(
        self,
        ctx: ServiceContext,
        envelope: dict[str, Any],
        purpose: Purpose,
        key: PublicIdentity,
    ) -> VerifiedPayload:
        """The verified payload; raises PayloadError, ReplayError or SignatureError."""
        now = ctx.now()
        verified = verify_signed_payload(
            envelope, purpose, key, now, self.skew_seconds, self.nonces
        )
        if purpose in self.SINGLE_USE_PURPOSES:
            return verified
        scope = purpose.value
        nonce_key = hashlib.sha256(key.raw + verified.nonce.encode("ascii")).hexdigest()
        if not await ctx.store.remember_nonce(scope, nonce_key, now + 2 * self.skew_seconds, now):
            raise ReplayError("payload nonce was already used")
        return verified
