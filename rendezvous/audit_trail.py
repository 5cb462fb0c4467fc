"""The rendezvous's side of the audit log: every sensitive action appends a signed record here.

"No audit, no action": handlers await ``record`` before they return the action's effect, and
a failed append fails the request (503) instead of letting it through unrecorded. Events that no
team can be charged with (a refused registration by an unknown caller) go to ``SERVICE_LOG``.

An authenticated caller's refused request is recorded with ``record_refusal`` in the caller's
own team log: the id it sent, capped (``refused_id``), and a reason code. A refusal whose record
cannot be appended still stands (logged, never a 503): nothing happened for the log to hold
back, and the caller gets the same answer either way.
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
# Characters of a caller-sent id kept in a refusal's record (the ids the rendezvous issues are
# far shorter; a request path may be kilobytes).
MAX_REFUSED_ID_LENGTH = 128
# Refusal reasons shared by the routes: the id is not in the caller's team (also when it is
# another team's: both answer, and are recorded, the same), or the caller's role or API key
# scopes do not allow the request.
REFUSED_NOT_FOUND = "not_found"
REFUSED_NOT_PERMITTED = "not_permitted"

__all__ = [
    "REFUSED_NOT_FOUND",
    "REFUSED_NOT_PERMITTED",
    "SERVICE_LOG",
    "Action",
    "Actor",
    "AuditTrail",
    "agent_actor",
    "caller_actor",
    "operator_actor",
    "refused_id",
    "service_actor",
    "unauthenticated_actor",
]


def refused_id(sent: str) -> str:
    """The id a refused request named, as sent, capped at MAX_REFUSED_ID_LENGTH characters."""
    return sent[:MAX_REFUSED_ID_LENGTH]


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

    async def record_refusal(
        self,
        team_id: str,
        *,
        actor: Actor,
        action: Action,
        target: str,
        details: Mapping[str, Any],
    ) -> bool:
        """Append the record of a refused request; False if it could not be stored (logged,
        not raised: the refusal stands, so the caller's answer does not change)."""
        try:
            await self.record(team_id, actor=actor, action=action, target=target,
                              details=details)  # fmt: skip
        except ServiceUnavailable:
            # The target is caller-sent text: the log names only the action and reason code.
            logger.error("a refused request (%s, reason %s) stands unrecorded",
                         action.value, str(details.get("reason", ""))[:64])  # fmt: skip
            return False
        return True

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
