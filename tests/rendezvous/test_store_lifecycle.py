"""Opening, migrating, restarting and closing the store; choosing a backend from a URL."""

from __future__ import annotations

import os
import sqlite3
import stat
import sys
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from rendezvous.store import Store, StoreError, StoreUnavailable, backend_for, open_store
from rendezvous.store.migrations import postgres as postgres_migrations
from rendezvous.store.migrations import sqlite as sqlite_migrations
from rendezvous.store.sql_store import SqlStore
from tests.pg_cluster import free_loopback_port

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000.0
PROJECT_ROOT = Path(__file__).resolve().parents[2]


async def applied_versions(store: Store) -> list[int]:
    assert isinstance(store, SqlStore)
    async with store._autocommit() as session:
        rows = await session.fetch("SELECT version FROM schema_migrations ORDER BY version")
    return [int(row["version"]) for row in rows]


# ---- migrations ----------------------------------------------------------------------------


async def test_opening_twice_applies_each_migration_once(database_url: str) -> None:
    async with open_store(database_url) as first:
        team = await first.create_team("ops", NOW)
        versions = await applied_versions(first)
    async with open_store(database_url) as second:
        assert await applied_versions(second) == versions
        assert await second.get_team(team.id) == team
    assert versions == [m.version for m in sqlite_migrations.MIGRATIONS]


async def test_concurrent_start_ups_migrate_once(database_url: str) -> None:
    opened: list[list[int]] = []

    async def start_instance() -> None:
        async with open_store(database_url) as instance:
            opened.append(await applied_versions(instance))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(start_instance)
    assert opened == [[m.version for m in postgres_migrations.MIGRATIONS]] * 4


async def test_schema_newer_than_the_program_is_refused(database_url: str) -> None:
    async with open_store(database_url) as store:
        assert isinstance(store, SqlStore)
        async with store._transaction() as session:
            await session.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                999, "from the future", NOW,
            )  # fmt: skip
    with pytest.raises(StoreUnavailable, match="newer"):
        async with open_store(database_url):
            pass


def test_both_backends_define_the_same_migration_numbers() -> None:
    assert [m.version for m in sqlite_migrations.MIGRATIONS] == [
        m.version for m in postgres_migrations.MIGRATIONS
    ]
    assert [m.name for m in sqlite_migrations.MIGRATIONS] == [
        m.name for m in postgres_migrations.MIGRATIONS
    ]


# ---- restart, close, failure ---------------------------------------------------------------


async def test_store_opened_in_one_task_serves_calls_from_unrelated_tasks(
    database_url: str,
) -> None:
    # Hypercorn runs each request in its own task, outside the task that opened the store.
    opened: list[Store] = []
    ready, finished = trio.Event(), trio.Event()

    async def owner() -> None:
        async with open_store(database_url) as store:
            opened.append(store)
            ready.set()
            await finished.wait()

    async def request(index: int) -> None:
        await opened[0].create_team(f"team-{index}", NOW)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner)
            await ready.wait()
            async with trio.open_nursery() as requests:
                for index in range(8):
                    requests.start_soon(request, index)
            assert len(await opened[0].list_teams()) == 8
            finished.set()



async def test_data_survives_close_and_reopen(database_url: str) -> None:
    async with open_store(database_url) as first:
        team = await first.create_team("ops", NOW)
        api_key = await first.create_api_key(team.id, "ci", ["a"], b"h" * 32, "op", NOW)
        await first.revoke_token(team.id, "jti-1", NOW + 900, NOW)
    async with open_store(database_url) as reopened:
        assert await reopened.list_teams() == [team]
        assert await reopened.get_api_key_by_hash(b"h" * 32) == api_key
        assert await reopened.is_token_revoked("jti-1")


_CRASHING_WRITER = """
import os, sys, trio
from rendezvous.store import open_store

async def main():
    async with open_store(sys.argv[1]) as store:
        await store.create_team("written-before-the-crash", 1.0)
        os._exit(0)  # no close, no checkpoint: as if the process were killed

trio.run(main)
"""


async def test_committed_writes_survive_a_crashed_process(database_url: str) -> None:
    with trio.fail_after(60):
        result = await trio.run_process(
            [sys.executable, "-c", _CRASHING_WRITER, database_url], cwd=PROJECT_ROOT, check=False,
            capture_stderr=True,
        )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    async with open_store(database_url) as reopened:
        assert [team.name for team in await reopened.list_teams()] == ["written-before-the-crash"]


