"""Admins list and disable their team's operators; a disabled operator's open sessions end.

On SQLite and PostgreSQL. The agent's side is a real control channel (WebSocket) answered by
the test: it must receive ``end_sessions`` naming exactly the disabled operator's open
sessions, whenever its channel is up (at the disable, or at its next live_sessions report).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from audit.actions import Action
from rendezvous.offer_bus import (
    OFFER_CHANNEL,
    OPERATOR_DISABLED_NOTICE_KIND,
    REJECTED_OPERATOR_DISABLED_NOTICE,
)
from rendezvous.store import Store, open_store
from tests.pg_cluster import PostgresCluster
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness
from tests.rendezvous.sessions_support import (
    AgentChannel,
    agent_channel,
    enroll_agent,
    served_instance,
    wait_for_session_state,
)

pytestmark = pytest.mark.anyio

WAIT_SECONDS = 15
# Long enough for a message the rendezvous is about to send to arrive.
QUIET_SECONDS = 0.5
_numbers = itertools.count(1)


async def _request(service: ServiceHarness, operator: OperatorSession) -> str:
    body = {"target": "web-1", "mode": "exec", "command": ["sleep", "60"]}
    response = await service.call(operator, "POST", "/v1/sessions", body)
    assert response.status_code == 201, response.text
    session_id: str = response.json()["session_id"]
    return session_id


async def _take_offer(channel: AgentChannel, session_id: str) -> None:
    offer = await channel.receive("session_offer")
    assert offer["session_id"] == session_id
    await channel.send({"type": "session_offer_ack", "session_id": session_id})


async def _settled(channel: AgentChannel) -> list[dict[str, Any]]:
    """Everything the rendezvous sent before it answered a heartbeat sent now."""
    await channel.send({"type": "heartbeat"})
    before = []
    with trio.fail_after(WAIT_SECONDS):
        while (message := json.loads(await channel.ws.get_message()))["type"] != "heartbeat_ack":
            before.append(message)
    return before


async def _disable(
    service: ServiceHarness, admin: OperatorSession, operator_id: str
) -> tuple[int, Any]:
    response = await service.call(admin, "POST", f"/v1/operators/{operator_id}/disable")
    return response.status_code, response.json() if response.content else None


async def _no_end_sessions(channel: AgentChannel) -> None:
    with trio.move_on_after(QUIET_SECONDS):
        message = await channel.receive("end_sessions")
        raise AssertionError(f"unexpected {message}")


# ---- the list ------------------------------------------------------------------------------


async def test_an_admin_lists_its_own_teams_operators_without_secrets(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, _):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        alice = await service.operator(team, "operator")
        await service.operator(await service.team("other"), "admin")
        response = await service.call(admin, "GET", "/v1/operators")
        assert response.status_code == 200, response.text
        listed = response.json()["operators"]
        assert sorted(entry["id"] for entry in listed) == sorted(
            [admin.operator_id, alice.operator_id]
        )
        assert {entry["role"] for entry in listed} == {"admin", "operator"}
        assert all(entry["state"] == "active" for entry in listed)
        assert set(listed[0]) == {
            "id", "email", "role", "state", "created_at", "disabled_at", "key_thumbprint"
        }  # fmt: skip
        assert admin.token not in response.text


@pytest.mark.parametrize("role", ["operator", "approver", "auditor"])
async def test_only_admins_list_or_disable_operators(
    store: Store, tmp_path: Path, role: str
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, _):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        member = await service.operator(team, role)
        assert (await service.call(member, "GET", "/v1/operators")).status_code == 403
        status, _ = await _disable(service, member, admin.operator_id)
        assert status == 403
        listed = (await service.call(admin, "GET", "/v1/operators")).json()["operators"]
        assert all(entry["state"] == "active" for entry in listed)


async def test_disabling_another_teams_operator_is_not_found_and_changes_nothing(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, _):
        admin_a = await service.operator(await service.team("a"), "admin")
        team_b = await service.team("b")
        victim = await service.operator(team_b, "operator")
        status, body = await _disable(service, admin_a, victim.operator_id)
        assert status == 404 and body["message"] == "no such operator in your team"
        stored = await store.get_operator(team_b, victim.operator_id)
        assert stored is not None and stored.is_active()


async def test_the_last_active_admin_cannot_be_disabled(store: Store, tmp_path: Path) -> None:
    async with served_instance(store, tmp_path / "data") as (service, _):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        status, body = await _disable(service, admin, admin.operator_id)
        assert status == 409
        assert "last active admin" in body["message"]
        assert "invite another admin" in body["message"]
        assert Action.OPERATOR_REVOKED.value not in await service.audit_actions(team)
        # With a second admin, either may go; then the other is the last one again.
        second = await service.operator(team, "admin")
        assert (await _disable(service, admin, second.operator_id))[0] == 200
        assert (await _disable(service, admin, admin.operator_id))[0] == 409
        stored = await store.get_operator(team, admin.operator_id)
        assert stored is not None and stored.is_active()


async def test_the_store_refuses_disabling_the_last_active_admin(
    store: Store, tmp_path: Path
) -> None:
    from rendezvous.store.base import LastActiveAdmin

    async with served_instance(store, tmp_path / "data") as (service, _):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        with pytest.raises(LastActiveAdmin):
            await store.disable_operator(team, admin.operator_id, 1.0, keep_an_active_admin=True)
        # Without the rule (the store's old behaviour) it goes through.
        disabled = await store.disable_operator(team, admin.operator_id, 1.0)
        assert not disabled.is_active()


# ---- ending the sessions ---------------------------------------------------------------


async def test_disabling_an_operator_asks_the_agent_to_end_only_its_open_sessions(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        op2 = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            running = await _request(service, op2)
            await _take_offer(channel, running)
            offered = await _request(service, op2)
            await channel.receive("session_offer")  # not answered yet: still offered
            others = await _request(service, admin)
            await _take_offer(channel, others)
            await _settled(channel)
            status, _ = await _disable(service, admin, op2.operator_id)
            assert status == 200
            message = await channel.receive("end_sessions")
            assert message["reason"] == "operator_disabled"
            assert sorted(message["ids"]) == sorted([running, offered])
            # The agent's signed session.ended carries the reason; the row shows it.
            answer = await channel.send_event(
                Action.SESSION_ENDED, session_id=running,
                context={"reason": "operator_disabled", "exit_code": None},
            )  # fmt: skip
            assert answer["type"] == "audit_event_ack", answer
            view = await wait_for_session_state(service, admin, running, "ended")
            assert view["reason"] == "operator_disabled"
            # Any other reason is kept on the row too, as the agent signed it.
            answer = await channel.send_event(
                Action.SESSION_ENDED, session_id=others, context={"reason": "normal"},
                event_id="e2",
            )  # fmt: skip
            assert answer["type"] == "audit_event_ack", answer
            ended = await wait_for_session_state(service, admin, others, "ended")
            assert ended["reason"] == "normal"
        events = await service.audit_events(team, Action.OPERATOR_REVOKED.value)
        assert [event["target"] for event in events] == [f"operator:{op2.operator_id}"]


async def test_an_agent_offline_at_the_disable_is_asked_when_it_reports_its_sessions(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        op2 = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            running = await _request(service, op2)
            await _take_offer(channel, running)
            kept = await _request(service, admin)
            await _take_offer(channel, kept)
            await _settled(channel)
        # The channel is down (network), the sessions run on through the relay.
        assert (await _disable(service, admin, op2.operator_id))[0] == 200
        async with agent_channel(url, agent) as back:
            await back.send({"type": "live_sessions", "ids": [running, kept]})
            message = await back.receive("end_sessions")
            assert message == {
                "type": "end_sessions", "ids": [running], "reason": "operator_disabled"
            }  # fmt: skip


async def test_an_agent_running_no_session_of_the_operator_is_told_nothing(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        op2 = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            mine = await _request(service, admin)
            await _take_offer(channel, mine)
            await _settled(channel)
            assert (await _disable(service, admin, op2.operator_id))[0] == 200
            await _no_end_sessions(channel)
            await channel.send({"type": "live_sessions", "ids": [mine]})
            assert not [m for m in await _settled(channel) if m["type"] == "end_sessions"]


# ---- several instances (PostgreSQL) -------------------------------------------------------


@pytest.fixture
def shared_database(postgres_cluster: PostgresCluster) -> str:
    """A fresh PostgreSQL database for two instances to share."""
    return postgres_cluster.create_database(f"disable_{os.getpid()}_{next(_numbers)}")


@pytest.mark.postgres
async def test_an_operator_disabled_on_one_instance_has_its_sessions_ended_on_another(
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
        op2 = await instance_a.operator(team, "admin")
        agent = await enroll_agent(instance_a, admin)
        async with agent_channel(url_b, agent) as channel:  # B holds the channel
            running = await _request(instance_a, op2)
            await _take_offer(channel, running)
            await _settled(channel)
            assert (await _disable(instance_a, admin, op2.operator_id))[0] == 200
            message = await channel.receive("end_sessions")
            assert message["ids"] == [running] and message["reason"] == "operator_disabled"


@pytest.mark.postgres
async def test_operator_disabled_notices_are_hints_checked_against_the_store(
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
            running = await _request(instance_a, admin)
            await _take_offer(channel, running)
            await _settled(channel)
            # A forged notice naming an active operator ends nothing.
            forged = {"kind": OPERATOR_DISABLED_NOTICE_KIND, "origin": "x", "team_id": team,
                      "operator_id": admin.operator_id}  # fmt: skip
            await store_a.notify(OFFER_CHANNEL, json.dumps(forged))
            malformed = {"kind": OPERATOR_DISABLED_NOTICE_KIND, "team_id": team}
            await store_a.notify(OFFER_CHANNEL, json.dumps(malformed))
            with trio.fail_after(WAIT_SECONDS):
                while _rejected(instance_b) < 1:  # noqa: ASYNC110 - a counter has no event
                    await trio.sleep(0.02)
            await _no_end_sessions(channel)


def _rejected(service: ServiceHarness) -> float:
    registry = service.ctx.metrics.registry
    labels = {"reason": REJECTED_OPERATOR_DISABLED_NOTICE}
    return registry.get_sample_value("tucdesk_rejected_inputs_total", labels) or 0.0
