"""Removing an agent (``DELETE /v1/agents/{id}``): who may, what it does, and what is left.

The service runs over a real store (SQLite and PostgreSQL) and is served on loopback, so agents
hold real WebSocket control channels; two instances share one PostgreSQL database for the
removal of a channel another instance holds.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from protocol.identity import PublicIdentity
from rendezvous.audit_trail import Action
from rendezvous.control_channel import CLOSE_AGENT_REMOVED, REMOVED_REASON
from rendezvous.store import Store, open_store
from tests.pg_cluster import PostgresCluster
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness
from tests.rendezvous.sessions_support import (
    EnrolledAgent,
    agent_channel,
    enroll_agent,
    served_instance,
)
from tests.rendezvous.test_agent_reconnect import closed_by_server, connected

pytestmark = pytest.mark.anyio

WAIT_SECONDS = 15
# Heartbeats far apart, so a close within CLOSED_WITHIN_SECONDS cannot come from one.
SLOW_HEARTBEATS = {"heartbeat_seconds": 600.0, "heartbeat_timeout_seconds": 1800.0}
CLOSED_WITHIN_SECONDS = 3
_numbers = itertools.count(1)


def path_of(agent: EnrolledAgent | str) -> str:
    return f"/v1/agents/{agent if isinstance(agent, str) else agent.agent_id}"


async def listed_ids(service: ServiceHarness, operator: OperatorSession) -> set[str]:
    response = await service.call(operator, "GET", "/v1/agents")
    assert response.status_code == 200, response.text
    return {agent["id"] for agent in response.json()["agents"]}


async def api_key(service: ServiceHarness, admin: OperatorSession, scopes: list[str]) -> str:
    created = await service.call(admin, "POST", "/v1/api-keys", {"name": "ci", "scopes": scopes})
    assert created.status_code == 201, created.text
    secret: str = created.json()["key"]
    return secret


def removal_refusals(service: ServiceHarness) -> float:
    registry = service.ctx.metrics.registry
    sample = registry.get_sample_value("tucdesk_auth_failures_total", {"reason": "agent_removed"})
    return sample or 0.0


async def refused_at_authentication(url: str, agent: EnrolledAgent) -> ConnectionClosed:
    """Connect as ``agent`` with a correctly signed answer; the close the rendezvous sends."""
    with pytest.raises(ConnectionClosed) as closed:  # noqa: PT012 - the close comes mid-block
        async with connected(url, agent):
            pytest.fail("a removed agent was welcomed")
    return closed.value


@asynccontextmanager
async def served(store: Store, tmp_path: Path, **settings: Any) -> AsyncIterator[Any]:
    async with served_instance(store, tmp_path / "data", **settings) as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        yield service, url, team, admin


async def test_an_admin_removes_an_agent_audited_and_gone_from_the_list(
    store: Store, tmp_path: Path
) -> None:
    async with served(store, tmp_path) as (service, _url, team, admin):
        agent = await enroll_agent(service, admin, "web-1")
        other = await enroll_agent(service, admin, "db-1")
        response = await service.call(admin, "DELETE", path_of(agent))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["id"] == agent.agent_id and body["name"] == "web-1"
        assert body["key_fingerprint"] == agent.identity.public.fingerprint
        assert body["removed_at"] == pytest.approx(service.clock.now)
        assert await listed_ids(service, admin) == {other.agent_id}
        [record] = await service.audit_events(team, "agent.removed")
        assert record["actor"]["kind"] == "operator"
        assert record["actor"]["id"] == admin.operator_id
        assert record["target"] == agent.agent_id
        assert record["context"]["name"] == "web-1"
        assert record["context"]["key_fingerprint"] == agent.identity.public.fingerprint
        assert record["context"]["agent_key_id"] == PublicIdentity(
            agent.identity.public.raw
        ).key_id
        stored = await store.get_agent(team, agent.agent_id, include_removed=True)
        assert stored is not None and stored.removed_at == body["removed_at"]


@pytest.mark.parametrize("role", ["operator", "approver", "auditor"])
async def test_roles_other_than_admin_may_not_remove_an_agent(
    store: Store, tmp_path: Path, role: str
) -> None:
    async with served(store, tmp_path) as (service, _url, team, admin):
        agent = await enroll_agent(service, admin)
        someone = await service.operator(team, role)
        response = await service.call(someone, "DELETE", path_of(agent))
        assert response.status_code == 403, response.text
        assert "agents:write" in response.json()["message"]
        assert await listed_ids(service, admin) == {agent.agent_id}
        assert await service.audit_events(team, "agent.removed") == []


async def test_no_api_key_may_remove_an_agent_and_agents_write_is_no_scope(
    store: Store, tmp_path: Path
) -> None:
    async with served(store, tmp_path) as (service, _url, team, admin):
        agent = await enroll_agent(service, admin)
        every_scope = ["agents:read", "audit:read", "registration_keys:read",
                       "registration_keys:write", "sessions:read"]  # fmt: skip
        secret = await api_key(service, admin, every_scope)
        response = await service.http.delete(
            path_of(agent), headers={"Authorization": f"Bearer {secret}"}
        )
        assert response.status_code == 403, response.text
        refused = await service.call(
            admin, "POST", "/v1/api-keys", {"name": "ci", "scopes": ["agents:write"]}
        )
        assert refused.status_code == 400, refused.text
        assert await listed_ids(service, admin) == {agent.agent_id}


async def test_a_removal_without_a_request_proof_is_refused(store: Store, tmp_path: Path) -> None:
    async with served(store, tmp_path) as (service, _url, _team, admin):
        agent = await enroll_agent(service, admin)
        response = await service.call(admin, "DELETE", path_of(agent), with_proof=False)
        assert response.status_code == 401, response.text
        assert await listed_ids(service, admin) == {agent.agent_id}


async def test_another_teams_agent_is_not_found_exactly_like_an_unknown_one(
    store: Store, tmp_path: Path
) -> None:
    async with served(store, tmp_path) as (service, _url, _team, admin):
        other_team = await service.team("other")
        other_admin = await service.operator(other_team, "admin")
        theirs = await enroll_agent(service, other_admin)
        cross = await service.call(admin, "DELETE", path_of(theirs))
        unknown = await service.call(admin, "DELETE", path_of("agt_" + "a" * 16))
        assert cross.status_code == unknown.status_code == 404
        assert cross.json() == unknown.json()
        assert await listed_ids(service, other_admin) == {theirs.agent_id}
        assert await service.audit_events(other_team, "agent.removed") == []


async def test_removing_twice_answers_the_same_removal_and_audits_it_once(
    store: Store, tmp_path: Path
) -> None:
    async with served(store, tmp_path) as (service, _url, team, admin):
        agent = await enroll_agent(service, admin)
        first = await service.call(admin, "DELETE", path_of(agent))
        service.clock.now += 60
        second = await service.call(admin, "DELETE", path_of(agent))
        assert first.status_code == second.status_code == 200
        assert second.json() == first.json()
        assert len(await service.audit_events(team, "agent.removed")) == 1


async def test_the_live_channel_closes_at_once_and_a_saved_copy_cannot_reconnect(
    store: Store, tmp_path: Path
) -> None:
    async with served(store, tmp_path, **SLOW_HEARTBEATS) as (service, url, team, admin):
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            response = await service.call(admin, "DELETE", path_of(agent))
            assert response.status_code == 200, response.text
            with trio.fail_after(CLOSED_WITHIN_SECONDS):
                closed = await closed_by_server(channel)
        assert closed.reason.code == CLOSE_AGENT_REMOVED
        assert closed.reason.reason == REMOVED_REASON
        assert await store.list_agent_connections(team, agent.agent_id) == []
        # The same key, correctly signed (a copy of the state file): refused, saying why.
        refused = await refused_at_authentication(url, agent)
        assert refused.reason.code == CLOSE_AGENT_REMOVED
        assert refused.reason.reason == REMOVED_REASON
        assert removal_refusals(service) == 1
        disconnected = await service.audit_events(team, "agent.disconnected")
        assert [event["context"].get("reason") for event in disconnected] == ["removed"]
        # Re-registering the removed key is refused too: the tombstone keeps it taken.
        key = await service.registration_key(admin)
        again = await service.register(agent.identity, key["key"])
        assert again.status_code == 409, again.text


async def test_a_removal_landing_while_the_agent_connects_closes_its_channel_at_once(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race: the DELETE lands right after the connection row is written, while the
    connection's set-up still awaits (here the audit of a clone anomaly, from another machine
    fingerprint); the removal must still find the channel and close it."""
    async with served(store, tmp_path, **SLOW_HEARTBEATS) as (service, url, team, admin):
        agent = await enroll_agent(service, admin)
        row_written, removed = trio.Event(), trio.Event()
        removals: list[int] = []
        mark_agent_connected = store.mark_agent_connected
        record = service.ctx.audit.record

        async def connected_then_removed(*args: Any, **kwargs: Any) -> Any:
            report = await mark_agent_connected(*args, **kwargs)
            row_written.set()
            return report

        async def recorded_once_removed(*args: Any, **kwargs: Any) -> Any:
            if kwargs.get("action") == Action.AGENT_CLONE_ANOMALY:
                await removed.wait()
            return await record(*args, **kwargs)

        async def remove_once_the_row_is_written() -> None:
            await row_written.wait()
            removals.append((await service.call(admin, "DELETE", path_of(agent))).status_code)
            removed.set()

        monkeypatch.setattr(store, "mark_agent_connected", connected_then_removed)
        monkeypatch.setattr(service.ctx.audit, "record", recorded_once_removed)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(remove_once_the_row_is_written)
            async with connected(url, agent, machine="machine-2") as (channel, _connection_id):
                with trio.fail_after(CLOSED_WITHIN_SECONDS):
                    closed = await closed_by_server(channel)
        assert removals == [200]
        assert closed.reason.code == CLOSE_AGENT_REMOVED
        assert closed.reason.reason == REMOVED_REASON
        assert service.ctx.connections is not None
        assert service.ctx.connections.channels(team, agent.agent_id) == []
        assert await store.list_agent_connections(team, agent.agent_id) == []


