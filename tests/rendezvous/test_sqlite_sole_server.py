"""One instance serves a SQLite database: a second is refused, and the one that starts forgets
the agent connections an instance that died (SIGKILL, power loss) left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from rendezvous.errors import ConfigError
from rendezvous.server import sole_sqlite_server
from rendezvous.store import open_store
from tests.rendezvous.live_server import live_service
from tests.rendezvous.test_store_agents import register, team_with_key

pytestmark = pytest.mark.anyio


def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'rendezvous.db'}"


async def test_a_second_server_of_one_sqlite_database_is_refused(tmp_path: Path) -> None:
    database = sqlite_url(tmp_path)
    async with live_service(tmp_path / "data", database):
        with pytest.raises(ExceptionGroup) as refused:
            async with live_service(tmp_path / "data", database):
                pass  # pragma: no cover - refused before it serves
        assert refused.group_contains(ConfigError, match=r"already serving .*rendezvous\.db")
    async with live_service(tmp_path / "data", database):  # the first has stopped: free again
        pass


def test_the_lock_names_its_holder_and_is_released_on_exit(tmp_path: Path) -> None:
    database = sqlite_url(tmp_path)
    with sole_sqlite_server(database) as sole:
        assert sole
        lock = tmp_path / "rendezvous.db.serve-lock"
        assert lock.stat().st_mode & 0o777 == 0o600
        with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
            with sole_sqlite_server(database):
                pass  # pragma: no cover
    with sole_sqlite_server(database) as sole:
        assert sole
    with sole_sqlite_server("postgresql://db.invalid/tucdesk") as sole:
        assert not sole  # several instances may share PostgreSQL


async def test_connections_a_dead_instance_left_are_forgotten_at_start(tmp_path: Path) -> None:
    database = sqlite_url(tmp_path)
    async with open_store(database) as store:
        team = await team_with_key(store, "k")
        agent = await register(store, "k")
        await store.mark_agent_connected(
            team.id, agent.id, "killed-instance", "c1", "machine-1", time.time()
        )
        assert (await store.list_agents(team.id))[0].online
    async with live_service(tmp_path / "data", database):
        async with open_store(database) as store:
            assert not (await store.list_agents(team.id))[0].online