async def test_sqlite_waits_for_a_locked_file_without_blocking_the_event_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "rendezvous.db"
    async with open_store(path) as store:
        other_process = sqlite3.connect(path, isolation_level=None)
        other_process.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
        ticks = 0
        created: list[str] = []

        async def create() -> None:
            created.append((await store.create_team("ops", NOW)).name)

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(create)
                while ticks < 20:  # the loop keeps running while the store waits on the lock
                    await trio.sleep(0.01)
                    ticks += 1
                assert created == []
                other_process.execute("COMMIT")
                other_process.close()
        assert created == ["ops"]


async def test_closed_store_refuses_calls(database_url: str) -> None:
    async with open_store(database_url) as store:
        pass
    with pytest.raises(StoreError):
        await store.list_teams()
    await store.aclose()  # idempotent


async def test_cancelled_transaction_leaves_no_trace(store: Store) -> None:
    assert isinstance(store, SqlStore)
    with trio.move_on_after(5) as scope:
        async with store._transaction() as session:
            await session.execute(
                "INSERT INTO teams (id, name, created_at) VALUES ($1, $2, $3)", "tm_x", "x", NOW
            )
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert await store.list_teams() == []
    assert (await store.create_team("after", NOW)).name == "after"  # nothing is left locked


async def test_failed_transaction_is_rolled_back(store: Store) -> None:
    assert isinstance(store, SqlStore)
    with pytest.raises(RuntimeError):
        async with store._transaction() as session:
            await session.execute(
                "INSERT INTO teams (id, name, created_at) VALUES ($1, $2, $3)", "tm_x", "x", NOW
            )
            raise RuntimeError("boom")
    assert await store.list_teams() == []


async def test_sqlite_file_is_owner_only_and_in_wal_mode(tmp_path: Path) -> None:
    path = tmp_path / "rendezvous.db"
    async with open_store(path) as store:
        assert store.backend == "sqlite"
        assert isinstance(store, SqlStore)
        async with store._autocommit() as session:
            row = await session.fetchrow("PRAGMA journal_mode")
        assert row is not None and str(row["journal_mode"]).lower() == "wal"
        await store.create_team("ops", NOW)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


async def test_sqlite_in_a_missing_directory_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="does not exist"):
        async with open_store(f"sqlite:///{tmp_path}/missing/rendezvous.db"):
            pass


async def test_unreachable_postgres_is_unavailable_without_echoing_the_url() -> None:
    url = f"postgresql://tucdesk:hunter2@127.0.0.1:{free_loopback_port()}/rendezvous"
    with trio.fail_after(30):
        with pytest.raises(StoreUnavailable) as refused:
            async with open_store(url):
                pass
    assert "hunter2" not in str(refused.value)


# ---- choosing a backend --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("database", "expected"),
    [
        ("sqlite:////var/lib/tucdesk/r.db", ("sqlite", "/var/lib/tucdesk/r.db")),
        ("sqlite:///var/lib/tucdesk/r.db", ("sqlite", "/var/lib/tucdesk/r.db")),
        ("sqlite://relative/r.db", ("sqlite", "relative/r.db")),
        ("/var/lib/tucdesk/r.db", ("sqlite", "/var/lib/tucdesk/r.db")),
        ("r.db", ("sqlite", "r.db")),
        ("postgresql://u@127.0.0.1:5432/db", ("postgres", "postgresql://u@127.0.0.1:5432/db")),
        ("postgres://u@127.0.0.1/db", ("postgres", "postgres://u@127.0.0.1/db")),
    ],
)
def test_backend_is_chosen_from_the_url_or_path(database: str, expected: tuple[str, str]) -> None:
    assert backend_for(database) == expected


@pytest.mark.parametrize("database", ["mysql://x/y", "sqlite://", "http://127.0.0.1/"])
def test_unsupported_database_urls_are_refused(database: str) -> None:
    with pytest.raises(StoreUnavailable):
        backend_for(database)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_any_database_string_names_one_backend_or_is_refused(database: str) -> None:
    try:
        kind, location = backend_for(database)
    except StoreUnavailable:
        assert "://" in database or not database.strip()
        return
    assert kind in ("sqlite", "postgres")
    assert location
    if kind == "postgres":
        assert location == database


# ---- the PostgreSQL fixture's policy -------------------------------------------------------


def test_missing_postgres_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.rendezvous.conftest import _postgres_missing

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        _postgres_missing("initdb not found")


def test_missing_postgres_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.rendezvous.conftest import _postgres_missing

    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="initdb not found"):
        _postgres_missing("initdb not found")
