"""PostgreSQL connections lost under a running instance (server restart, terminated backends).

The offer bus listens again and the agent channels stay up; the store drops connections the
server closed instead of failing a statement on them, or crashing on a detached pool proxy.
"""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

import pytest
import trio

from rendezvous.store import Store, open_store
from tests.pg_cluster import PostgresCluster
from tests.rendezvous.sessions_support import (
    WAIT_SECONDS,
    agent_channel,
    enroll_agent,
    served_instance,
)

pytestmark = [pytest.mark.anyio, pytest.mark.postgres]

_numbers = itertools.count(1)
LISTENERS = (
    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
    "AND query LIKE 'LISTEN%'"
)


@pytest.fixture
def shared_database(postgres_cluster: PostgresCluster) -> str:
    """A fresh PostgreSQL database for two instances to share."""
    return postgres_cluster.create_database(f"bus_{os.getpid()}_{next(_numbers)}")


async def _listener_pids(store: Store) -> set[int]:
    return {row["pid"] for row in await store._fetch(LISTENERS)}  # noqa: SLF001 - raw SQL


async def test_terminated_listen_connection_is_replaced_and_offers_still_arrive(
    shared_database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tucdesk.rendezvous.offers")
    data = tmp_path / "data"
    async with (
        open_store(shared_database) as store_a,
        open_store(shared_database) as store_b,
        open_store(shared_database) as admin_store,
        served_instance(store_a, data) as (instance_a, _),
        served_instance(store_b, data) as (instance_b, url_b),
    ):
        team = await instance_a.team("ops")
        admin = await instance_a.operator(team, "admin")
        agent = await enroll_agent(instance_a, admin)
        async with agent_channel(url_b, agent) as channel:
            before = await _listener_pids(admin_store)
            assert len(before) == 2
            # What `pg_terminate_backend` on the LISTEN sessions (or a server restart) does.
            await admin_store._fetch(  # noqa: SLF001 - raw SQL
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND query LIKE 'LISTEN%'"
            )
            with trio.fail_after(WAIT_SECONDS):
                while True:
                    after = await _listener_pids(admin_store)
                    if len(after) == 2 and not after & before:
                        break
                    await trio.sleep(0.05)
            assert "listening for session offers failed" in caplog.text

            # B's agent channel survived, and B hears A's offer on its new LISTEN connection.
            response = await instance_a.call(admin, "POST", "/v1/sessions",
                                             {"target": "web-1", "mode": "shell"})
            assert response.status_code == 201, response.text
            offer = await channel.receive("session_offer")
            assert offer["session_id"] == response.json()["session_id"]
    assert instance_b.ctx.instance_id


async def test_store_skips_idle_connections_the_server_closed(shared_database: str) -> None:
    async with (
        open_store(shared_database) as store,
        open_store(shared_database) as admin_store,
    ):
        # Several statements at once leave several idle connections on the store's shelf.
        async with trio.open_nursery() as nursery:
            for number in range(4):
                nursery.start_soon(store.create_team, f"team-{number}", 1.0)
        terminated = [
            row["pid"]
            for row in await admin_store._fetch(  # noqa: SLF001 - raw SQL
                "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        ]
        with trio.fail_after(WAIT_SECONDS):
            # The store's connections notice the server closed them (asynchronously). Only the
            # terminated ones are waited for: the shared database may have other clients.
            while await admin_store._fetch(  # noqa: SLF001, ASYNC110 - the server's state
                "SELECT pid FROM pg_stat_activity WHERE pid = ANY($1::int[])", terminated
            ):
                await trio.sleep(0.01)
        await trio.sleep(0.1)
        for number in range(4, 8):
            team = await store.create_team(f"team-{number}", 1.0)
            assert await store.get_team(team.id) == team
