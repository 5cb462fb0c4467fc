"""The SQLite backend: the embedded default, one file in the data dir.

stdlib ``sqlite3`` never runs on the event loop: every statement goes to a worker thread with
``trio.to_thread.run_sync``. One connection is shared and serialized by a trio lock, so a
transaction (``BEGIN IMMEDIATE`` … ``COMMIT``) holds it for its whole length; other processes
on the same file wait on SQLite's own lock for up to ``BUSY_TIMEOUT_MS``. WAL journal mode lets
readers in other processes run alongside a writer; ``synchronous=FULL`` makes a commit durable
before it returns (audit records must be on disk before the action they describe).

Reads that are one short indexed statement (authenticating a request, listing a team's agents)
are the exception: they run on the event loop, on a second, read-only connection, because a
thread hop costs several times what the query does. In WAL mode a reader does not wait for
writers; in the rare moments it would have to (another process recovering or closing the
database), that connection's zero busy timeout makes it give up at once and the statement is
run again the ordinary way, in a worker thread on the shared connection.
"""

from __future__ import annotations

import functools
import os
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from rendezvous.store.base import AlreadyExists, NotFound, StoreError, StoreUnavailable
from rendezvous.store.migrations import Migration
from rendezvous.store.migrations.sqlite import MIGRATIONS
from rendezvous.store.sql_store import Row, SqlSession, SqlStore

BUSY_TIMEOUT_MS = 10_000
INLINE_READ_BUSY_TIMEOUT_MS = 0
WAL_SWITCH_RETRY_SECONDS = 0.02
DATABASE_FILE_MODE = 0o600
_PLACEHOLDER = re.compile(r"\$(\d+)")


@functools.lru_cache(maxsize=512)
def _to_sqlite_placeholders(sql: str) -> str:
    """``$1`` → ``?1``: SQLite's numbered parameters, so one SQL text serves both backends."""
    return _PLACEHOLDER.sub(r"?\1", sql)


def _translate_error(exc: sqlite3.Error) -> StoreError:
    message = str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        if "UNIQUE" in message or "PRIMARY KEY" in message:
            return AlreadyExists("a row with this unique value already exists")
        if "FOREIGN KEY" in message:
            return NotFound("a row this one refers to does not exist")
    if isinstance(exc, sqlite3.OperationalError) and "locked" in message:
        return StoreUnavailable("the SQLite database stayed locked by another process")
    return StoreError(f"SQLite: {message}")


class _SqliteSession(SqlSession):
    """Statements on the shared connection, each run in a worker thread."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Run a query in a worker thread and return all rows."""
        return await trio.to_thread.run_sync(self._fetch_sync, sql, args)

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement in a worker thread and return how many rows it changed."""
        return await trio.to_thread.run_sync(self._execute_sync, sql, args)

    def _fetch_sync(self, sql: str, args: Sequence[Any]) -> list[Row]:
        try:
            return self._connection.execute(_to_sqlite_placeholders(sql), args).fetchall()
        except sqlite3.Error as exc:
            raise _translate_error(exc) from exc

    def _execute_sync(self, sql: str, args: Sequence[Any]) -> int:
        try:
            return self._connection.execute(_to_sqlite_placeholders(sql), args).rowcount
        except sqlite3.Error as exc:
            raise _translate_error(exc) from exc


class _InlineReadSession(SqlSession):
    """Read-only statements run on the event loop; a busy database sends them to ``fallback``."""

    def __init__(self, connection: sqlite3.Connection, fallback: SqlSession) -> None:
        self._connection = connection
        self._fallback = fallback

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Run a query here and now; if the database is busy, in a worker thread instead."""
        try:
            rows: list[Row] = self._connection.execute(
                _to_sqlite_placeholders(sql), args
            ).fetchall()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc):
                raise _translate_error(exc) from exc
            return await self._fallback.fetch(sql, *args)
        except sqlite3.Error as exc:
            raise _translate_error(exc) from exc
        return rows

    async def execute(self, sql: str, *args: Any) -> int:
        """Refused: this session only reads."""
        raise StoreError("an inline read session cannot change the database")


class SqliteStore(SqlStore):
    """The store on one SQLite file. Open it with ``open_sqlite_store``."""

    backend = "sqlite"
    _migrations = MIGRATIONS
    _schema_table_query = (
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    )
    understood_schema_version = max(m.version for m in MIGRATIONS)
    # No wanted tag (of the JSON parameter) is missing from the agent's tags (a JSON array).
    _agent_carries_tags = """NOT EXISTS (SELECT 1 FROM json_each({tags}) wanted
        WHERE wanted.value NOT IN (SELECT carried.value FROM json_each(a.tags) carried))"""

    def __init__(
        self, connection: sqlite3.Connection, path: str, reader: sqlite3.Connection
    ) -> None:
        super().__init__()
        self.path = path
        self._connection: sqlite3.Connection | None = connection
        self._reader: sqlite3.Connection | None = reader
        self._session = _SqliteSession(connection)
        self._read_session = _InlineReadSession(reader, _LockedSession(self))
        self._lock = trio.Lock()

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[SqlSession]:
        self._check_open()
        yield self._read_session

    @asynccontextmanager
    async def _autocommit(self) -> AsyncIterator[SqlSession]:
        async with self._lock:
            self._check_open()
            yield self._session

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[SqlSession]:
        async with self._lock:
            self._check_open()
            await self._session.execute("BEGIN IMMEDIATE")
            try:
                yield self._session
                with trio.CancelScope(shield=True):
                    await self._session.execute("COMMIT")
            except BaseException:
                # Also after a failed COMMIT, so the shared connection never stays mid-transaction.
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(self._rollback_sync)
                raise

    def _rollback_sync(self) -> None:
        assert self._connection is not None
        if self._connection.in_transaction:
            self._connection.execute("ROLLBACK")

    def _check_open(self) -> None:
        if self._connection is None:
            raise StoreError("the store is closed")

    async def aclose(self) -> None:
        """Close the connections. Idempotent."""
        async with self._lock:
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.close()
            connection, self._connection = self._connection, None
            if connection is not None:
                await trio.to_thread.run_sync(connection.close)


