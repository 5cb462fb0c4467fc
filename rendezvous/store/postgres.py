"""The PostgreSQL backend: asyncpg, bridged into trio with trio-asyncio.

asyncpg runs only on asyncio. ``open_postgres_store`` opens a trio-asyncio loop (or reuses the
one already current in the calling task), creates an asyncpg pool on it, and every statement is
sent to that loop with ``trio_asyncio.aio_as_trio(..., loop=loop)``. Passing the loop explicitly
is what lets any trio task of the same run use the store — including Hypercorn request tasks
that were not started inside the ``async with`` block — as long as the block is still open.

Several rendezvous instances may share one database: every single-use check is a conditional
UPDATE decided by row locks, and migrations run under a transaction-scoped advisory lock.

Each crossing into asyncio costs about as much CPU as the query itself, and asyncpg's own
acquire/release adds several more turns of the asyncio loop, so statements borrow connections
from a small trio-side shelf of idle ones (taken from the pool as needed, handed back to it
when the shelf is full or a connection may be unhealthy): one crossing per statement.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import unicodedata
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import trio
import trio_asyncio

from protocol.errors import KeyFileError
from protocol.identity import read_private_file
from protocol.version import installed_version
from rendezvous.store.base import (
    MAX_NAME_LENGTH,
    Agent,
    AlreadyExists,
    MigrationRefused,
    NotFound,
    RegistrationKey,
    RegistrationKeyUnusable,
    StoreError,
    StoreUnavailable,
    new_id,
)
from rendezvous.store.migrations import Migration
from rendezvous.store.migrations.postgres import MIGRATIONS
from rendezvous.store.sql_store import (
    _CREATOR_DISABLED,
    Row,
    SqlSession,
    SqlStore,
    _check_text,
    _new_agent,
    _registration_key,
)

POOL_MIN_SIZE = 1
# Connections one process may open (database_pool_size); the LISTEN connection is one of them.
POOL_MAX_SIZE = 10
MIN_POOL_SIZE = 2
MAX_POOL_SIZE = 1000
UNDERSTOOD_SCHEMA_VERSION = max(m.version for m in MIGRATIONS)
# What pg_stat_activity shows for each of this program's connections (at most 63 bytes).
MAX_APPLICATION_NAME_BYTES = 63
APPLICATION_NAME = f"tucdesk-rendezvous {installed_version()} schema {UNDERSTOOD_SCHEMA_VERSION}"
APPLICATION_NAME = APPLICATION_NAME[:MAX_APPLICATION_NAME_BYTES]
CONNECT_TIMEOUT_SECONDS = 10.0
COMMAND_TIMEOUT_SECONDS = 30.0
ACQUIRE_TIMEOUT_SECONDS = 30.0
CLOSE_TIMEOUT_SECONDS = 10.0
# An idle LISTEN connection is probed this often: a silent drop (a NAT or firewall forgetting
# it) would otherwise stop cross-instance notices with nothing logged.
LISTEN_PROBE_SECONDS = 30.0
LISTEN_PROBE_TIMEOUT_SECONDS = 10.0
# Idle connections kept on the trio side between statements (the rest go back to the pool).
MAX_SHELVED_CONNECTIONS = 4
# Any fixed 64-bit number; all instances must agree on it.
MIGRATION_LOCK_KEY = 0x7475636465736B31  # "tucdesk1"
# Advisory locks keyed (class, hashtext(team id)): the two-int key space never meets the one-bigint
# space of MIGRATION_LOCK_KEY.
AUDIT_TURN_LOCK_CLASS = 0x61756474  # "audt"

T = TypeVar("T")

log = logging.getLogger("tucdesk.rendezvous.store")
# What one asyncio error report may put in the log (the driver's messages are short).
MAX_REPORTED_ERROR_CHARS = 300


def _translate_error(exc: BaseException) -> StoreError:
    if isinstance(exc, asyncpg.UniqueViolationError):
        return AlreadyExists("a row with this unique value already exists")
    if isinstance(exc, asyncpg.ForeignKeyViolationError):
        return NotFound("a row this one refers to does not exist")
    if isinstance(exc, asyncpg.PostgresError):
        return StoreError(f"PostgreSQL: {exc.__class__.__name__}: {exc}")
    return StoreUnavailable(f"PostgreSQL connection failed: {exc.__class__.__name__}: {exc}")


# InternalClientError: a statement sent on a connection whose backend has just ended (its
# error read, the close not yet) finds the protocol still consuming that error; the connection
# is gone, as with a lost one, and the next statement takes another.
_DATABASE_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)


def _is_open(connection: asyncpg.Connection) -> bool:
    """Whether a borrowed connection can still run statements.

    When the server closes a connection the pool takes it back at once and detaches the proxy
    we hold: every method of it then raises InterfaceError, ``is_closed`` included.
    """
    try:
        return not connection.is_closed()
    except asyncpg.InterfaceError:
        return False


def _discard(connection: asyncpg.Connection) -> None:
    """Terminate a connection that must not be reused (a no-op if the pool already took it)."""
    if _is_open(connection):
        connection.terminate()


# Other sessions on this database: everything but this connection and those of this very build
# (same version, same schema), which understand the schema it migrates to. A session of another
# role, seen by a role that is neither a superuser nor in pg_read_all_stats, shows its pid, user
# and application_name but NULL for backend_type, address and start time: it is still a client
# (maybe an older instance connected as another role), so it is listed, marked as hidden. An
# autovacuum worker on this database looks the same to such a role but has no user
# (usesysid NULL): it is not a client, and it would make a migration refused at random.
OTHER_CLIENTS_SQL = """
    SELECT pid, usename, application_name, CAST(client_addr AS TEXT) AS client_addr,
           EXTRACT(EPOCH FROM backend_start) AS backend_start,
           backend_type IS NULL AS details_hidden
    FROM pg_stat_activity
    WHERE datname = current_database() AND pid <> pg_backend_pid()
          AND (backend_type = 'client backend'
               OR (backend_type IS NULL AND usesysid IS NOT NULL))
          AND application_name IS DISTINCT FROM current_setting('application_name')
    ORDER BY backend_start NULLS LAST, pid"""

# max_connections, the connections reserved for superusers (and, from PostgreSQL 16, for roles
# with pg_use_reserved_connections), and the client connections open now (another role's show
# a NULL backend_type to a role without pg_read_all_stats; autovacuum workers, which have no
# user and take no connection slot, are left out).
CONNECTION_CAPACITY_SQL = """
    SELECT CAST(current_setting('max_connections') AS INTEGER) AS max_connections,
           CAST(current_setting('superuser_reserved_connections') AS INTEGER)
           + COALESCE(CAST(current_setting('reserved_connections', TRUE) AS INTEGER), 0)
           AS reserved,
           (SELECT COUNT(*) FROM pg_stat_activity
            WHERE backend_type = 'client backend'
                  OR (backend_type IS NULL AND datid IS NOT NULL
                      AND usesysid IS NOT NULL)) AS connected"""



@dataclass(frozen=True)
class DatabaseClient:
    """Another session connected to the database (a row of pg_stat_activity)."""

    pid: int
    user: str | None
    application_name: str
    client_address: str | None
    backend_start: float | None
    details_hidden: bool = False

    def describe(self) -> str:
        """One line for a person: who, from where, since when."""
        name = self.application_name or (
            "(no application_name: an older tucdesk-rendezvous, psql or another client)"
        )
        if self.details_hidden:
            return f"pid {self.pid} {name} user {self.user or '?'} (another role: details hidden)"
        where = self.client_address or "a local socket (or an address hidden from this role)"
        since = (
            time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(self.backend_start))
            if self.backend_start is not None
            else "?"
        )
        return f"pid {self.pid} {name} user {self.user or '?'} from {where} since {since}"


def _client(row: Any) -> DatabaseClient:
    start = row["backend_start"]
    return DatabaseClient(
        pid=int(row["pid"]),
        user=row["usename"],
        application_name=row["application_name"] or "",
        client_address=row["client_addr"],
        backend_start=float(start) if start is not None else None,
        details_hidden=bool(row["details_hidden"]),
    )


def hidden_clients_note(clients: Sequence[DatabaseClient]) -> str | None:
    """What to say when some clients' details were hidden from this role, else None."""
    hidden = sum(1 for client in clients if client.details_hidden)
    if not hidden:
        return None
    return (
        f"{hidden} connection(s) by other roles, details hidden: grant pg_read_all_stats to see "
        "them"
    )