async def test_a_channel_whose_agent_was_removed_elsewhere_closes_at_its_heartbeat(
    store: Store, tmp_path: Path
) -> None:
    """The fallback when the notice is lost: the heartbeat finds the row gone, and why."""
    async with served(store, tmp_path, **SLOW_HEARTBEATS) as (service, url, team, admin):
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            # What a removal on another instance does to the store, with no notice sent here.
            await store.remove_agent(team, agent.agent_id, service.clock.now)
            await channel.send({"type": "heartbeat"})
            closed = await closed_by_server(channel)
        assert closed.reason.code == CLOSE_AGENT_REMOVED
        assert closed.reason.reason == REMOVED_REASON


async def test_the_name_is_free_for_a_new_agent_and_sessions_to_the_old_one_are_unknown(
    store: Store, tmp_path: Path
) -> None:
    async with served(store, tmp_path) as (service, url, team, admin):
        old = await enroll_agent(service, admin, "web-1")
        async with agent_channel(url, old) as channel:
            asked = {"target": "web-1", "mode": "exec", "command": ["hostname"]}
            before = await service.call(admin, "POST", "/v1/sessions", asked)
            assert before.status_code == 201, before.text
            await channel.receive("session_offer")
            old_session = before.json()["session_id"]
            # The host re-enrolls with a new identity (tucdesk-agent enroll --force): same name.
            new = await enroll_agent(service, admin, "web-1")
            ambiguous = await service.call(admin, "POST", "/v1/sessions", asked)
            assert ambiguous.status_code == 409, ambiguous.text
            assert (await service.call(admin, "DELETE", path_of(old))).status_code == 200
        by_id = {**asked, "target": old.agent_id}
        unknown = {**asked, "target": "agt_" + "b" * 16}
        refused = await service.call(admin, "POST", "/v1/sessions", by_id)
        never_was = await service.call(admin, "POST", "/v1/sessions", unknown)
        assert refused.status_code == never_was.status_code == 404
        assert refused.json()["error"] == never_was.json()["error"]
        # The name now resolves to the new agent alone.
        async with agent_channel(url, new) as new_channel:
            after = await service.call(admin, "POST", "/v1/sessions", asked)
            assert after.status_code == 201, after.text
            offer = await new_channel.receive("session_offer")
            assert offer["session_id"] == after.json()["session_id"]
        # The old agent's session keeps its history.
        kept = await service.call(admin, "GET", f"/v1/sessions/{old_session}")
        assert kept.status_code == 200, kept.text
        assert kept.json()["agent_id"] == old.agent_id
        listed = await service.call(admin, "GET", f"/v1/sessions?agent={old.agent_id}")
        assert listed.status_code == 200, listed.text
        assert await service.audit_events(team, "agent.removed")