class _LockedSession(SqlSession):
    """The shared connection's session taken under the store's lock, one statement at a time."""

    def __init__(self, store: SqliteStore) -> None:
        self._store = store

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Run a query on the shared connection in a worker thread."""
        async with self._store._autocommit() as session:
            return await session.fetch(sql, *args)

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement on the shared connection in a worker thread."""
        async with self._store._autocommit() as session:
            return await session.execute(sql, *args)


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    message = str(exc)
    return "locked" in message or "busy" in message


def _connect_sync(path: str) -> sqlite3.Connection:
    parent = Path(path).parent
    if not parent.is_dir():
        raise StoreUnavailable(f"directory for the SQLite database does not exist: {parent}")
    # Create the file owner-only before SQLite does; its -wal and -shm files copy the mode.
    if not os.path.exists(path):
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, DATABASE_FILE_MODE))
    try:
        connection = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000
        )
        connection.row_factory = sqlite3.Row
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = _enable_wal(connection)
        if str(mode).lower() != "wal":
            raise StoreUnavailable(f"SQLite refused WAL journal mode (got {mode})")
        connection.execute("PRAGMA synchronous = FULL")
        connection.execute("PRAGMA foreign_keys = ON")
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot open SQLite database {path}: {exc}") from exc
    return connection


def _connect_reader_sync(path: str) -> sqlite3.Connection:
    """A read-only connection for inline reads: never writes, never waits for a lock."""
    try:
        reader = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=0)
        reader.row_factory = sqlite3.Row
        reader.execute(f"PRAGMA busy_timeout = {INLINE_READ_BUSY_TIMEOUT_MS}")
        reader.execute("PRAGMA query_only = ON")
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot open SQLite database {path}: {exc}") from exc
    return reader


def _enable_wal(connection: sqlite3.Connection) -> str:
    """Switch to WAL, retrying while another process is opening the same new database.

    Changing the journal mode needs the database to itself, and SQLite answers "locked" at once
    (without its busy handler) when it is not; several instances starting together on a fresh
    file therefore retry here, within the same bound as any other lock wait.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return str(connection.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(WAL_SWITCH_RETRY_SECONDS)


def _migrate_sync(
    connection: sqlite3.Connection, migrations: Sequence[Migration]
) -> list[tuple[int, str]]:
    """Apply pending migrations in one IMMEDIATE transaction; return (version, name) applied."""
    applied: list[tuple[int, str]] = []
    connection.execute("BEGIN IMMEDIATE")
    try:
        connection.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version INTEGER PRIMARY KEY,
                   name TEXT NOT NULL,
                   applied_at REAL NOT NULL
               )"""
        )
        done = {row[0] for row in connection.execute("SELECT version FROM schema_migrations")}
        newest_known = max((m.version for m in migrations), default=0)
        if done and max(done) > newest_known:
            raise StoreUnavailable(
                f"the database schema (version {max(done)}) is newer than this program "
                f"understands ({newest_known}); upgrade tucdesk"
            )
        for migration in migrations:
            if migration.version in done:
                continue
            for statement in migration.statements:
                connection.execute(statement)
            connection.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )
            applied.append((migration.version, migration.name))
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    return applied


@asynccontextmanager
async def open_sqlite_store(
    path: str | os.PathLike[str], *, migrate: bool = True
) -> AsyncIterator[SqliteStore]:
    """Open the SQLite store at ``path`` (created 0600 if missing), migrate it unless told not
    to, close on exit."""
    location = os.fspath(path)
    connection = await trio.to_thread.run_sync(_connect_sync, location)
    applied: list[tuple[int, str]] = []
    try:
        if migrate:
            applied = await trio.to_thread.run_sync(_migrate_sync, connection, MIGRATIONS)
    except sqlite3.Error as exc:
        await trio.to_thread.run_sync(connection.close)
        raise StoreUnavailable(f"cannot migrate SQLite database {location}: {exc}") from exc
    except BaseException:
        await trio.to_thread.run_sync(connection.close)
        raise
    try:
        reader = await trio.to_thread.run_sync(_connect_reader_sync, location)
    except BaseException:
        await trio.to_thread.run_sync(connection.close)
        raise
    store = SqliteStore(connection, location, reader)
    store.applied_migrations = tuple(applied)
    try:
        yield store
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()
