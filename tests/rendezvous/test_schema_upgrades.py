"""Upgrades across schema changes: migrations refused while others are connected, connections
named with version and schema, `init` saying what it applied, `db status`, and a serving
instance stopping when a newer build migrates the database under it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import trio

from rendezvous.main import main, sole_error
from rendezvous.server import sole_sqlite_server
from rendezvous.store import SchemaTooNew, Store, backend_for, open_store, schema_watch
from rendezvous.store.migrations import postgres as postgres_migrations
from rendezvous.store.migrations import sqlite as sqlite_migrations
from rendezvous.store.postgres import APPLICATION_NAME, _migrate
from rendezvous.store.sql_store import SqlStore
from rendezvous.store.sqlite import _migrate_sync
from tests.pg_cluster import PostgresCluster
from tests.rendezvous.live_server import live_service

OLD_SCHEMA = 6
NEWEST = postgres_migrations.MIGRATIONS[-1].version
NOW = 1_800_000_000.0
PROJECT_ROOT = Path(__file__).resolve().parents[2]
_numbers = itertools.count(1)


def migrate_to(database_url: str, version: int) -> None:
    """Bring a fresh database to an older schema, as an earlier build left it."""
    kind, location = backend_for(database_url)
    if kind == "sqlite":
        connection = sqlite3.connect(location, isolation_level=None)
        try:
            _migrate_sync(connection, sqlite_migrations.MIGRATIONS[:version])
        finally:
            connection.close()
        return

    async def run() -> None:
        connection = await asyncpg.connect(location)
        try:
            await _migrate(connection, postgres_migrations.MIGRATIONS[:version])
        finally:
            await connection.close()

    asyncio.run(run())


def schema_of(database_url: str) -> int:
    kind, location = backend_for(database_url)
    if kind == "sqlite":
        connection = sqlite3.connect(location)
        try:
            row = connection.execute("SELECT MAX(version) FROM schema_migrations").fetchone()
            return int(row[0])
        finally:
            connection.close()

    async def run() -> int:
        connection = await asyncpg.connect(location)
        try:
            return int(await connection.fetchval("SELECT MAX(version) FROM schema_migrations"))
        finally:
            await connection.close()

    return asyncio.run(run())


@contextlib.contextmanager
def connected_client(url: str, application_name: str | None = None) -> Iterator[int]:
    """Another client (an older instance: no application_name) connected for the block; yields
    its backend pid."""
    ready, stop = threading.Event(), threading.Event()
    pids: list[int] = []
    failures: list[BaseException] = []

    async def hold() -> None:
        settings = {"application_name": application_name} if application_name else None
        connection = await asyncpg.connect(url, server_settings=settings)
        pids.append(connection.get_server_pid())
        ready.set()
        await asyncio.to_thread(stop.wait)
        await connection.close()

    def run() -> None:
        try:
            asyncio.run(hold())
        except BaseException as error:  # noqa: BLE001 - reported to the test below
            failures.append(error)
            ready.set()

    thread = threading.Thread(target=run)
    thread.start()
    try:
        assert ready.wait(30) and not failures, failures
        yield pids[0]
    finally:
        stop.set()
        thread.join(30)


@pytest.fixture
def postgres_database(postgres_cluster: PostgresCluster) -> str:
    """A fresh, empty PostgreSQL database."""
    return postgres_cluster.create_database(f"upgrade_{os.getpid()}_{next(_numbers)}")


def _dirs(tmp_path: Path, database_url: str) -> list[str]:
    return ["--data-dir", str(tmp_path / "data"), "--database", database_url]


# ---- refusing to migrate under a running instance ------------------------------------------


@pytest.mark.postgres
def test_init_refuses_to_migrate_while_an_older_instance_is_connected(
    postgres_database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    migrate_to(postgres_database, OLD_SCHEMA)
    with connected_client(postgres_database) as old_pid:
        assert main(["init", *_dirs(tmp_path, postgres_database)]) == 1
        error = capsys.readouterr().err
        assert f"from {OLD_SCHEMA} to {NEWEST}" in error
        assert f"pid {old_pid}" in error and "127.0.0.1" in error
        assert "Stop every tucdesk-rendezvous" in error and "--while-running" in error
        assert error.count("\n") == 1
        assert schema_of(postgres_database) == OLD_SCHEMA

        assert main(["init", "--while-running", *_dirs(tmp_path, postgres_database)]) == 0
    out = capsys.readouterr().out
    assert f"applied migrations {OLD_SCHEMA + 1}..{NEWEST}: " in out
    assert f"schema now {NEWEST}" in out
    assert schema_of(postgres_database) == NEWEST


@pytest.mark.postgres
def test_serve_refuses_to_migrate_while_an_older_instance_is_connected(
    postgres_database: str, tmp_path: Path
) -> None:
    migrate_to(postgres_database, OLD_SCHEMA)
    with connected_client(postgres_database):
        # Were the migration not refused, serve would run until the timeout fails the test.
        result = subprocess.run(
            [sys.executable, "-m", "rendezvous.main", "serve", "--insecure-http",
             "--listen", "127.0.0.1:0", *_dirs(tmp_path, postgres_database)],
            capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT,
            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "refusing to migrate the database schema" in result.stderr
    assert schema_of(postgres_database) == OLD_SCHEMA


@pytest.mark.postgres
def test_clients_of_this_same_build_do_not_block_a_migration(
    postgres_database: str, tmp_path: Path
) -> None:
    # e.g. the other workers of the same `serve --workers N`, starting together.
    migrate_to(postgres_database, OLD_SCHEMA)
    with connected_client(postgres_database, application_name=APPLICATION_NAME):
        assert main(["init", *_dirs(tmp_path, postgres_database)]) == 0
    assert schema_of(postgres_database) == NEWEST


@pytest.mark.postgres
def test_a_fresh_database_is_created_whoever_is_connected(
    postgres_database: str, tmp_path: Path
) -> None:
    with connected_client(postgres_database):
        assert main(["init", *_dirs(tmp_path, postgres_database)]) == 0
    assert schema_of(postgres_database) == NEWEST


def test_init_on_sqlite_refuses_to_migrate_while_an_instance_serves_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data").mkdir()
    url = f"sqlite:///{tmp_path / 'data' / 'rendezvous.db'}"
    migrate_to(url, OLD_SCHEMA)
    with sole_sqlite_server(url):
        assert main(["init", *_dirs(tmp_path, url)]) == 1
        assert "already serving" in capsys.readouterr().err
        assert schema_of(url) == OLD_SCHEMA
    assert main(["init", *_dirs(tmp_path, url)]) == 0
    assert schema_of(url) == NEWEST


def test_init_on_sqlite_with_nothing_to_migrate_runs_beside_a_serving_instance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data").mkdir()
    url = f"sqlite:///{tmp_path / 'data' / 'rendezvous.db'}"
    assert main(["init", *_dirs(tmp_path, url)]) == 0
    with sole_sqlite_server(url):
        assert main(["init", *_dirs(tmp_path, url)]) == 0
    assert f"schema {NEWEST}, up to date" in capsys.readouterr().out


@pytest.mark.anyio
@pytest.mark.postgres
async def test_every_connection_names_the_program_version_and_schema(
    postgres_database: str,
) -> None:
    assert APPLICATION_NAME.startswith("tucdesk-rendezvous ")
    assert APPLICATION_NAME.endswith(f" schema {NEWEST}")
    async with open_store(postgres_database) as store:
        assert isinstance(store, SqlStore)
        rows = await store._fetch(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
        )
    assert rows and {row["application_name"] for row in rows} == {APPLICATION_NAME}


# ---- saying what was applied ---------------------------------------------------------------


def test_init_says_which_migrations_it_applied_then_that_the_schema_is_current(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data").mkdir()
    url = f"sqlite:///{tmp_path / 'data' / 'rendezvous.db'}"
    migrate_to(url, OLD_SCHEMA)
    assert main(["init", *_dirs(tmp_path, url)]) == 0
    out = capsys.readouterr().out
    names = ", ".join(m.name for m in sqlite_migrations.MIGRATIONS[OLD_SCHEMA:])
    assert f"store: sqlite (applied migrations 7..{NEWEST}: {names}; schema now {NEWEST})" in out
    assert main(["init", *_dirs(tmp_path, url)]) == 0
    assert f"store: sqlite (schema {NEWEST}, up to date)" in capsys.readouterr().out


@pytest.mark.anyio
async def test_opening_the_store_logs_what_it_applied_and_the_schema(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="tucdesk.rendezvous.store"):
        async with open_store(database_url):
            pass
        async with open_store(database_url):
            pass
    messages = [r.getMessage() for r in caplog.records if r.name == "tucdesk.rendezvous.store"]
    assert len(messages) == 2
    assert f"applied migrations 1..{NEWEST}: " in messages[0]
    assert messages[1].endswith(f": schema {NEWEST}, up to date")


def test_db_status_shows_versions_and_pending_migrations_and_changes_nothing(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "data").mkdir(exist_ok=True)
    migrate_to(database_url, OLD_SCHEMA)
    assert main(["db", "status", *_dirs(tmp_path, database_url)]) == 0
    out = capsys.readouterr().out
    assert f"database schema: {OLD_SCHEMA}\n" in out
    assert f"this program understands: {NEWEST} (tucdesk-rendezvous " in out
    assert f"pending migrations: 7 {sqlite_migrations.MIGRATIONS[6].name}, 8 " in out
    assert f"backend: {backend_for(database_url)[0]}" in out
    assert schema_of(database_url) == OLD_SCHEMA
    if database_url.startswith("postgresql"):
        with connected_client(database_url) as other:
            assert main(["db", "status", *_dirs(tmp_path, database_url)]) == 0
        out = capsys.readouterr().out
        assert "other clients connected: 1" in out and f"pid {other} " in out


def test_db_status_of_a_current_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "--data-dir", str(tmp_path / "data")]) == 0
    capsys.readouterr()
    assert main(["db", "status", "--data-dir", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert f"database schema: {NEWEST}\n" in out and "pending migrations: none" in out


# ---- a serving instance noticing a newer schema --------------------------------------------


async def _record_future_migration(store: Store, version: int) -> None:
    assert isinstance(store, SqlStore)
    async with store._transaction() as session:
        await session.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            version, "from a newer build", NOW,
        )  # fmt: skip


@pytest.mark.anyio
async def test_schema_watch_stops_when_the_database_schema_is_newer(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    assert await store.schema_version() == store.understood_schema_version == NEWEST
    with trio.move_on_after(0.3):
        await schema_watch.watch_schema_version(store, interval=0.02)  # current: keeps watching
    await _record_future_migration(store, NEWEST + 1)
    with caplog.at_level(logging.ERROR), trio.fail_after(10):
        with pytest.raises(SchemaTooNew, match=f"now version {NEWEST + 1}"):
            await schema_watch.watch_schema_version(store, interval=0.02)
    assert any(
        record.levelno == logging.ERROR and "newer than this program" in record.getMessage()
        for record in caplog.records
    )


@pytest.mark.anyio
async def test_a_serving_instance_stops_when_a_newer_build_migrates_its_database(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(schema_watch, "SCHEMA_CHECK_SECONDS", 0.05)
    (tmp_path / "data").mkdir()
    with trio.fail_after(30):
        try:
            async with live_service(tmp_path / "data", database_url):
                async with open_store(database_url) as other:
                    await _record_future_migration(other, NEWEST + 1)
                await trio.sleep(25)  # the service ends first, cancelling this
        except BaseException as raised:  # noqa: BLE001 - nurseries wrap it in groups
            error = sole_error(raised)
        else:
            pytest.fail("the service went on serving on a schema newer than it understands")
    assert isinstance(error, SchemaTooNew), error


# ---- admin commands never migrate ----------------------------------------------------------

# Every command that opens the store, but init (which migrates) and db status (which reports).
ADMIN_COMMANDS = (
    ["team", "create", "acme"],
    ["team", "list"],
    ["invite", "create", "--team", "acme", "--email", "a@example.com", "--role", "operator"],
    ["audit", "export", "--service", "-o", "export.bundle"],
    ["keys", "show"],
    ["keys", "rotate", "audit-signer"],
)


def _old_store_with_keys(tmp_path: Path, database_url: str) -> list[str]:
    """A data dir with service keys (initialised on another database) and ``database_url`` at
    OLD_SCHEMA, as an older build left it: the arguments naming both."""
    (tmp_path / "data").mkdir(exist_ok=True)
    keys_from = f"sqlite:///{tmp_path / 'data' / 'keys-from.db'}"
    assert main(["init", *_dirs(tmp_path, keys_from)]) == 0
    migrate_to(database_url, OLD_SCHEMA)
    return _dirs(tmp_path, database_url)


def test_admin_commands_on_sqlite_do_not_migrate_under_a_serving_older_instance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The reviewer's case: an older instance serves (it holds the serve lock); a newer build's
    # `team create` migrated the database under it, which init itself refuses.
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'data' / 'rendezvous.db'}"
    arguments = _old_store_with_keys(tmp_path, url)
    capsys.readouterr()
    with sole_sqlite_server(url):
        for command in ADMIN_COMMANDS:
            assert main([*command, *arguments]) == 1, command
            error = capsys.readouterr().err
            assert error == (
                f"tucdesk-rendezvous: the database schema is {OLD_SCHEMA}, this program needs "
                f"{NEWEST}: run `tucdesk-rendezvous init` first (stop every instance before: "
                "docs/self-hosting.md, 'Upgrading')\n"
            ), command
            assert schema_of(url) == OLD_SCHEMA, command
    assert not (tmp_path / "export.bundle").exists()


def test_admin_commands_refuse_a_schema_init_has_not_migrated(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    arguments = _old_store_with_keys(tmp_path, database_url)
    capsys.readouterr()
    for command in ADMIN_COMMANDS:
        assert main([*command, *arguments]) == 1, command
        error = capsys.readouterr().err
        assert f"the database schema is {OLD_SCHEMA}, this program needs {NEWEST}" in error
        assert "run `tucdesk-rendezvous init` first" in error
        # Not a flag these commands take.
        assert "--while-running" not in error, command
        assert schema_of(database_url) == OLD_SCHEMA, command
    assert main(["init", *arguments]) == 0
    assert main(["team", "create", "acme", *arguments]) == 0
    assert schema_of(database_url) == NEWEST


@pytest.mark.postgres
def test_admin_commands_on_postgres_never_suggest_a_flag_they_do_not_take(
    postgres_database: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # With another client connected the migration refusal (which names --while-running) used
    # to answer `team create`, which has no such flag.
    arguments = _old_store_with_keys(tmp_path, postgres_database)
    capsys.readouterr()
    with connected_client(postgres_database):
        assert main(["team", "create", "acme", *arguments]) == 1
    error = capsys.readouterr().err
    assert "run `tucdesk-rendezvous init` first" in error and "--while-running" not in error
    assert schema_of(postgres_database) == OLD_SCHEMA


def test_admin_commands_refuse_a_schema_newer_than_they_understand(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", *_dirs(tmp_path, database_url)]) == 0

    async def record() -> None:
        async with open_store(database_url) as store:
            await _record_future_migration(store, NEWEST + 1)

    trio.run(record)
    capsys.readouterr()
    assert main(["team", "create", "acme", *_dirs(tmp_path, database_url)]) == 1
    error = capsys.readouterr().err
    assert f"the database schema is {NEWEST + 1}, newer than this program understands" in error
    assert error.count("\n") == 1


# ---- other roles' sessions -----------------------------------------------------------------


@contextlib.contextmanager
def roles_on(cluster: PostgresCluster, database_url: str) -> Iterator[tuple[str, str]]:
    """Two fresh roles without pg_read_all_stats: the database's owner (the one tucdesk uses)
    and another one (an older instance configured with other credentials). Yields both URLs."""
    number = next(_numbers)
    owner, other = f"tuc_owner_{number}", f"tuc_other_{number}"
    database = database_url.rsplit("/", 1)[1]

    async def run(statements: list[str]) -> None:
        connection = await asyncpg.connect(database_url)
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    asyncio.run(run([
        f"CREATE ROLE {owner} LOGIN", f"CREATE ROLE {other} LOGIN",
        f"ALTER DATABASE {database} OWNER TO {owner}",
    ]))  # fmt: skip
    base = f"postgresql://{{}}@127.0.0.1:{cluster.port}/{database}"
    yield base.format(owner), base.format(other)


@pytest.mark.postgres
def test_init_refuses_to_migrate_while_another_roles_session_is_connected(
    postgres_cluster: PostgresCluster, postgres_database: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A role without pg_read_all_stats sees another role's session with backend_type NULL: the
    # check used to drop it, and init migrated under the older instance.
    with roles_on(postgres_cluster, postgres_database) as (owner_url, other_url):
        migrate_to(owner_url, OLD_SCHEMA)
        with connected_client(other_url) as old_pid:
            assert main(["db", "status", *_dirs(tmp_path, owner_url)]) == 0
            out = capsys.readouterr().out
            assert "other clients connected: 1\n" in out and f"pid {old_pid} " in out
            assert "1 connection(s) by other roles, details hidden: grant pg_read_all_stats" in out

            assert main(["init", *_dirs(tmp_path, owner_url)]) == 1
            error = capsys.readouterr().err
            assert f"from {OLD_SCHEMA} to {NEWEST} while 1 other client(s)" in error
            assert f"pid {old_pid} " in error and "tuc_other_" in error
            assert "details hidden: grant pg_read_all_stats to see them" in error
            assert schema_of(owner_url) == OLD_SCHEMA


@pytest.mark.postgres
def test_connection_capacity_counts_other_roles_sessions(
    postgres_cluster: PostgresCluster, postgres_database: str
) -> None:
    from rendezvous.store.postgres import PostgresStore

    async def count(url: str, other_url: str) -> tuple[int, int]:
        async with open_store(url) as store:
            assert isinstance(store, PostgresStore)
            before = (await store.connection_capacity()).connected
            with connected_client(other_url), connected_client(other_url):
                during = (await store.connection_capacity()).connected
        return before, during

    with roles_on(postgres_cluster, postgres_database) as (owner_url, other_url):
        before, during = trio.run(count, owner_url, other_url)
    assert during == before + 2


@pytest.mark.postgres
def test_autovacuum_workers_are_not_taken_for_other_clients(
    postgres_cluster: PostgresCluster, postgres_database: str
) -> None:
    # To a role without pg_read_all_stats an autovacuum worker on the database also shows a
    # NULL backend_type; counted as a hidden client, it refused migrations at random. Here the
    # cluster vacuums every second and a table churns until a worker has been seen at work,
    # while the owner role asks the store's question.
    from rendezvous.store.postgres import OTHER_CLIENTS_SQL

    async def admin(statements: list[str]) -> None:
        connection = await asyncpg.connect(postgres_database)
        try:
            for statement in statements:
                await connection.execute(statement)
        finally:
            await connection.close()

    async def watch(owner_url: str) -> tuple[int, list[object]]:
        seen_workers, listed = 0, []
        watcher = await asyncpg.connect(postgres_database)
        churn = await asyncpg.connect(owner_url)
        asking = await asyncpg.connect(owner_url, server_settings={"application_name": "asker"})
        try:
            await churn.execute(
                "CREATE TABLE churn (id int PRIMARY KEY, v int) WITH (autovacuum_vacuum_threshold"
                " = 1, autovacuum_vacuum_scale_factor = 0, autovacuum_analyze_threshold = 1)"
            )
            await churn.execute("INSERT INTO churn SELECT g, 0 FROM generate_series(1, 50000) g")
            # Ends as soon as workers were seen; the launcher's three workers may be busy with
            # the hundreds of other test databases in this cluster first (a full run once saw
            # none within 30 s), hence the generous bound.
            deadline = time.monotonic() + 120
            while seen_workers < 3 and time.monotonic() < deadline:
                await churn.execute("UPDATE churn SET v = v + 1")
                for _ in range(25):
                    workers = await watcher.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                        "'autovacuum worker' AND datname = current_database()"
                    )
                    rows = await asking.fetch(OTHER_CLIENTS_SQL)
                    # Besides the asker: the churning and watching connections, never more.
                    listed += [dict(row) for row in rows if row["pid"] not in (
                        churn.get_server_pid(), watcher.get_server_pid())]
                    seen_workers += 1 if workers else 0
                    await asyncio.sleep(0.02)
        finally:
            for connection in (asking, churn, watcher):
                await connection.close()
        return seen_workers, listed

    asyncio.run(admin(["ALTER SYSTEM SET autovacuum_naptime = 1", "SELECT pg_reload_conf()"]))
    try:
        with roles_on(postgres_cluster, postgres_database) as (owner_url, _other_url):
            seen_workers, listed = asyncio.run(watch(owner_url))
    finally:
        asyncio.run(admin(["ALTER SYSTEM RESET autovacuum_naptime", "SELECT pg_reload_conf()"]))
    assert seen_workers, "no autovacuum worker ran during the test: it proved nothing"
    assert listed == [], listed
