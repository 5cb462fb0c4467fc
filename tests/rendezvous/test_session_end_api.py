"""An admin ends a session (``POST /v1/sessions/{id}/end``), and removing an agent ends its
open sessions (``DELETE /v1/agents/{id}``): from an incident-response audit, where a session on
a compromised host could be ended by no TucDesk command, and stayed ``accepted`` for ever in the
record once its agent was removed.

On SQLite and PostgreSQL (the ``store`` fixture), plus two instances sharing one PostgreSQL
database. The agent's side is a real control channel (WebSocket) answered by the test: it must
receive ``end_sessions`` naming the session, with the reason, before its channel closes.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from rendezvous.control_channel import CLOSE_AGENT_REMOVED
from rendezvous.offer_bus import (
    OFFER_CHANNEL,
    REJECTED_SESSIONS_ENDED_NOTICE,
    SESSIONS_ENDED_NOTICE_KIND,
)
from rendezvous.store import Store, open_store
from tests.pg_cluster import PostgresCluster
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness
from tests.rendezvous.sessions_support import (
    AgentChannel,
    agent_channel,
    enroll_agent,
    served_instance,
)

pytestmark = pytest.mark.anyio

WAIT_SECONDS = 15
QUIET_SECONDS = 0.5
_numbers = itertools.count(1)


async def _open_session(
    service: ServiceHarness, operator: OperatorSession, channel: AgentChannel
) -> str:
    body = {"target": channel.agent.name, "mode": "exec", "command": ["sleep", "600"]}
    response = await service.call(operator, "POST", "/v1/sessions", body)
    assert response.status_code == 201, response.text
    session_id: str = response.json()["session_id"]
    offer = await channel.receive("session_offer")
    assert offer["session_id"] == session_id
    await channel.send({"type": "session_offer_ack", "session_id": session_id})
    await _settled(channel)
    return session_id


async def _settled(channel: AgentChannel) -> list[dict[str, Any]]:
    """Everything the rendezvous sent before it answered a heartbeat sent now."""
    await channel.send({"type": "heartbeat"})
    before = []
    with trio.fail_after(WAIT_SECONDS):
        while (message := json.loads(await channel.ws.get_message()))["type"] != "heartbeat_ack":
            before.append(message)
    return before


async def _end(service: ServiceHarness, caller: OperatorSession, session_id: str) -> Any:
    return await service.call(caller, "POST", f"/v1/sessions/{session_id}/end")


async def _state(service: ServiceHarness, admin: OperatorSession, session_id: str) -> Any:
    response = await service.call(admin, "GET", f"/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return response.json()


async def _no_end_sessions(channel: AgentChannel) -> None:
    with trio.move_on_after(QUIET_SECONDS):
        message = await channel.receive("end_sessions")
        raise AssertionError(f"unexpected {message}")


async def test_an_admin_ends_a_running_session_audited_first_and_the_agent_is_told(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        alice = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            session_id = await _open_session(service, alice, channel)
            response = await _end(service, admin, session_id)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["already_ended"] is False and body["agent_reached"] == "here"
            assert body["session"]["state"] == "ended"
            assert body["session"]["reason"] == "ended_by_admin"
            message = await channel.receive("end_sessions")
            assert message == {
                "type": "end_sessions", "ids": [session_id], "reason": "ended_by_admin"
            }  # fmt: skip
            [record] = await service.audit_events(team, "session.ended")
            assert record["actor"] == {"kind": "operator", "id": admin.operator_id,
                                       "display": record["actor"]["display"]}  # fmt: skip
            assert record["session_id"] == session_id
            assert record["context"]["reason"] == "ended_by_admin"
            assert record["context"]["operator_id"] == alice.operator_id
            # Again: answered as it is, nothing recorded or sent twice.
            again = await _end(service, admin, session_id)
            assert again.status_code == 200 and again.json()["already_ended"] is True
            assert len(await service.audit_events(team, "session.ended")) == 1
            await _no_end_sessions(channel)


@pytest.mark.parametrize("role", ["operator", "approver", "auditor"])
async def test_only_admins_end_sessions_even_their_own_and_each_refusal_is_recorded(
    store: Store, tmp_path: Path, role: str
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        member = await service.operator(team, role)
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            owner = member if role == "operator" else admin
            session_id = await _open_session(service, owner, channel)
            response = await _end(service, member, session_id)
            assert response.status_code == 403, response.text
            assert "only admins" in response.json()["message"]
            await _no_end_sessions(channel)
        assert (await _state(service, admin, session_id))["state"] == "accepted"
        [refused] = await service.audit_events(team, "session.end_failed")
        assert refused["actor"]["id"] == member.operator_id
        assert refused["target"] == f"session:{session_id}"
        assert refused["context"]["reason"] == "not_permitted"
        assert await service.audit_events(team, "session.ended") == []


async def test_another_teams_session_is_not_found_exactly_like_an_unknown_one(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        other_team = await service.team("other")
        intruder = await service.operator(other_team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            session_id = await _open_session(service, admin, channel)
            theirs = await _end(service, intruder, session_id)
            unknown = await _end(service, intruder, "ses_doesnotexist")
            assert theirs.status_code == unknown.status_code == 404
            assert theirs.json() == unknown.json() == {
                "error": "not_found", "message": "no such session in your team"
            }  # fmt: skip
            await _no_end_sessions(channel)
        assert (await _state(service, admin, session_id))["state"] == "accepted"
        refusals = await service.audit_events(other_team, "session.end_failed")
        targets = [r["target"] for r in refusals]
        assert targets == [f"session:{session_id}", "session:ses_doesnotexist"]
        assert {r["context"]["reason"] for r in refusals} == {"not_found"}
        assert await service.audit_events(team, "session.end_failed") == []


async def test_removing_an_agent_tells_it_to_end_its_sessions_before_closing_its_channel(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        alice = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin)
        other = await enroll_agent(service, admin, "db-1")
        async with agent_channel(url, agent) as channel, agent_channel(url, other) as bystander:
            shell = await _open_session(service, alice, channel)
            kept = await _open_session(service, alice, bystander)
            response = await service.call(admin, "DELETE", f"/v1/agents/{agent.agent_id}")
            assert response.status_code == 200, response.text
            assert response.json()["ended_sessions"] == [shell]
            assert response.json()["agent_reached"] == "here"
            assert response.json()["ending_sessions_failed"] is False
            # In this order on the wire: the end request, then the close.
            message = await channel.receive("end_sessions")
            assert message == {"type": "end_sessions", "ids": [shell], "reason": "agent_removed"}
            with pytest.raises(ConnectionClosed) as closed:  # noqa: PT012
                while True:
                    await channel.ws.get_message()
            assert closed.value.reason.code == CLOSE_AGENT_REMOVED
            await _no_end_sessions(bystander)
        shown = await _state(service, admin, shell)
        assert (shown["state"], shown["reason"]) == ("ended", "agent_removed")
        assert (await _state(service, admin, kept))["state"] == "accepted"
        [record] = await service.audit_events(team, "session.ended")
        assert record["session_id"] == shell and record["actor"]["id"] == admin.operator_id
        assert record["context"]["reason"] == "agent_removed"
        actions = [e["action"] for e in await service.audit_events(team)]
        # The record of the removal first, then the session's end.
        assert actions.index("agent.removed") < actions.index("session.ended")
        listed = await service.call(
            admin, "GET", f"/v1/sessions?agent={agent.agent_id}&state=accepted&state=offered"
        )
        assert listed.status_code == 200 and listed.json()["sessions"] == []


async def test_removing_an_offline_agent_still_ends_its_sessions_in_the_record(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            session_id = await _open_session(service, admin, channel)
        response = await service.call(admin, "DELETE", f"/v1/agents/{agent.agent_id}")
        assert response.status_code == 200, response.text
        assert response.json()["ended_sessions"] == [session_id]
        assert response.json()["agent_reached"] == "not_connected"
        shown = await _state(service, admin, session_id)
        assert (shown["state"], shown["reason"]) == ("ended", "agent_removed")


async def test_a_session_ended_while_its_agent_was_away_is_ended_at_its_next_report(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            session_id = await _open_session(service, admin, channel)
        response = await _end(service, admin, session_id)
        assert response.status_code == 200, response.text
        assert response.json()["agent_reached"] == "not_connected"
        async with agent_channel(url, agent) as back:
            await back.send({"type": "live_sessions", "ids": [session_id]})
            message = await back.receive("end_sessions")
            assert message == {
                "type": "end_sessions", "ids": [session_id], "reason": "ended_by_admin"
            }  # fmt: skip


@pytest.fixture
def shared_database(postgres_cluster: PostgresCluster) -> str:
    """A fresh PostgreSQL database for two instances to share."""
    return postgres_cluster.create_database(f"session_end_{os.getpid()}_{next(_numbers)}")


@pytest.mark.postgres
async def test_ending_and_removal_on_one_instance_reach_the_channel_another_holds(
    shared_database: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with (
        open_store(shared_database) as store_a,
        open_store(shared_database) as store_b,
        served_instance(store_a, data) as (instance_a, _),
        served_instance(store_b, data) as (_instance_b, url_b),
    ):
        team = await instance_a.team("ops")
        admin = await instance_a.operator(team, "admin")
        agent = await enroll_agent(instance_a, admin)
        async with agent_channel(url_b, agent) as channel:  # B holds the channel
            first = await _open_session(instance_a, admin, channel)
            second = await _open_session(instance_a, admin, channel)
            response = await _end(instance_a, admin, first)
            assert response.status_code == 200, response.text
            assert response.json()["agent_reached"] == "other_instance"
            message = await channel.receive("end_sessions")
            assert message["ids"] == [first] and message["reason"] == "ended_by_admin"
            removed = await instance_a.call(admin, "DELETE", f"/v1/agents/{agent.agent_id}")
            assert removed.status_code == 200, removed.text
            assert removed.json()["ended_sessions"] == [second]
            message = await channel.receive("end_sessions")
            assert message["ids"] == [second] and message["reason"] == "agent_removed"
            with pytest.raises(ConnectionClosed) as closed:  # noqa: PT012
                while True:
                    await channel.ws.get_message()
            assert closed.value.reason.code == CLOSE_AGENT_REMOVED


@pytest.mark.postgres
async def test_sessions_ended_notices_are_hints_checked_against_the_store(
    shared_database: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with (
        open_store(shared_database) as store_a,
        open_store(shared_database) as store_b,
        served_instance(store_a, data) as (instance_a, _),
        served_instance(store_b, data) as (instance_b, url_b),
    ):
        team = await instance_a.team("ops")
        admin = await instance_a.operator(team, "admin")
        agent = await enroll_agent(instance_a, admin)
        async with agent_channel(url_b, agent) as channel:
            running = await _open_session(instance_a, admin, channel)
            # A forged notice naming a session the store shows open ends nothing.
            forged = {"kind": SESSIONS_ENDED_NOTICE_KIND, "origin": "x", "team_id": team,
                      "agent_id": agent.agent_id, "reason": "ended_by_admin", "ids": [running]}
            await store_a.notify(OFFER_CHANNEL, json.dumps(forged))
            malformed = {**forged, "reason": "because"}
            await store_a.notify(OFFER_CHANNEL, json.dumps(malformed))
            with trio.fail_after(WAIT_SECONDS):
                while _rejected(instance_b) < 1:  # noqa: ASYNC110 - a counter has no event
                    await trio.sleep(0.02)
            await _no_end_sessions(channel)


def _rejected(service: ServiceHarness) -> float:
    registry = service.ctx.metrics.registry
    labels = {"reason": REJECTED_SESSIONS_ENDED_NOTICE}
    return registry.get_sample_value("tucdesk_rejected_inputs_total", labels) or 0.0
