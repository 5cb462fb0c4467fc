"""Agent-signed audit events after the agent's removal are refused by the rendezvous.

On several instances a removed agent's control channel on another instance stays open until that
instance hears the notice or runs its next heartbeat check; what the agent signs meanwhile must
not land in the log after the ``agent.removed`` record. The removal is made here as another
instance makes it: in the store, with no notice to this instance (heartbeats far apart).
"""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio

from audit.actions import Action, ActorKind
from audit.record import Actor, AuditEvent, sign_event
from audit.trust import REMOVED_AGENT_CLOCK_SKEW
from audit.verify import verify_bundle
from rendezvous import control_channel
from rendezvous.control_channel import (
    AGENT_REMOVED_EVENT_REASON,
    CLOSE_AGENT_REMOVED,
    REMOVED_REASON,
)
from rendezvous.store import Store
from tests.rendezvous.service_harness import ServiceHarness
from tests.rendezvous.sessions_support import (
    AgentChannel,
    agent_channel,
    enroll_agent,
    served_instance,
)
from tests.rendezvous.test_agent_reconnect import closed_by_server

pytestmark = pytest.mark.anyio

WAIT_SECONDS = 15
# Heartbeats far apart: the channel stays open after the removal, as on another instance.
SLOW_HEARTBEATS = {"heartbeat_seconds": 600.0, "heartbeat_timeout_seconds": 1800.0}
REJECTED_EVENTS = {"reason": "agent_audit_event"}


def long_ago(service: ServiceHarness) -> float:
    """A removal time the events the test signs now come after by more than the allowance."""
    return service.clock.now - REMOVED_AGENT_CLOCK_SKEW.total_seconds() - 60


async def send_dated(
    channel: AgentChannel, action: Action, session_id: str, occurred_at: float, event_id: str
) -> dict[str, object]:
    """Sign an event dated ``occurred_at`` (the agent chooses its events' dates) and send it;
    the server's answer."""
    agent = channel.agent
    event = AuditEvent(
        occurred_at=datetime.fromtimestamp(occurred_at, UTC),
        team_id=agent.team_id,
        actor=Actor(ActorKind.AGENT, agent.agent_id, agent.name),
        action=action,
        signer=agent.identity.public.key_id,
        session_id=session_id,
    )
    signed = sign_event(agent.identity, event).to_json()
    await channel.send({"type": "audit_event", "event": signed, "id": event_id})
    while True:
        message = await channel.receive()
        if str(message.get("type", "")).startswith("audit_event_"):
            return message


def rejected_events(service: ServiceHarness) -> float:
    registry = service.ctx.metrics.registry
    return registry.get_sample_value("tucdesk_rejected_inputs_total", REJECTED_EVENTS) or 0.0


async def test_an_event_signed_after_the_removal_is_refused_and_counted(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data", **SLOW_HEARTBEATS) as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            response = await service.call(admin, "POST", "/v1/sessions",
                                          {"target": "web-1", "mode": "shell"})  # fmt: skip
            assert response.status_code in (200, 201), response.text
            session_id = response.json()["session_id"]
            await channel.receive("session_offer")
            started = await channel.send_event(
                Action.SESSION_STARTED, session_id=session_id, event_id="before"
            )
            assert started["type"] == "audit_event_ack", started
            await store.remove_agent(team, agent.agent_id, long_ago(service))
            ended = await channel.send_event(
                Action.SESSION_ENDED, session_id=session_id, event_id="after"
            )
            assert ended == {
                "type": "audit_event_refused",
                "id": "after",
                "reason": AGENT_REMOVED_EVENT_REASON,
            }
        assert rejected_events(service) == 1
        actions = await service.audit_actions(team)
        assert "session.started" in actions and "session.ended" not in actions
        bundle = io.BytesIO()
        await service.ctx.audit.export_to(team, bundle)
        result = verify_bundle(io.BytesIO(bundle.getvalue()), [service.ctx.audit.audit_key])
        assert result.ok, result.summary()


async def test_an_event_signed_before_the_removal_and_delivered_after_it_is_kept(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data", **SLOW_HEARTBEATS) as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            response = await service.call(admin, "POST", "/v1/sessions",
                                          {"target": "web-1", "mode": "shell"})  # fmt: skip
            assert response.status_code in (200, 201), response.text
            session_id = response.json()["session_id"]
            await channel.receive("session_offer")
            # Removed (on another instance) a minute after the agent signed what it sends now.
            await store.remove_agent(team, agent.agent_id, time.time() + 60)
            ended = await channel.send_event(
                Action.SESSION_ENDED, session_id=session_id, event_id="late"
            )
            assert ended == {"type": "audit_event_ack", "id": "late"}, ended
            # The rest it spooled before the removal follows on the same channel, taken alike.
            started = await channel.send_event(
                Action.SESSION_STARTED, session_id=session_id, event_id="late-2"
            )
            assert started == {"type": "audit_event_ack", "id": "late-2"}, started
            # Its next heartbeat closes the channel: the server now knows the agent is gone.
            await channel.send({"type": "heartbeat"})
            closed = await closed_by_server(channel)
        assert closed.reason.code == CLOSE_AGENT_REMOVED
        assert rejected_events(service) == 0
        assert "session.ended" in await service.audit_actions(team)
        bundle = io.BytesIO()
        await service.ctx.audit.export_to(team, bundle)
        result = verify_bundle(io.BytesIO(bundle.getvalue()), [service.ctx.audit.audit_key])
        assert result.ok, result.summary()