@dataclass(frozen=True)
class ConnectionCapacity:
    """The server's connection limits and how many connections it has now."""

    max_connections: int
    reserved: int  # superuser_reserved_connections + reserved_connections (PostgreSQL 16+)
    connected: int

    @property
    def available(self) -> int:
        """Connections ordinary roles may still open."""
        return self.max_connections - self.reserved - self.connected


class _ProbeDue:
    """No notice came for LISTEN_PROBE_SECONDS: the listening connection is to be probed."""


class _Bridge:
    """Runs asyncio coroutine functions on one trio-asyncio loop, translating their errors."""

    def __init__(self, loop: trio_asyncio.TrioEventLoop) -> None:
        self.loop = loop

    async def call(self, function: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``await function(*args)`` on the asyncio loop; database errors become StoreErrors."""
        try:
            result: T = await trio_asyncio.aio_as_trio(function, loop=self.loop)(*args)
        except _DATABASE_ERRORS as exc:
            raise _translate_error(exc) from exc
        return result


class _PostgresSession(SqlSession):
    """Statements on one borrowed connection."""

    def __init__(self, bridge: _Bridge, connection: asyncpg.Connection) -> None:
        self._bridge = bridge
        self._connection = connection

    async def fetch(self, sql: str, *args: Any) -> list[Row]:
        """Run a query and return all rows."""
        rows: list[Row] = await self._bridge.call(self._connection.fetch, sql, *args)
        return rows

    async def execute(self, sql: str, *args: Any) -> int:
        """Run a statement and return how many rows it changed (from the command status)."""
        status: str = await self._bridge.call(self._connection.execute, sql, *args)
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0


class PostgresStore(SqlStore):
    """The store on a PostgreSQL database. Open it with ``open_postgres_store``."""

    backend = "postgres"
    notifications_supported = True
    _migrations = MIGRATIONS
    _schema_table_query = "SELECT 1 WHERE to_regclass('schema_migrations') IS NOT NULL"
    understood_schema_version = UNDERSTOOD_SCHEMA_VERSION
    # Under the B-tree's limit on an index entry (about 2.7 KB): seen_nonces' key holds it.
    _write_probe_bytes = 2 * 1024
    # JSON containment: the agent's tags (a JSON array) hold every tag of the JSON parameter.
    _agent_carries_tags = "CAST(a.tags AS jsonb) @> CAST(CAST({tags} AS TEXT) AS jsonb)"
    # The agent list's page is chosen before the join, or the planner sorts the whole team.
    _agent_page_apart = True

    def __init__(self, pool: asyncpg.Pool, bridge: _Bridge) -> None:
        super().__init__()
        self._pool: asyncpg.Pool | None = pool
        self._bridge = bridge
        self._shelf: list[asyncpg.Connection] = []
        # Connections taken from the pool and not yet handed back (shelved ones included).
        self._checked_out = 0

    def _open_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StoreError("the store is closed")
        return self._pool

    async def _borrow(self) -> asyncpg.Connection:
        pool = self._open_pool()
        while self._shelf:
            shelved = self._shelf.pop()
            if _is_open(shelved):
                return shelved
            # Closed while idle (server restarted, backend terminated): the pool has it back.
            self._checked_out -= 1
        connection: asyncpg.Connection = await self._bridge.call(
            functools.partial(pool.acquire, timeout=ACQUIRE_TIMEOUT_SECONDS)
        )
        self._checked_out += 1
        return connection

    async def _release(self, pool: asyncpg.Pool, connection: asyncpg.Connection) -> None:
        self._checked_out -= 1
        await self._bridge.call(pool.release, connection)

    async def _give_back(self, connection: asyncpg.Connection, reusable: bool) -> None:
        """Shelve a healthy, idle connection; hand anything else back to the pool.

        Never shelved while every pool connection is out: a task may be waiting in the pool's
        acquire, which a shelved connection would never reach (it waited out its timeout and
        failed as "database unavailable" with idle connections on the shelf).
        """
        pool = self._pool
        if (
            reusable
            and pool is not None
            and self._checked_out < pool.get_max_size()
            and len(self._shelf) < MAX_SHELVED_CONNECTIONS
            and _is_open(connection)
            and not connection.is_in_transaction()
        ):
            self._shelf.append(connection)
            return
        with trio.CancelScope(shield=True):
            if pool is None:
                _discard(connection)
                return
            # The pool's release waits out a cancelled statement, or terminates the connection.
            await self._release(pool, connection)

    @asynccontextmanager
    async def _autocommit(self) -> AsyncIterator[SqlSession]:
        connection = await self._borrow()
        reusable = False
        try:
            yield _PostgresSession(self._bridge, connection)
            reusable = True
        except StoreError as error:
            # A refused statement (constraint, bad input) leaves the connection as it was;
            # a lost one does not, nor may a cancelled one (not a StoreError).
            reusable = not isinstance(error, StoreUnavailable)
            raise
        finally:
            await self._give_back(connection, reusable)

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[SqlSession]:
        connection = await self._borrow()
        reusable = False
        try:
            transaction = connection.transaction()
            await self._bridge.call(transaction.start)
            try:
                yield _PostgresSession(self._bridge, connection)
                await self._bridge.call(transaction.commit)
                reusable = True
            except BaseException as error:
                with trio.CancelScope(shield=True):
                    try:
                        await self._bridge.call(transaction.rollback)
                    except (StoreError, asyncpg.InterfaceError):
                        # A statement cancelled mid-flight can leave the connection unusable.
                        _discard(connection)
                    else:
                        reusable = isinstance(error, StoreError) and not isinstance(
                            error, StoreUnavailable
                        )
                raise
        finally:
            await self._give_back(connection, reusable)

    # An optimistic append first tries the turn for its own statement: it fails (and its writer
    # then queues for the turn) while another writer holds it. A session holding the turn gets
    # it again, so appends inside the turn pass.
    _audit_turn_free = f"pg_try_advisory_xact_lock({AUDIT_TURN_LOCK_CLASS}, hashtext($1))"

    @asynccontextmanager
    async def _audit_writer_turn(self, team_id: str) -> AsyncIterator[SqlSession]:
        """A transaction holding the team's audit advisory lock until it commits or rolls back
        (so the lock can never outlive the block, even if the connection is reused)."""
        async with self._transaction() as session:
            await session.execute(
                "SELECT pg_advisory_xact_lock($1, hashtext($2))", AUDIT_TURN_LOCK_CLASS, team_id
            )
            yield session

    async def register_agent(
        self,
        key_hash: bytes,
        now: float,
        public_key: bytes,
        key_fingerprint: str,
        machine_fingerprint: str,
        hostname: str,
        name: str,
        expected_team_id: str | None = None,
    ) -> tuple[Agent, RegistrationKey]:
        """Spend the key and create the agent in one statement (one round trip, one commit).

        The same conditional UPDATE as on SQLite decides a race; the INSERT reads the key's
        team and tags from it, and a duplicate agent key fails the whole statement, so the
        registration key stays unused then.
        """
        _check_text("agent name", name, MAX_NAME_LENGTH)
        _check_text("hostname", hostname, MAX_NAME_LENGTH)
        agent_id = new_id("agt")
        key_hash = bytes(key_hash)
        async with self._autocommit() as session:
            try:
                row = await session.fetchrow(
                    f"""WITH spent AS (
                           UPDATE registration_keys SET used_at = $2, used_by_agent = $3
                           WHERE key_hash = $1 AND used_at IS NULL AND revoked_at IS NULL
                                 AND expires_at > $2
                                 AND (CAST($4 AS TEXT) IS NULL OR team_id = CAST($4 AS TEXT))
                                 AND NOT {_CREATOR_DISABLED}
                           RETURNING *
                       ), created AS (
                           INSERT INTO agents (id, team_id, name, hostname, tags, public_key,
                                               key_fingerprint, machine_fingerprint,
                                               registration_key_id, registered_at)
                           SELECT $3, spent.team_id, $5, $6, spent.tags, $7, $8, $9, spent.id, $2
                           FROM spent
                           RETURNING id
                       )
                       SELECT spent.* FROM spent""",  # noqa: S608 - a constant, no input
                    key_hash, now, agent_id, expected_team_id, name, hostname,
                    bytes(public_key), key_fingerprint, machine_fingerprint,
                )  # fmt: skip
            except AlreadyExists:
                raise AlreadyExists("an agent with this public key is already registered") from None
            if row is None:
                raise RegistrationKeyUnusable(
                    await self._registration_refusal(session, key_hash, now, expected_team_id)
                )
        key = _registration_key(row)
        agent = _new_agent(
            agent_id, key, name, hostname, public_key, key_fingerprint, machine_fingerprint, now
        )
        return agent, key

    async def other_clients(self) -> list[DatabaseClient]:
        """The other sessions on this database (not this program's own build): who they are."""
        return [_client(row) for row in await self._fetch(OTHER_CLIENTS_SQL)]

    async def connection_capacity(self) -> ConnectionCapacity:
        """max_connections, the connections reserved for superusers, and those open now."""
        # Other roles' sessions count too (hidden ones included); the server's own processes
        # (no database) do not take a connection slot.
        row = await self._fetchrow(CONNECTION_CAPACITY_SQL)
        assert row is not None
        return ConnectionCapacity(
            int(row["max_connections"]), int(row["reserved"]), int(row["connected"])
        )

    async def notify(self, channel: str, payload: str) -> None:
        """``NOTIFY channel, payload``: every instance LISTENing on ``channel`` receives it."""
        await self._execute("SELECT pg_notify($1, $2)", channel, payload)

    @asynccontextmanager
    async def listen(self, channel: str) -> AsyncIterator[AsyncIterator[str]]:
        """``LISTEN channel`` on a dedicated pooled connection; yields the payloads' iterator.

        The iterator raises StoreUnavailable when the connection is lost, or does not answer
        the probe sent after LISTEN_PROBE_SECONDS without a notice (LISTEN again then:
        notifications sent meanwhile are gone).
        """
        pool = self._open_pool()
        connection: asyncpg.Connection = await self._bridge.call(
            functools.partial(pool.acquire, timeout=ACQUIRE_TIMEOUT_SECONDS)
        )
        self._checked_out += 1
        payloads: asyncio.Queue[str | None] = asyncio.Queue()

        def on_notification(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            payloads.put_nowait(payload)

        def on_termination(_conn: object) -> None:
            payloads.put_nowait(None)

        async def next_payload() -> str | None | _ProbeDue:
            # The wait is timed on the asyncio side: a payload it took is never dropped.
            try:
                return await asyncio.wait_for(payloads.get(), LISTEN_PROBE_SECONDS)
            except TimeoutError:
                return _ProbeDue()

        async def probe_answered() -> bool:
            # Not asyncpg's own timeout: it would send a cancel request and wait for an answer
            # the dead connection never brings. Terminated instead, the query fails at once.
            answer = asyncio.ensure_future(connection.fetchval("SELECT 1"))
            await asyncio.wait({answer}, timeout=LISTEN_PROBE_TIMEOUT_SECONDS)
            if answer.done() and not answer.cancelled() and answer.exception() is None:
                return True
            _discard(connection)  # a hung connection must not be UNLISTENed or reused
            with contextlib.suppress(Exception):
                await answer
            return False

        async def probe() -> None:
            if not await self._bridge.call(probe_answered):
                raise StoreUnavailable(
                    "the PostgreSQL connection listening for notices did not answer a probe "
                    f"(SELECT 1) within {LISTEN_PROBE_TIMEOUT_SECONDS:g} s"
                )

        async def receive() -> AsyncIterator[str]:
            while True:
                payload = await self._bridge.call(next_payload)
                if isinstance(payload, _ProbeDue):
                    await probe()
                    continue
                if payload is None:
                    raise StoreUnavailable("the PostgreSQL connection listening for notices closed")
                yield payload

        try:
            connection.add_termination_listener(on_termination)
            await self._bridge.call(connection.add_listener, channel, on_notification)
            yield receive()
        finally:
            with trio.CancelScope(shield=True):
                if _is_open(connection):
                    try:
                        await self._bridge.call(
                            connection.remove_listener, channel, on_notification
                        )
                        connection.remove_termination_listener(on_termination)
                    except (StoreError, asyncpg.InterfaceError):
                        _discard(connection)
                # A lost connection is already back in the pool (releasing it again is a no-op).
                await self._release(pool, connection)

    async def aclose(self) -> None:
        """Close the pool (terminating connections that do not close in time). Idempotent."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        shelved, self._shelf = self._shelf, []
        with trio.CancelScope(shield=True):
            for connection in shelved:
                try:
                    await self._release(pool, connection)
                except StoreError:
                    _discard(connection)
            with trio.move_on_after(CLOSE_TIMEOUT_SECONDS) as scope:
                try:
                    await self._bridge.call(pool.close)
                except StoreError:
                    pool.terminate()
            if scope.cancelled_caught:
                pool.terminate()


async def _migrate(
    connection: asyncpg.Connection,
    migrations: Sequence[Migration],
    while_running: bool = False,
) -> list[tuple[int, str]]:
    """Apply pending migrations in one transaction under the migration advisory lock; return
    (version, name) of those applied.

    Refused (MigrationRefused) when the database already has a schema and other clients are
    connected, unless ``while_running``: an older instance still serving would keep applying
    its old rules to the new schema (it never looks at the version again).
    """
    applied: list[tuple[int, str]] = []
    async with connection.transaction():
        # Concurrent start-ups queue here; the second sees the first's work and does nothing.
        await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK_KEY)
        await connection.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version INTEGER PRIMARY KEY,
                   name TEXT NOT NULL,
                   applied_at DOUBLE PRECISION NOT NULL
               )"""
        )
        done = {row["version"] for row in await connection.fetch(
            "SELECT version FROM schema_migrations"
        )}  # fmt: skip
        newest_known = max((m.version for m in migrations), default=0)
        if done and max(done) > newest_known:
            raise StoreUnavailable(
                f"the database schema (version {max(done)}) is newer than this program "
                f"understands ({newest_known}); upgrade tucdesk"
            )
        pending = [m for m in migrations if m.version not in done]
        if pending and done and not while_running:
            others = [_client(row) for row in await connection.fetch(OTHER_CLIENTS_SQL)]
            if others:
                raise MigrationRefused(_refusal(max(done), pending, others))
        for migration in pending:
            for statement in migration.statements:
                await connection.execute(statement)
            await connection.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
                migration.version, migration.name, time.time(),
            )  # fmt: skip
            applied.append((migration.version, migration.name))
    return applied


def _refusal(current: int, pending: Sequence[Migration], others: Sequence[DatabaseClient]) -> str:
    listed = "; ".join(client.describe() for client in others)
    hidden = hidden_clients_note(others)
    if hidden is not None:
        listed += f" ({hidden})"
    return (
        f"refusing to migrate the database schema from {current} to {pending[-1].version} while "
        f"{len(others)} other client(s) are connected: {listed}. Stop every tucdesk-rendezvous "
        "instance using this database first (an older one would go on serving with its old "
        "rules on the new schema), then rerun; if none of these is a rendezvous instance, rerun "
        "with --while-running (docs/self-hosting.md, 'Upgrading')"
    )


async def _keep_session_state(connection: asyncpg.Connection) -> None:
    """The pool's reset hook: nothing beyond what asyncpg always does on release.

    asyncpg's default reset sends ``RESET ALL; UNLISTEN *; …`` on every release, a round trip
    that doubled the cost of each autocommit statement. This store leaves no session state to
    reset: it never SETs, holds only transaction-scoped advisory locks, and undoes its LISTEN
    before releasing. asyncpg itself still rolls back an open transaction and drops listener
    callbacks before calling this hook.
    """


UTF8_BYTE_ORDER_MARK = "\ufeff"


def _is_control_character(character: str) -> bool:
    """C0 and C1 controls and DEL: never typed into a password, often added by accident."""
    return unicodedata.category(character) == "Cc"


def password_from_file(path: Path) -> Callable[[], str]:
    """A password source asyncpg calls for every new connection: the file's first line, read
    afresh each time (so a rotated password needs no restart). The file must be 0600 or
    stricter, as key files must; its content never appears in an error."""

    def read() -> str:
        try:
            data = read_private_file(path)
        except KeyFileError as error:
            raise StoreUnavailable(f"database_password_file: {error}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise StoreUnavailable(f"database_password_file {path} is not UTF-8 text") from None
        return first_line_password(text, path)

    return read


def first_line_password(text: str, path: Path) -> str:
    """The password on the first line of ``text`` (lines end at \\n alone, as for ``head -n1``;
    one \\r before it is dropped). Refused, without quoting it, when empty, when it starts with
    a byte order mark, or when it holds a control character."""
    if text.startswith(UTF8_BYTE_ORDER_MARK):
        raise StoreUnavailable(
            f"database_password_file {path} starts with a UTF-8 byte order mark (an editor added "
            "it): save the file without one"
        )
    # Not str.splitlines: it also ends lines at \x1c-\x1e, \x85 and \u2028, which would cut
    # the password short where head -n1 and other tools would not.
    line = text.split("\n", 1)[0]
    if line.endswith("\r"):
        line = line[:-1]
    if not line:
        raise StoreUnavailable(f"database_password_file {path} is empty")
    if any(_is_control_character(character) for character in line):
        raise StoreUnavailable(
            f"database_password_file {path}: the first line holds a control character (not "
            "shown); it must hold the password alone, printable characters only"
        )
    return line


async def _create_pool(
    url: str, min_size: int, max_size: int, password_file: Path | None
) -> asyncpg.Pool:
    pool: asyncpg.Pool = await asyncpg.create_pool(
        url,
        min_size=min_size,
        max_size=max_size,
        timeout=CONNECT_TIMEOUT_SECONDS,
        command_timeout=COMMAND_TIMEOUT_SECONDS,
        reset=_keep_session_state,
        password=password_from_file(password_file) if password_file is not None else None,
        server_settings={"application_name": APPLICATION_NAME},
    )
    return pool


async def _migrate_with_pool(pool: asyncpg.Pool, while_running: bool) -> list[tuple[int, str]]:
    async with pool.acquire() as connection:
        return await _migrate(connection, MIGRATIONS, while_running)


URL_SHAPE = "postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
URL_ENCODING_ADVICE = (
    "URL-encode special characters in the password (/ as %2F, @ as %40, : as %3A, # as %23, "
    "? as %3F, % as %25), or use a password of letters and digits (openssl rand -hex 32)"
)


def unparsable_url_message(url: str) -> str:
    """Why a PostgreSQL URL could not be parsed, without quoting any of it (it holds a secret)."""
    reason = f"it is not {URL_SHAPE}"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError when the port is not a number
    except ValueError:
        reason = (
            "its port is not a number (an unencoded /, # or ? in the password ends the "
            "user:password part early)"
        )
    else:
        if parts.query or parts.fragment:
            reason = "an unencoded ? or # in the password starts a query or fragment"
    return f"the database URL could not be parsed: {reason}; {URL_ENCODING_ADVICE}"


@dataclass(frozen=True)
class _PoolOptions:
    min_size: int = POOL_MIN_SIZE
    max_size: int = POOL_MAX_SIZE
    password_file: Path | None = None
    migrate: bool = True
    migrate_while_running: bool = False


@asynccontextmanager
async def open_postgres_store(
    url: str,
    min_size: int = POOL_MIN_SIZE,
    max_size: int = POOL_MAX_SIZE,
    *,
    password_file: Path | None = None,
    migrate: bool = True,
    migrate_while_running: bool = False,
) -> AsyncIterator[PostgresStore]:
    """Connect a pool to ``url``, migrate the schema (unless ``migrate`` is false), and yield
    the store; close it on exit.

    Opens a trio-asyncio loop for asyncpg unless the calling task already has one. With
    ``password_file`` every new connection reads its password from that file.
    """
    if not MIN_POOL_SIZE <= max_size <= MAX_POOL_SIZE:
        raise StoreUnavailable(
            f"database_pool_size must be {MIN_POOL_SIZE}..{MAX_POOL_SIZE} (one connection "
            "listens for other instances' notices)"
        )
    options = _PoolOptions(
        min(min_size, max_size), max_size, password_file, migrate, migrate_while_running
    )
    current = trio_asyncio.current_loop.get()
    if current is not None:
        async with _open_on_loop(current, url, options) as store:
            yield store
        return
    try:
        async with trio_asyncio.open_loop() as loop:
            loop.set_exception_handler(_log_driver_error)
            async with _open_on_loop(loop, url, options) as store:
                yield store
    except BaseExceptionGroup as group:
        # open_loop runs a nursery, which wraps whatever crosses it (our errors, the caller's
        # errors from the ``async with`` body) in a group; hand back the one exception as is.
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is group:
            raise
        raise inner from inner.__cause__


def _log_driver_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Log an error asyncio reports outside any awaited call, and carry on.

    asyncpg leaves such reports when a connection dies at an awkward moment: a backend ended
    during connection set-up leaves a "Future exception was never retrieved" behind. The
    statement that needed the connection has already failed (or retried) on its own; the
    trio-asyncio default handler would re-raise the report into the loop's nursery and end the
    store, and with it the serving instance. The context's message is left out when it carries
    an exception: it may quote a callback's arguments (connection parameters, a password).
    """
    exception = context.get("exception")
    if isinstance(exception, BaseException):
        report = f"{exception.__class__.__name__}: {exception}"
    else:
        report = str(context.get("message") or "an unnamed error")
    log.warning(
        "the PostgreSQL driver reported an error outside any statement (carrying on): %s",
        report[:MAX_REPORTED_ERROR_CHARS],
    )


@asynccontextmanager
async def _open_on_loop(
    loop: trio_asyncio.TrioEventLoop, url: str, options: _PoolOptions
) -> AsyncIterator[PostgresStore]:
    bridge = _Bridge(loop)
    try:
        pool = await bridge.call(
            _create_pool, url, options.min_size, options.max_size, options.password_file
        )
    except ValueError:
        # asyncpg's own message may quote a piece of the password: give ours alone.
        raise StoreUnavailable(unparsable_url_message(url)) from None
    except StoreError as exc:
        # The URL may carry a password: name only the failure, never the URL.
        raise StoreUnavailable(f"cannot connect to PostgreSQL: {exc}") from None
    store = PostgresStore(pool, bridge)
    try:
        if options.migrate:
            applied = await bridge.call(_migrate_with_pool, pool, options.migrate_while_running)
            store.applied_migrations = tuple(applied)
        yield store
    finally:
        await store.aclose()
