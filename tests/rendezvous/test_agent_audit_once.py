"""Agent-signed audit events are stored once per team, however often and wherever they arrive.

An agent resends an event whose ack it never saw (the channel dropped), on the same connection
or the next one, possibly to another rendezvous instance: every copy is acknowledged, the log
holds one record, and the export still verifies with ``tucdesk-audit verify``. Each resend is
counted (``tucdesk_agent_audit_events_total{outcome="already_held"}``) and logged by ids only.
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from audit.actions import Action, ActorKind
from audit.log import AuditLogs
from audit.record import Actor, AuditEvent, AuditRecord, SignedEvent, sign_event
from audit.trust import agent_registration_context
from audit.verify import Verdict, verify_bundle
from protocol.identity import SigningIdentity
from rendezvous.store import AlreadyExists, Store, open_store
from rendezvous.store.sql_store import SqlStore
from tests.audit.store_contract import fake_record, new_team
from tests.rendezvous.sessions_support import (
    AgentChannel,
    EnrolledAgent,
    agent_channel,
    enroll_agent,
    served_instance,
)

pytestmark = pytest.mark.anyio

WAIT_SECONDS = 15


def _signed(
    agent: EnrolledAgent, session_id: str, when: datetime, command: str = "id"
) -> SignedEvent:
    event = AuditEvent(
        occurred_at=when,
        team_id=agent.team_id,
        actor=Actor(ActorKind.AGENT, agent.agent_id, agent.name),
        action=Action.SESSION_COMMAND,
        signer=agent.identity.public.key_id,
        session_id=session_id,
        context={"command": command},
    )
    return sign_event(agent.identity, event)


async def _send(channel: AgentChannel, signed: SignedEvent, event_id: str) -> dict[str, Any]:
    await channel.send({"type": "audit_event", "event": signed.to_json(), "id": event_id})
    with trio.fail_after(WAIT_SECONDS):
        while True:
            answer = await channel.receive()
            if answer.get("type", "").startswith("audit_event_"):
                return answer


def _verify_with_the_command(bundle: Path, key: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "tucdesk-audit"
    return subprocess.run(
        [str(script), "verify", str(bundle), "--key", str(key)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


async def test_a_resent_agent_event_is_acknowledged_each_time_and_stored_once(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        when = datetime.now(UTC)
        async with agent_channel(url, agent) as channel:
            response = await service.call(admin, "POST", "/v1/sessions",
                                          {"target": "web-1", "mode": "exec", "command": ["id"]})
            session_id = response.json()["session_id"]
            await channel.receive("session_offer")
            await channel.send({"type": "session_offer_ack", "session_id": session_id})
            signed = _signed(agent, session_id, when)
            later_event = _signed(agent, session_id, when + timedelta(seconds=1))
            first = await _send(channel, signed, "e1")
            again = await _send(channel, signed, "e1")
        # The channel dropped; the agent sends it once more on its next connection.
        async with agent_channel(url, agent) as channel:
            on_reconnect = await _send(channel, signed, "e1")
            later = await _send(channel, later_event, "e2")
        assert [first, again, on_reconnect] == [{"type": "audit_event_ack", "id": "e1"}] * 3
        assert later == {"type": "audit_event_ack", "id": "e2"}
        records = await store.audit.read_records(team, 0, 10_000)
        events = [json.loads(record.canonical)["event"] for record in records]
        assert [event for event in events if event["action"] == "session.command"] == [
            json.loads(signed.event.canonical), json.loads(later_event.event.canonical)
        ]
        bundle, key = tmp_path / "audit.jsonl", tmp_path / "audit.pub"
        with bundle.open("wb") as stream:
            await service.ctx.audit.export_to(team, stream)
        key.write_bytes(service.ctx.audit.audit_key.to_pem())
        completed = _verify_with_the_command(bundle, key)
        assert completed.returncode == 0, completed.stdout + completed.stderr
        assert completed.stdout.startswith("OK: ")


def _agent_events_counted(service: Any, outcome: str) -> float:
    registry = service.ctx.metrics.registry
    value = registry.get_sample_value("tucdesk_agent_audit_events_total", {"outcome": outcome})
    return value or 0.0


async def test_a_resend_is_counted_and_logged_by_ids_only_and_a_new_event_is_not(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    marker = "cat /srv/payroll-7f3a9c.csv"  # event content that must stay out of the log
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        when = datetime.now(UTC)
        async with agent_channel(url, agent) as channel:
            response = await service.call(admin, "POST", "/v1/sessions",
                                          {"target": "web-1", "mode": "exec", "command": ["id"]})
            session_id = response.json()["session_id"]
            await channel.receive("session_offer")
            await channel.send({"type": "session_offer_ack", "session_id": session_id})
            signed = _signed(agent, session_id, when, marker)
            new_event = _signed(agent, session_id, when, "uptime")
            counted = []
            for event, event_id in [(signed, "e1")] * 3 + [(new_event, "e2")]:
                assert (await _send(channel, event, event_id))["type"] == "audit_event_ack"
                counted.append(
                    (_agent_events_counted(service, "stored"),
                     _agent_events_counted(service, "already_held"))
                )  # fmt: skip
        # The first copy is stored, the two resends are counted as held, the new event is not.
        assert counted == [(1, 0), (1, 1), (1, 2), (2, 2)]
        records = await store.audit.read_records(team, 0, 10_000)
        [held_seq] = [r.seq for r in records if marker.encode() in r.canonical]
    resent = [
        r.getMessage() for r in caplog.records
        if r.name == "tucdesk.rendezvous.control" and "resent" in r.getMessage()
    ]  # fmt: skip
    line = f"agent {agent.agent_id} resent an audit event the log holds as record {held_seq}"
    assert resent == [line, line]
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for content in (marker, signed.to_json()["signature"], session_id):
        assert content not in logged


EVENTS = 8
TASKS_PER_INSTANCE = 3


async def test_one_event_appended_at_once_by_two_instances_is_stored_once(
    database_url: str, tmp_path: Path
) -> None:
    audit_key, agent_key = SigningIdentity.generate(), SigningIdentity.generate()
    team = new_team()
    start = datetime.now(UTC)
    events = [
        sign_event(agent_key, AuditEvent(
            occurred_at=start + timedelta(microseconds=number), team_id=team,
            actor=Actor(ActorKind.AGENT, "agent-1", "web-1"), action=Action.SESSION_COMMAND,
            signer=agent_key.public.key_id, session_id="s-1", context={"n": number},
        ))
        for number in range(EVENTS)
    ]  # fmt: skip
    async with open_store(database_url) as first, open_store(database_url) as second:
        logs = [AuditLogs(s.audit, audit_key, "test").for_team(team) for s in (first, second)]
        await logs[0].append(
            Action.AGENT_REGISTERED, Actor(ActorKind.SERVICE, "rendezvous"), target="agent-1",
            context=agent_registration_context(agent_key.public, hostname="web-1"),
        )  # fmt: skip
        answers: dict[int, list[AuditRecord]] = {number: [] for number in range(EVENTS)}

        async def resend_all(instance: int, task: int) -> None:
            order = list(range(EVENTS))
            random.Random(instance * 100 + task).shuffle(order)
            for number in order:
                appended = await logs[instance].append_agent_event(
                    events[number], "agent-1", agent_key.public
                )
                answers[number].append(appended.record)
                # Rendezvous-signed records in between keep the two instances racing.
                await logs[instance].append(
                    Action.SESSION_REQUESTED, Actor(ActorKind.OPERATOR, f"op-{task}", "x")
                )

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for instance in range(2):
                    for task in range(TASKS_PER_INSTANCE):
                        nursery.start_soon(resend_all, instance, task)

        for number, records in answers.items():
            assert len(records) == 2 * TASKS_PER_INSTANCE
            assert {record.canonical for record in records} == {records[0].canonical}, number
            assert records[0].event == events[number].event
        size = await logs[1].size()
        assert size == 1 + EVENTS + 2 * TASKS_PER_INSTANCE * EVENTS
        stored = await second.audit.read_records(team, 0, size)
        agent_records = [record for record in stored if record.event_digest is not None]
        assert sorted(record.event_digest for record in agent_records) == sorted(
            signed.event.digest for signed in events
        )
        bundle = tmp_path / "bundle.jsonl"
        with bundle.open("wb") as stream:
            await logs[0].export(stream)
        result = verify_bundle(bundle, [audit_key.public])
        assert result.verdict is Verdict.VALID, result.reason
        assert result.record_count == size


async def test_the_database_refuses_a_second_record_of_one_agent_event(store: Store) -> None:
    assert isinstance(store, SqlStore)
    team = new_team()
    await store.audit.append(team, fake_record(0, event=b"the event"))
    twin = fake_record(1, b"twin", event=b"the event")
    # Bypassing the append statement's own check, the unique index still refuses it.
    with pytest.raises(AlreadyExists):
        async with store._transaction() as session:
            await session.execute(
                """INSERT INTO audit_records
                   (team_id, seq, time, record_hash, leaf_hash, canonical, event_digest)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)""",
                team, twin.seq, twin.time, twin.record_hash, twin.leaf_hash, twin.canonical,
                twin.event_digest,
            )  # fmt: skip
    assert [record.seq for record in await store.audit.read_records(team, 0, 10)] == [0]