async def test_an_event_dated_before_a_removal_long_past_is_refused_and_the_channel_closed(
    store: Store, tmp_path: Path
) -> None:
    # The agent chooses its events' dates: a removed agent kept on a channel (another instance
    # missed the notice, the agent skips heartbeats) could back-date events for ever.
    async with served_instance(store, tmp_path / "data", **SLOW_HEARTBEATS) as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            response = await service.call(admin, "POST", "/v1/sessions",
                                          {"target": "web-1", "mode": "shell"})  # fmt: skip
            assert response.status_code in (200, 201), response.text
            session_id = response.json()["session_id"]
            await channel.receive("session_offer")
            removed_at = service.clock.now - 3600  # an hour ago, on another instance
            await store.remove_agent(team, agent.agent_id, removed_at)
            answer = await send_dated(
                channel, Action.SESSION_ENDED, session_id, removed_at - 10, "backdated"
            )
            assert answer == {
                "type": "audit_event_refused",
                "id": "backdated",
                "reason": AGENT_REMOVED_EVENT_REASON,
            }
            closed = await closed_by_server(channel)
        assert closed.reason.code == CLOSE_AGENT_REMOVED
        assert closed.reason.reason == REMOVED_REASON
        assert rejected_events(service) == 1
        assert "session.ended" not in await service.audit_actions(team)
        row = await store.get_session(team, session_id)
        assert row is not None and row.state.value == "offered"


async def test_any_message_of_a_removed_agent_closes_its_channel(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not only heartbeats: an agent skipping them is kept on by its other messages.
    monkeypatch.setattr(control_channel, "REMOVAL_CHECK_SECONDS", 0.0, raising=False)
    async with served_instance(store, tmp_path / "data", **SLOW_HEARTBEATS) as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            await channel.send({"type": "session_offer_ack", "session_id": "ses_other"})
            await store.remove_agent(team, agent.agent_id, service.clock.now)
            await channel.send({"type": "session_offer_ack", "session_id": "ses_other"})
            closed = await closed_by_server(channel)
        assert closed.reason.code == CLOSE_AGENT_REMOVED
        assert closed.reason.reason == REMOVED_REASON


async def test_the_agent_drops_a_refused_event_instead_of_sending_it_again(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Imported here: the agent package is only this test's concern in this file.
    from agent.control_client import ControlClient, ReconnectBackoff
    from agent.enrollment import EnrollmentRequest, enroll
    from agent.machine_identity import MachineIdentifiers

    machine = MachineIdentifiers(machine_id="0123456789abcdef0123456789abcdef")
    async with served_instance(store, tmp_path / "data", **SLOW_HEARTBEATS) as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        key = await service.registration_key(admin)
        state = await enroll(
            EnrollmentRequest(url, key["key"], tmp_path / "state" / "agent.state"), machine
        )
        client = ControlClient(
            state, machine.fingerprint(), lambda offer: None,
            backoff=ReconnectBackoff(initial=0.01, cap=0.02),
        )  # fmt: skip
        identity = state.identity()
        event = AuditEvent(
            occurred_at=datetime.now(UTC),
            team_id=state.team_id,
            actor=Actor(ActorKind.AGENT, state.agent_id, state.name),
            action=Action.SESSION_ENDED,
            signer=identity.public.key_id,
            session_id="ses_spooled",
        )
        caplog.set_level("WARNING", logger="tucdesk.agent.control")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            with trio.fail_after(WAIT_SECONDS):
                await client.wait_connected()
            await store.remove_agent(team, state.agent_id, long_ago(service))
            client.send_audit_event(sign_event(identity, event))
            with trio.fail_after(WAIT_SECONDS):
                while client.pending_audit_events:  # noqa: ASYNC110 - answered by the server
                    await trio.sleep(0.02)
            # Not sent again: the server counts no second refusal.
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
        assert client.refused_audit_events == 1 and client.pending_audit_events == 0
        assert rejected_events(service) == 1
        logged = [record.getMessage() for record in caplog.records]
        assert any(AGENT_REMOVED_EVENT_REASON in line for line in logged), logged
