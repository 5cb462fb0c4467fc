"""A reconnecting agent names the connection it replaces: no false clone anomaly, offers follow.

After a silent drop (laptop sleep, NAT timeout) the rendezvous still holds the old channel until
its heartbeat timeout. These tests leave a real WebSocket open and silent, which is what the
rendezvous sees of a half-open TCP connection, and reconnect over another real WebSocket.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from protocol.domains import Purpose
from protocol.identity import b64url
from protocol.signed_payload import create_signed_payload
from rendezvous.control_channel import SUPERSEDED_REASON
from rendezvous.offer_bus import OFFER_CHANNEL, SUPERSEDED_NOTICE_KIND
from rendezvous.store import Store, open_store
from tests.pg_cluster import PostgresCluster
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness
from tests.rendezvous.sessions_support import (
    AgentChannel,
    EnrolledAgent,
    enroll_agent,
    served_instance,
)

pytestmark = pytest.mark.anyio

WAIT_SECONDS = 15
ABSENT = object()
_numbers = itertools.count(1)


@asynccontextmanager
async def connected(
    url: str, agent: EnrolledAgent, replaces: object = ABSENT, machine: str = "machine-1"
) -> AsyncIterator[tuple[AgentChannel, str]]:
    """The agent's control channel, its signed answer naming ``replaces`` if given; yields the
    channel and the connection id it was welcomed with."""
    ws_url = url.replace("http://", "ws://") + "/v1/agents/connect"
    async with open_websocket_url(ws_url) as ws:
        with trio.fail_after(WAIT_SECONDS):
            challenge = json.loads(await ws.get_message())
            await ws.send_message(_auth(agent, challenge, replaces, machine))
            welcome = json.loads(await ws.get_message())
        assert welcome["type"] == "welcome", welcome
        yield AgentChannel(ws, agent), welcome["connection_id"]


def _auth(agent: EnrolledAgent, challenge: dict[str, Any], replaces: object, machine: str) -> str:
    fields: dict[str, Any] = {
        "agent_id": agent.agent_id,
        "public_key": b64url(agent.identity.public.raw),
        "challenge": challenge["challenge"],
        "audience": challenge["audience"],
        "machine_fingerprint": machine,
    }
    if replaces is not ABSENT:
        fields["replaces"] = replaces
    envelope = create_signed_payload(agent.identity, Purpose.AGENT_AUTH, fields, time.time())
    return json.dumps({"type": "auth", "envelope": envelope})


async def closed_by_server(channel: AgentChannel) -> ConnectionClosed:
    """Read (and drop) messages until the rendezvous closes the channel; its close."""
    with trio.fail_after(WAIT_SECONDS), pytest.raises(ConnectionClosed) as closed:
        while True:
            await channel.ws.get_message()
    return closed.value


async def heartbeat(channel: AgentChannel) -> None:
    await channel.send({"type": "heartbeat"})
    with trio.fail_after(WAIT_SECONDS):
        assert json.loads(await channel.ws.get_message())["type"] == "heartbeat_ack"


def clone_anomalies(service: ServiceHarness) -> float:
    registry = service.ctx.metrics.registry
    return sum(
        registry.get_sample_value("tucdesk_clone_anomalies_total", {"kind": kind}) or 0.0
        for kind in ("concurrent_connection", "machine_fingerprint")
    )


def rejected(service: ServiceHarness, reason: str) -> float:
    registry = service.ctx.metrics.registry
    return registry.get_sample_value("tucdesk_rejected_inputs_total", {"reason": reason}) or 0.0


async def listed_connections(service: ServiceHarness, agent: EnrolledAgent) -> set[str]:
    connections = await service.store.list_agent_connections(agent.team_id, agent.agent_id)
    return {connection.connection_id for connection in connections}


async def offer_reaches(
    service: ServiceHarness, admin: OperatorSession, channel: AgentChannel
) -> None:
    body = {"target": channel.agent.name, "mode": "exec", "command": ["hostname"]}
    response = await service.call(admin, "POST", "/v1/sessions", body)
    assert response.status_code == 201, response.text
    offer = await channel.receive("session_offer")
    assert offer["session_id"] == response.json()["session_id"]


async def test_reconnect_naming_its_half_open_connection_is_no_clone_and_gets_the_offers(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with connected(url, agent) as (stale, stale_id):
            # The first connection now says nothing, like one whose network dropped silently.
            async with connected(url, agent, replaces=stale_id) as (channel, fresh_id):
                assert clone_anomalies(service) == 0
                assert await service.audit_events(team, "agent.clone_anomaly") == []
                assert await listed_connections(service, agent) == {fresh_id}
                [listed] = (await service.call(admin, "GET", "/v1/agents")).json()["agents"]
                assert listed["online"]
                await heartbeat(channel)
                await offer_reaches(service, admin, channel)
                # This instance held the superseded channel: it closes it at once, saying why.
                closed = await closed_by_server(AgentChannel(stale.ws, agent))
                assert closed.reason.reason == SUPERSEDED_REASON
                assert await listed_connections(service, agent) == {fresh_id}
        connected_events = await service.audit_events(team, "agent.connected")
        assert [e["context"].get("replaces") for e in connected_events] == [None, stale_id]
        disconnected = await service.audit_events(team, "agent.disconnected")
        reasons = {e["context"]["connection_id"]: e["context"].get("reason") for e in disconnected}
        assert reasons[stale_id] == "superseded"
        assert reasons.get(fresh_id) is None  # its record may still be on its way: no matter


async def test_a_second_process_that_names_no_connection_is_still_a_clone(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with connected(url, agent) as (_, first_id):
            async with connected(url, agent) as (_, second_id):
                [anomaly] = await service.audit_events(team, "agent.clone_anomaly")
                assert anomaly["context"]["other_connections"] == [first_id]
                assert clone_anomalies(service) == 1
                assert await listed_connections(service, agent) == {first_id, second_id}


async def test_two_snapshot_clones_naming_one_old_connection_are_flagged_on_the_second(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with connected(url, agent) as (_, old_id):
            async with (
                connected(url, agent, replaces=old_id) as (_, first_id),
                connected(url, agent, replaces=old_id) as (_, second_id),
            ):
                [anomaly] = await service.audit_events(team, "agent.clone_anomaly")
                assert anomaly["context"]["other_connections"] == [first_id]
                assert await listed_connections(service, agent) == {first_id, second_id}


async def test_a_clone_naming_the_originals_live_connection_is_flagged_when_it_reconnects(
    store: Store, tmp_path: Path
) -> None:
    """A clone resumed from a memory snapshot names the original's connection, which is live."""
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with connected(url, agent) as (original, original_id):
            await heartbeat(original)
            async with connected(url, agent, replaces=original_id) as (_, clone_id):
                assert (await closed_by_server(original)).reason.reason == SUPERSEDED_REASON
                assert await service.audit_events(team, "agent.clone_anomaly") == []
                # The original reconnects as it should, naming its own (now gone) connection.
                async with connected(url, agent, replaces=original_id):
                    [anomaly] = await service.audit_events(team, "agent.clone_anomaly")
                    assert anomaly["context"]["other_connections"] == [clone_id]
                    assert clone_anomalies(service) == 1