@pytest.fixture
def shared_database(postgres_cluster: PostgresCluster) -> str:
    """A fresh PostgreSQL database for two instances to share."""
    return postgres_cluster.create_database(f"removal_{os.getpid()}_{next(_numbers)}")


@pytest.mark.postgres
async def test_a_removal_on_one_instance_closes_the_channel_another_holds_at_once(
    shared_database: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with (
        open_store(shared_database) as store_a,
        open_store(shared_database) as store_b,
        served_instance(store_a, data, **SLOW_HEARTBEATS) as (instance_a, _url_a),
        served_instance(store_b, data, **SLOW_HEARTBEATS) as (instance_b, url_b),
    ):
        team = await instance_a.team("ops")
        admin = await instance_a.operator(team, "admin")
        agent = await enroll_agent(instance_a, admin)
        async with agent_channel(url_b, agent) as channel:
            response = await instance_a.call(admin, "DELETE", path_of(agent))
            assert response.status_code == 200, response.text
            # B hears the notice and closes it: no heartbeat is due for ten minutes.
            with trio.fail_after(CLOSED_WITHIN_SECONDS):
                closed = await closed_by_server(channel)
        assert closed.reason.code == CLOSE_AGENT_REMOVED
        assert closed.reason.reason == REMOVED_REASON
        assert instance_b.ctx.connections is not None
        assert instance_b.ctx.connections.channels(team, agent.agent_id) == []
        refused = await refused_at_authentication(url_b, agent)
        assert refused.reason.code == CLOSE_AGENT_REMOVED



# ---- the real agent daemon's control client ------------------------------------------------


async def _wait_for(condition: Any, what: str) -> None:
    """Poll ``condition`` (the client's state changes inside its task, with no event to wait
    on) until it holds; fail naming ``what`` after WAIT_SECONDS."""
    with trio.move_on_after(WAIT_SECONDS):
        while True:
            if condition():
                return
            await trio.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


async def test_the_agent_client_logs_why_and_stops_retrying_once_removed(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Imported here: the agent package is only this test's concern in this file.
    from agent.control_client import (
        REMOVED_RETRY_SECONDS,
        ControlClient,
        ReconnectBackoff,
    )
    from agent.enrollment import EnrollmentRequest, enroll
    from agent.machine_identity import MachineIdentifiers

    machine = MachineIdentifiers(machine_id="0123456789abcdef0123456789abcdef")
    async with served(store, tmp_path, **SLOW_HEARTBEATS) as (service, url, team, admin):
        key = await service.registration_key(admin)
        state = await enroll(
            EnrollmentRequest(url, key["key"], tmp_path / "state" / "agent.state"), machine
        )

        def client() -> ControlClient:
            # Backoff in milliseconds: without the removal rule it would retry many times a second.
            return ControlClient(
                state, machine.fingerprint(), lambda offer: None,
                backoff=ReconnectBackoff(initial=0.01, cap=0.02),
            )  # fmt: skip

        live, saved_copy = client(), client()
        caplog.set_level("ERROR", logger="tucdesk.agent.control")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(live.run)
            with trio.fail_after(WAIT_SECONDS):
                await live.wait_connected()
            response = await service.call(admin, "DELETE", f"/v1/agents/{state.agent_id}")
            assert response.status_code == 200, response.text
            await _wait_for(lambda: live.last_error is not None, "the live client's close")
            assert REMOVED_REASON in (live.last_error or "")
            # A copy of the old state starts up: refused at once, and it does not loop.
            nursery.start_soon(saved_copy.run)
            await _wait_for(lambda: removal_refusals(service) >= 1, "the copy's refusal")
            await _wait_for(lambda: saved_copy.last_error is not None, "the copy's error")
            await trio.sleep(0.5)
            assert removal_refusals(service) == 1
            assert REMOVED_REASON in (saved_copy.last_error or "")
            assert live.connections == 1 and saved_copy.connections == 0
            nursery.cancel_scope.cancel()
        logged = [record.getMessage() for record in caplog.records]
        assert len([line for line in logged if REMOVED_REASON in line]) == 2, logged
        assert all(f"{REMOVED_RETRY_SECONDS:.0f}s" in line for line in logged), logged
        assert await store.list_agent_connections(team, state.agent_id) == []
