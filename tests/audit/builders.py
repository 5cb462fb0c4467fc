"""Deterministic keys, clocks and bundles for the audit tests."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import trio

from audit.actions import Action, ActorKind, PolicyOutcome
from audit.log import AuditLog
from audit.record import Actor, AuditEvent, PolicyResult, SignedEvent, sign_event
from audit.store import MemoryAuditStore
from audit.trust import agent_registration_context
from audit.verify import verify_bundle
from protocol.identity import SigningIdentity

DEPLOYMENT = "desk.example.com"
TEAM = "team-7"
AGENT_ID = "agent-1"
START = datetime(2026, 11, 26, 10, 0, tzinfo=UTC)
AUDIT_KEY = SigningIdentity.from_seed(bytes([1]) * 32)
AGENT_KEY = SigningIdentity.from_seed(bytes([2]) * 32)
OTHER_KEY = SigningIdentity.from_seed(bytes([3]) * 32)
OPERATOR = Actor(ActorKind.OPERATOR, "op-1", "alice@example.com")
SERVICE = Actor(ActorKind.SERVICE, "rendezvous")


class StepClock:
    """A clock that advances one millisecond per reading."""

    def __init__(self, start: datetime = START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=1)
        return self.now


def new_log(
    store: MemoryAuditStore | None = None,
    clock: Callable[[], datetime] | None = None,
    team: str = TEAM,
    key: SigningIdentity = AUDIT_KEY,
) -> AuditLog:
    """A log for TEAM on a fresh (or given) in-memory store with a stepping clock."""
    return AuditLog(store or MemoryAuditStore(), key, DEPLOYMENT, team, clock=clock or StepClock())


def agent_event(
    action: Action = Action.SESSION_COMMAND,
    *,
    when: datetime = START,
    key: SigningIdentity = AGENT_KEY,
    agent_id: str = AGENT_ID,
    team: str = TEAM,
    context: dict[str, object] | None = None,
    session_id: str = "s-1",
) -> SignedEvent:
    """An event signed on the host by an agent."""
    event = AuditEvent(
        occurred_at=when,
        team_id=team,
        actor=Actor(ActorKind.AGENT, agent_id, "web-1"),
        action=action,
        signer=key.public.key_id,
        session_id=session_id,
        context=context or {"command": "uname -a", "exit_code": 0},  # type: ignore[arg-type]
    )
    return sign_event(key, event)


async def register_agent(
    log: AuditLog, key: SigningIdentity = AGENT_KEY, agent_id: str = AGENT_ID
) -> None:
    """Append the audit-key-signed agent.registered record that introduces ``key``."""
    await log.append(
        Action.AGENT_REGISTERED,
        SERVICE,
        target=agent_id,
        context=agent_registration_context(key.public, hostname="web-1"),
    )


async def typical_history(log: AuditLog, commands: int = 3) -> None:
    """A registration (on an empty log: an agent id is registered once), a decision,
    agent-signed session records and an end."""
    if await log.size() == 0:
        await register_agent(log)
    else:  # as many records as the first time
        await log.append(Action.AGENT_CONNECTED, SERVICE, target=AGENT_ID)
    await log.append(
        Action.SESSION_DECISION,
        OPERATOR,
        target=AGENT_ID,
        session_id="s-1",
        policy_result=PolicyResult(PolicyOutcome.ALLOW, "rule-1", "allowlisted command"),
        context={"command": "uname -a", "client_address": "127.0.0.1"},
    )
    for index in range(commands):
        # Dated by the log's size, so a second history on one log holds new events, not resends.
        when = START + timedelta(microseconds=await log.size())
        await log.append_agent_event(
            agent_event(when=when, context={"command": f"echo {index}", "exit_code": index % 2}),
            AGENT_ID,
            AGENT_KEY.public,
        )
    await log.append(Action.SESSION_ENDED, OPERATOR, session_id="s-1", context={"bytes": 42})


@dataclass
class Exported:
    """A bundle and the checkpoint notes taken along the way."""

    bundle: bytes
    checkpoints: list[bytes] = field(default_factory=list)

    def lines(self) -> list[bytes]:
        """The bundle split into lines, each keeping its newline."""
        return self.bundle.splitlines(keepends=True)


def export_bundle(log: AuditLog, previous: bytes | None = None) -> bytes:
    """Export ``log`` (synchronously) and return the bundle bytes."""
    buffer = io.BytesIO()

    async def run() -> None:
        await log.export(buffer, previous_checkpoint=previous)

    trio.run(run)
    return buffer.getvalue()


def verifies(bundle: bytes) -> bool:
    """True if ``bundle`` verifies against the pinned audit key (fails the test otherwise)."""
    result = verify_bundle(io.BytesIO(bundle), [AUDIT_KEY.public])
    assert result.ok, result.summary()
    return True


def typical_bundle(commands: int = 3, with_previous: bool = False) -> Exported:
    """A bundle of a typical history; optionally carrying an earlier checkpoint and proof."""
    log = new_log()
    notes: list[bytes] = []

    async def run() -> None:
        await typical_history(log, commands)
        notes.append((await log.checkpoint()).note)
        await log.append(Action.AUDIT_EXPORTED, OPERATOR, context={"format": "jsonl"})

    trio.run(run)
    return Exported(export_bundle(log, notes[0] if with_previous else None), notes)
