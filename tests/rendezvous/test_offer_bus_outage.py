"""A PostgreSQL outage under running instances: offers are not lost while an instance is not
listening, /healthz says when it is not, and agent channels the outage breaks close 1013
without a traceback.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from rendezvous import offer_bus
from rendezvous.context import ServiceContext
from rendezvous.control_channel import CLOSE_TRY_AGAIN_LATER, STORE_UNAVAILABLE_REASON
from rendezvous.offer_bus import OfferDelivery, deliver_here, listening_failure
from rendezvous.session_broker import SESSION_OFFER_SECONDS
from rendezvous.store import open_store
from tests.pg_cluster import PostgresCluster, PostgresUnavailable, find_postgres_bin_dir
from tests.rendezvous.sessions_support import (
    WAIT_SECONDS,
    AgentChannel,
    agent_channel,
    enroll_agent,
    served_instance,
)
from tests.rendezvous.test_store_failures import _pg_ctl

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

# Long enough that an offer brokered by another instance surely falls in the listening gap.
WIDE_RETRY_SECONDS = 3.0


@pytest.fixture
def own_cluster() -> Iterator[PostgresCluster]:
    """A cluster of the test's own: the test stops and starts its server."""
    bin_dir = find_postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL tests need a local PostgreSQL (initdb, pg_ctl)")
    cluster = PostgresCluster(bin_dir)
    try:
        try:
            cluster.start()
        except PostgresUnavailable as exc:
            pytest.skip(f"PostgreSQL did not start: {exc}")
        yield cluster
    finally:
        cluster.stop()


async def _until_not_listening(ctx: ServiceContext) -> None:
    with trio.fail_after(WAIT_SECONDS):
        while True:
            if listening_failure(ctx) is not None:
                return
            await trio.sleep(0.01)


async def _no_second_offer(channel: AgentChannel) -> None:
    """A heartbeat's answer comes back with no session offer before it."""
    await channel.send({"type": "heartbeat"})
    with trio.fail_after(WAIT_SECONDS):
        while True:
            message = json.loads(await channel.ws.get_message())
            assert message.get("type") != "session_offer", message
            if message.get("type") == "heartbeat_ack":
                return


async def test_an_offer_sent_while_an_instance_was_not_listening_reaches_its_agent_once(
    postgres_cluster: PostgresCluster,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="tucdesk.rendezvous.offers")
    monkeypatch.setattr(offer_bus, "LISTEN_RETRY_MIN_SECONDS", WIDE_RETRY_SECONDS)
    database = postgres_cluster.create_database(f"gap_{os.getpid()}")
    data = tmp_path / "data"
    async with (
        open_store(database) as store_a,
        open_store(database) as store_b,
        open_store(database) as admin_store,
        served_instance(store_a, data) as (instance_a, _),
        served_instance(store_b, data) as (instance_b, url_b),
        httpx.AsyncClient() as client,
    ):
        team = await instance_a.team("ops")
        admin = await instance_a.operator(team, "admin")
        agent = await enroll_agent(instance_a, admin)
        async with agent_channel(url_b, agent) as channel:
            assert (await client.get(url_b + "/healthz")).status_code == 200
            # What a server restart does to the LISTEN sessions; the rest of B's pool lives on.
            await admin_store._fetch(  # noqa: SLF001 - raw SQL
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
            )
            await _until_not_listening(instance_b.ctx)
            health = await client.get(url_b + "/healthz")
            assert health.status_code == 503, health.text
            assert "not listening for session offers" in health.json()["message"]

            # Brokered by A while B is deaf: A's notice is lost, B's catch-up sends it.
            response = await instance_a.call(
                admin, "POST", "/v1/sessions", {"target": "web-1", "mode": "shell"}
            )
            assert response.status_code == 201, response.text
            session_id = response.json()["session_id"]
            assert listening_failure(instance_b.ctx) is not None, "the offer missed the gap"
            offer = await channel.receive("session_offer")
            assert offer["session_id"] == session_id
            assert "listening for session offers again, after" in caplog.text
            assert (await client.get(url_b + "/healthz")).status_code == 200

            # Never twice: not by the catch-up, not by a late notice naming it.
            assert await deliver_here(instance_b.ctx, team, session_id) is OfferDelivery.SENT
            await _no_second_offer(channel)


async def test_an_offer_expired_before_the_catch_up_ends_offer_undelivered(
    postgres_cluster: PostgresCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(offer_bus, "LISTEN_RETRY_MIN_SECONDS", WIDE_RETRY_SECONDS)
    database = postgres_cluster.create_database(f"expired_gap_{os.getpid()}")
    data = tmp_path / "data"
    async with (
        open_store(database) as store_a,
        open_store(database) as store_b,
        open_store(database) as admin_store,
        served_instance(store_a, data) as (instance_a, _),
        served_instance(store_b, data) as (instance_b, url_b),
    ):
        team = await instance_a.team("ops")
        admin = await instance_a.operator(team, "admin")
        agent = await enroll_agent(instance_a, admin)
        async with agent_channel(url_b, agent) as channel:
            await admin_store._fetch(  # noqa: SLF001 - raw SQL
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
            )
            await _until_not_listening(instance_b.ctx)
            response = await instance_a.call(
                admin, "POST", "/v1/sessions", {"target": "web-1", "mode": "shell"}
            )
            assert response.status_code == 201, response.text
            session_id = response.json()["session_id"]
            # B listens again after the offer expired (its agent's connection still fresh).
            instance_b.clock.now += SESSION_OFFER_SECONDS + 30
            with trio.fail_after(WAIT_SECONDS):
                while True:
                    row = await admin_store.get_session(team, session_id)
                    assert row is not None
                    if row.state.value != "offered":
                        break
                    await trio.sleep(0.05)
            assert (row.state.value, row.state_reason) == ("ended", offer_bus.OFFER_UNDELIVERED)
            [ended] = [
                event for event in await instance_b.audit_events(team)
                if event["action"] == "session.ended" and event["session_id"] == session_id
            ]  # fmt: skip
            assert ended["context"]["reason"] == offer_bus.OFFER_UNDELIVERED
            await _no_second_offer(channel)


async def test_an_open_agent_channel_the_database_outage_breaks_closes_1013_without_traceback(
    own_cluster: PostgresCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    database = own_cluster.create_database("channel_outage")
    async with open_store(database) as store, served_instance(store, tmp_path / "data") as (
        service,
        url,
    ):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            caplog.set_level(logging.INFO)
            await trio.to_thread.run_sync(_pg_ctl, own_cluster, "stop")
            try:
                await channel.send({"type": "heartbeat"})  # touch_agent meets the outage
                with trio.fail_after(WAIT_SECONDS), pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await channel.ws.get_message()
            finally:
                await trio.to_thread.run_sync(_pg_ctl, own_cluster, "start")
        assert closed.value.reason.code == CLOSE_TRY_AGAIN_LATER
        assert closed.value.reason.reason == STORE_UNAVAILABLE_REASON
        assert "Error in ASGI" not in caplog.text
        assert "UnexpectedMessageError" not in caplog.text
        # asyncpg's pool logs its own reconnect attempts with a traceback; the service must not.
        tracebacks = [
            record.getMessage()
            for record in caplog.records
            if record.exc_info and not record.name.startswith("asyncpg")
        ]
        assert not tracebacks
        assert f"store error during the control channel of {agent.agent_id}" in caplog.text
