"""The rendezvous's side of the audit log: every sensitive action appends a signed record here.

"No audit, no action": handlers await ``record`` before they return the action's effect, and
a failed append fails the request (503) instead of letting it through unrecorded. Events that no
team can be charged with (a refused registration by an unknown caller) go to ``SERVICE_LOG``.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import AsyncIterator, Mapping
from typing import Any, BinaryIO

from audit.actions import Action, ActorKind
from audit.errors import AuditError, RecordError
from audit.log import AgentEventAppend, AuditLogs
from audit.record import Actor, PolicyResult, SignedEvent
from audit.store import AuditStore
from protocol.identity import PublicIdentity, SigningIdentity
from rendezvous.errors import ServiceUnavailable

logger = logging.getLogger("tucdesk.rendezvous.audit")

SERVICE_LOG = "_service"
ADMIN_COMMAND_ACTOR_ID = "tucdesk-rendezvous"
EXPORT_SPOOL_BYTES = 4 * 1024 * 1024
EXPORT_CHUNK_BYTES = 64 * 1024

__all__ = [
    "SERVICE_LOG",
    "Action",
    "Actor",
    "AuditTrail",
    "agent_actor",
    "caller_actor",
    "operator_actor",
    "service_actor",
    "unauthenticated_actor",
]


def operator_actor(operator: Any) -> Actor:
    """The actor for a store Operator."""
    return Actor(ActorKind.OPERATOR, operator.id, operator.email)


def caller_actor(caller: Any) -> Actor:
    """The actor for an authenticated Principal (operator or API key)."""
    if caller.kind == "operator":
        return Actor(ActorKind.OPERATOR, caller.subject, caller.email or "")
    return Actor(ActorKind.API_KEY, caller.subject, "")


def agent_actor(agent_id: str, display: str = "") -> Actor:
    """The actor for an agent."""
    return Actor(ActorKind.AGENT, agent_id, display)


def service_actor(display: str = "") -> Actor:
    """The rendezvous itself (or its admin command)."""
    return Actor(ActorKind.SERVICE, ADMIN_COMMAND_ACTOR_ID, display)


def unauthenticated_actor(display: str) -> Actor:
    """A caller who proved no identity (display names what it claimed, e.g. a key fingerprint)."""
    return Actor(ActorKind.UNAUTHENTICATED, "unauthenticated", display)


class AuditTrail:
    """Appends signed records to per-team logs in the store, and exports them."""

    def __init__(self, store: AuditStore, signer: SigningIdentity, origin: str) -> None:
        self._logs = AuditLogs(store, signer, origin)

    @property
    def audit_key(self) -> PublicIdentity:
        """The public key that verifies this trail's records and checkpoints."""
        return self._logs.for_team(SERVICE_LOG).audit_key

    async def record(
        self,
        team_id: str,
        *,
        actor: Actor,
        action: Action,
        target: str | None,
        details: Mapping[str, Any],
        session_id: str | None = None,
        policy_result: PolicyResult | None = None,
    ) -> None:
        """Append one signed record; raise ServiceUnavailable if it could not be stored."""
        try:
            await self._logs.for_team(team_id).append(
                action,
                actor,
                target=target,
                session_id=session_id,
                policy_result=policy_result,
                context=dict(details),
            )
        except AuditError as error:
            logger.error("audit append failed for %s: %s", action.value, type(error).__name__)
            raise ServiceUnavailable(
                "the audit log is unavailable, so the action was not carried out"
            ) from None

    async def record_agent_event(
        self, team_id: str, signed: SignedEvent, agent_id: str, agent_key: PublicIdentity
    ) -> AgentEventAppend:
        """Append an event the agent signed (or find it already held, if resent); RecordError if
        it is not the agent's own, valid one.

        Raises ServiceUnavailable if a valid event could not be stored.
        """
        log = self._logs.for_team(team_id)
        try:
            return await log.append_agent_event(signed, agent_id, agent_key)
        except RecordError:
            raise
        except AuditError as error:
            logger.error("agent audit append failed: %s", type(error).__name__)
            raise ServiceUnavailable("the audit log is unavailable; send the event again") from None

    async def export_to(self, team_id: str, stream: BinaryIO) -> None:
        """Write the team's export bundle to ``stream``."""
        await self._logs.for_team(team_id).export(stream)

    async def export(self, team_id: str) -> AsyncIterator[bytes]:
        """The team's export bundle (JSON Lines) in chunks, spooled to disk when large."""
        with tempfile.SpooledTemporaryFile(max_size=EXPORT_SPOOL_BYTES) as spool:
            await self.export_to(team_id, spool)  # type: ignore[arg-type]
            spool.seek(0)
            while chunk := spool.read(EXPORT_CHUNK_BYTES):
                yield chunk
