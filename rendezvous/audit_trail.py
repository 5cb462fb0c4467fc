"""The rendezvous's side of the audit log: every sensitive action appends a signed record here.

"No audit, no action": handlers await ``record`` before they return the action's effect, and
a failed append fails the request (503) instead of letting it through unrecorded. Events that no
team can be charged with (a refused registration by an unknown caller) go to ``SERVICE_LOG``.

An authenticated caller's refused request is recorded with ``record_refusal`` in the caller's
own team log: the id it sent, capped (``refused_id``), and a reason code. A refusal whose record
cannot be appended still stands (logged, never a 503): nothing happened for the log to hold
back, and the caller gets the same answer either way. Refusal records are budgeted per caller
(``RefusalBudget``) so that no caller can grow the log without bound by being refused: one over
the budget is counted, not recorded, and the caller's next recorded refusal carries the count
(``suppressed``), so the log never loses the fact that refusals happened.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
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
# Refusal records a caller (team, actor kind, actor id) may add per minute on one instance, and
# how many at once: a token bucket. Beyond it a refusal is counted, not recorded (its answer is
# the same), and the caller's next recorded refusal carries the count as ``suppressed``.
REFUSAL_RECORDS_PER_MINUTE = 20
REFUSAL_RECORDS_BURST = 20
# Callers whose budget one instance remembers (least recently refused forgotten first).
REFUSAL_BUDGET_CALLERS = 10_000
# A caller being suppressed is named in the service log at most this often.
SUPPRESSION_WARNING_SECONDS = 60.0
# The context key of a recorded refusal that stands for refusals not recorded before it.
SUPPRESSED_KEY = "suppressed"

__all__ = [
    "REFUSED_NOT_FOUND",
    "REFUSED_NOT_PERMITTED",
    "SERVICE_LOG",
    "Action",
    "Actor",
    "AuditTrail",
    "RefusalBudget",
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


CallerKey = tuple[str, str, str]


@dataclass
class _CallerBudget:
    tokens: float
    refilled_at: float
    suppressed: int = 0
    warned_at: float | None = None


class RefusalBudget:
    """Per-caller token buckets for refusal records on this instance, in memory, for at most
    ``max_callers`` callers (least recently refused evicted first, a pending count logged)."""

    def __init__(
        self,
        per_minute: float = REFUSAL_RECORDS_PER_MINUTE,
        burst: int = REFUSAL_RECORDS_BURST,
        max_callers: int = REFUSAL_BUDGET_CALLERS,
        clock: Callable[[], float] = time.monotonic,
        on_suppressed: Callable[[], None] | None = None,
    ) -> None:
        """``on_suppressed`` is called for each refusal counted, not recorded (for a metric)."""
        self._per_minute = per_minute
        self._per_second = per_minute / 60.0
        self._burst = float(burst)
        self._max_callers = max_callers
        self._clock = clock
        self._callers: OrderedDict[CallerKey, _CallerBudget] = OrderedDict()
        self._on_suppressed = on_suppressed
        self.suppressed_total = 0

    def take(self, caller: CallerKey) -> int | None:
        """None if ``caller``'s refusal is over budget (counted); else the count of its refusals
        not recorded since its last record, which the record now carries (and clears)."""
        now = self._clock()
        budget = self._callers.get(caller)
        if budget is None:
            budget = _CallerBudget(tokens=self._burst, refilled_at=now)
            self._callers[caller] = budget
            self._evict_beyond_limit()
        else:
            self._callers.move_to_end(caller)
            elapsed = max(0.0, now - budget.refilled_at)
            budget.tokens = min(self._burst, budget.tokens + elapsed * self._per_second)
            budget.refilled_at = now
        if budget.tokens >= 1.0:
            budget.tokens -= 1.0
            carried, budget.suppressed = budget.suppressed, 0
            return carried
        budget.suppressed += 1
        self.suppressed_total += 1
        if self._on_suppressed is not None:
            self._on_suppressed()
        if budget.warned_at is None or now - budget.warned_at >= SUPPRESSION_WARNING_SECONDS:
            budget.warned_at = now
            team_id, kind, actor_id = caller
            logger.warning(
                "refusals of %s %s (team %s) are over the budget of %g records a minute: "
                "counted, not recorded, until the budget allows the next one (%d so far)",
                kind, actor_id, team_id, self._per_minute, budget.suppressed,
            )  # fmt: skip
        return None

    def restore(self, caller: CallerKey, carried: int) -> None:
        """Give back a count ``take`` cleared whose record could not be appended."""
        if carried <= 0:
            return
        budget = self._callers.get(caller)
        if budget is None:
            logger.warning("%d unrecorded refusals of %s %s (team %s) are no longer counted",
                           carried, caller[1], caller[2], caller[0])  # fmt: skip
            return
        budget.suppressed += carried

    def _evict_beyond_limit(self) -> None:
        while len(self._callers) > self._max_callers:
            (team_id, kind, actor_id), budget = self._callers.popitem(last=False)
            if budget.suppressed:
                # Forgotten callers' counts would vanish from the log: the service log keeps them.
                logger.warning(
                    "%d refusals of %s %s (team %s) were not recorded (over the refusal budget) "
                    "and are no longer counted: too many callers refused at once",
                    budget.suppressed, kind, actor_id, team_id,
                )  # fmt: skip


class AuditTrail:
    """Appends signed records to per-team logs in the store, and exports them."""

    def __init__(
        self,
        store: AuditStore,
        signer: SigningIdentity,
        origin: str,
        refusal_budget: RefusalBudget | None = None,
    ) -> None:
        self._logs = AuditLogs(store, signer, origin)
        self.refusal_budget = RefusalBudget() if refusal_budget is None else refusal_budget

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
        """Append the record of a refused request, within the caller's refusal budget; False if
        it was over budget (counted) or could not be stored (logged, not raised: the refusal
        stands, so the caller's answer does not change)."""
        caller: CallerKey = (team_id, actor.kind.value, actor.id)
        carried = self.refusal_budget.take(caller)
        if carried is None:
            return False
        context = dict(details)
        if carried:
            context[SUPPRESSED_KEY] = carried
        try:
            await self.record(team_id, actor=actor, action=action, target=target,
                              details=context)  # fmt: skip
        except ServiceUnavailable:
            self.refusal_budget.restore(caller, carried)
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