async def test_naming_another_agents_or_teams_connection_removes_nothing_and_is_flagged(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        neighbour = await enroll_agent(service, admin, hostname="db-1")
        other_team = await service.team("other")
        stranger = await enroll_agent(service, await service.operator(other_team, "admin"))
        async with (
            connected(url, agent) as (_, own_id),
            connected(url, neighbour) as (_, neighbour_id),
            connected(url, stranger) as (_, stranger_id),
        ):
            for named in (neighbour_id, stranger_id):
                async with connected(url, agent, replaces=named):
                    pass
            anomalies = await service.audit_events(team, "agent.clone_anomaly")
            # Each is flagged for the live connection it did not name (the first one's own row
            # may still be on its way out when the second connects).
            assert len(anomalies) == 2
            assert all(own_id in a["context"]["other_connections"] for a in anomalies)
            assert await listed_connections(service, neighbour) == {neighbour_id}
            assert await listed_connections(service, stranger) == {stranger_id}
            assert own_id in await listed_connections(service, agent)


async def test_a_named_connection_of_another_machine_fingerprint_is_not_superseded(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with (
            connected(url, agent) as (_, first_id),
            connected(url, agent, replaces=first_id, machine="machine-2") as (_, second_id),
        ):
            [anomaly] = await service.audit_events(team, "agent.clone_anomaly")
            assert anomaly["context"]["kinds"] == ["machine_fingerprint", "concurrent_connection"]
            assert await listed_connections(service, agent) == {first_id, second_id}


@pytest.mark.parametrize(
    "replaces",
    [None, 7, True, "", "conn_", "conn_" + "0" * 23, "conn_" + "0" * 25, "conn_" + "A" * 24,
     "other_" + "0" * 24, " conn_" + "0" * 24, "conn_" + "0" * 24 + "\n", ["conn_" + "0" * 24],
     {"id": "conn_" + "0" * 24}, "x" * 4000],
)  # fmt: skip
async def test_a_malformed_replaces_refuses_the_auth_with_a_reason(
    store: Store, tmp_path: Path, replaces: object
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        ws_url = url.replace("http://", "ws://") + "/v1/agents/connect"
        async with open_websocket_url(ws_url) as ws:
            with trio.fail_after(WAIT_SECONDS):
                challenge = json.loads(await ws.get_message())
                await ws.send_message(_auth(agent, challenge, replaces, "machine-1"))
            closed = await closed_by_server(AgentChannel(ws, agent))
        assert closed.reason.code == 1008
        assert "replaces" in (closed.reason.reason or "")
        assert await listed_connections(service, agent) == set()
        registry = service.ctx.metrics.registry
        assert (
            registry.get_sample_value("tucdesk_auth_failures_total", {"reason": "agent_channel"})
            == 1
        )


async def test_heartbeats_keep_only_their_own_connection_alive(
    store: Store, tmp_path: Path
) -> None:
    """A killed instance's row must go stale: the live channel's heartbeats do not refresh it."""
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        dead_at = service.clock.now - 10
        await store.mark_agent_connected(
            team, agent.agent_id, "killed-instance", "conn_" + "d" * 24, "machine-1", dead_at
        )
        async with connected(url, agent) as (channel, live_id):
            service.clock.now += 5
            await heartbeat(channel)
            beats = {
                c.connection_id: c.heartbeat_at
                for c in await store.list_agent_connections(team, agent.agent_id)
            }
        assert beats == {"conn_" + "d" * 24: dead_at, live_id: service.clock.now}


@pytest.fixture
def shared_database(postgres_cluster: PostgresCluster) -> str:
    """A fresh PostgreSQL database for two instances to share."""
    return postgres_cluster.create_database(f"reconnect_{os.getpid()}_{next(_numbers)}")


# Heartbeats far apart, so a close within CLOSED_WITHIN_SECONDS cannot come from one.
SLOW_HEARTBEATS = {"heartbeat_seconds": 600.0, "heartbeat_timeout_seconds": 1800.0}
CLOSED_WITHIN_SECONDS = 3


@asynccontextmanager
async def two_instances(
    shared_database: str, tmp_path: Path, **settings: Any
) -> AsyncIterator[tuple[tuple[ServiceHarness, str], tuple[ServiceHarness, str]]]:
    """Two instances of one service (they share keys) on one PostgreSQL database."""
    data = tmp_path / "data"
    async with (
        open_store(shared_database) as store_a,
        open_store(shared_database) as store_b,
        served_instance(store_a, data, **settings) as a,
        served_instance(store_b, data, **settings) as b,
    ):
        yield a, b


@pytest.mark.postgres
async def test_reconnect_to_another_instance_closes_the_channel_the_first_holds_at_once(
    shared_database: str, tmp_path: Path
) -> None:
    async with two_instances(shared_database, tmp_path, **SLOW_HEARTBEATS) as (
        (instance_a, url_a),
        (instance_b, url_b),
    ):
        team = await instance_a.team("ops")
        admin = await instance_a.operator(team, "admin")
        agent = await enroll_agent(instance_a, admin)
        async with connected(url_a, agent) as (stale, stale_id):
            async with connected(url_b, agent, replaces=stale_id) as (channel, fresh_id):
                # B announces the superseded connection; A closes it without waiting for a
                # heartbeat (none is due for ten minutes).
                with trio.fail_after(CLOSED_WITHIN_SECONDS):
                    closed = await closed_by_server(stale)
                assert closed.reason.reason == SUPERSEDED_REASON
                assert clone_anomalies(instance_a) == clone_anomalies(instance_b) == 0
                assert await instance_a.audit_events(team, "agent.clone_anomaly") == []
                assert await listed_connections(instance_a, agent) == {fresh_id}
                assert instance_a.ctx.connections is not None
                assert instance_a.ctx.connections.channels(team, agent.agent_id) == []
                # Requested at A, which held the old channel: the offer goes to B's.
                await offer_reaches(instance_a, admin, channel)
                await heartbeat(channel)
        disconnected = await instance_a.audit_events(team, "agent.disconnected")
        assert {e["context"]["connection_id"]: e["context"].get("reason") for e in disconnected}[
            stale_id
        ] == "superseded"


@pytest.mark.postgres
async def test_a_superseded_notice_closes_nothing_but_an_unrecorded_named_connection(
    shared_database: str, tmp_path: Path
) -> None:
    """Notices come from the database, not the agent: a forged or garbled one closes nothing."""
    async with two_instances(shared_database, tmp_path, **SLOW_HEARTBEATS) as (
        (instance_a, url_a),
        (instance_b, _),
    ):
        team = await instance_a.team("ops")
        admin = await instance_a.operator(team, "admin")
        agent = await enroll_agent(instance_a, admin)
        neighbour = await enroll_agent(instance_a, admin, hostname="db-1")
        async with connected(url_a, agent) as (live, live_id):

            def notice(**changes: object) -> str:
                fields: dict[str, object] = {
                    "kind": SUPERSEDED_NOTICE_KIND,
                    "instance": instance_a.ctx.instance_id,
                    "team_id": team,
                    "agent_id": agent.agent_id,
                    "connection_id": live_id,
                }
                fields.update(changes)
                return json.dumps({k: v for k, v in fields.items() if v is not ABSENT})

            notices = [
                notice(),  # names the live channel exactly, but its row is still recorded
                notice(team_id="team_" + "0" * 16),  # another team
                notice(agent_id=neighbour.agent_id),  # another agent of the team
                notice(connection_id=live_id.upper()),  # not a connection id
                notice(connection_id=ABSENT),
                notice(agent_id=7),
                notice(team_id=None),
                notice(instance=[instance_a.ctx.instance_id]),
                notice(connection_id=live_id + "x" * 2000),  # past the notice size limit
                '{"kind": "connection_superseded"',
                "[]",
            ]
            for text in notices:
                await instance_b.store.notify(OFFER_CHANNEL, text)
            # Notices are handled in order: once B's offer reaches A's channel, A has read them.
            await offer_reaches(instance_b, admin, live)
            await heartbeat(live)
            # Wrong types or a missing field; then past the size limit, cut short, not an object.
            assert rejected(instance_a, "bus_superseded_notice") == 4
            assert rejected(instance_a, "bus_notice") == 3
            assert await listed_connections(instance_a, agent) == {live_id}
            assert instance_a.ctx.connections is not None
            [held] = instance_a.ctx.connections.channels(team, agent.agent_id)
            assert held.connection_id == live_id and not held.superseded


async def test_a_connection_superseded_elsewhere_is_closed_at_its_heartbeat_without_notice(
    store: Store, tmp_path: Path
) -> None:
    """The fallback when the notice is lost (or on a store without notices): the heartbeat."""
    async with served_instance(store, tmp_path / "data", **SLOW_HEARTBEATS) as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with connected(url, agent) as (stale, stale_id):
            # What a reconnect to another instance records, with no notice sent here.
            await store.mark_agent_connected(
                team, agent.agent_id, "inst_elsewhere", "conn_" + "e" * 24, "machine-1",
                service.clock.now, replaces=stale_id,
            )  # fmt: skip
            await stale.send({"type": "heartbeat"})
            assert (await closed_by_server(stale)).reason.reason == SUPERSEDED_REASON


async def test_an_older_agent_reconnecting_without_naming_gets_offers_on_its_newest_channel(
    store: Store, tmp_path: Path
) -> None:
    """Agents from before ``replaces`` are flagged as before, but offers follow the reconnect."""
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with connected(url, agent) as (_, stale_id), connected(url, agent) as (channel, _):
            [anomaly] = await service.audit_events(team, "agent.clone_anomaly")
            assert anomaly["context"]["other_connections"] == [stale_id]
            await offer_reaches(service, admin, channel)
