"""The rendezvous store: one interface (``Store``), two backends (SQLite, PostgreSQL).

Use it as an async context manager from trio code::

    async with open_store("sqlite:///var/lib/tucdesk/rendezvous.db") as store:
        team = await store.create_team("ops", now=time.time())

``open_store`` applies pending migrations before it yields (``migrate=False``: it does not, and
``require_current_schema`` then refuses a schema other than the one this program knows).

The PostgreSQL backend talks to asyncpg through trio-asyncio: the context manager opens the
asyncio loop it needs itself, and the store may then be called from any trio task of the same
run (e.g. Hypercorn's request tasks), as long as the ``async with`` block is still open. No
special set-up is needed from the caller.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from rendezvous.store.base import (
    Agent,
    AgentConnection,
    AgentListing,
    AgentQuery,
    AlreadyExists,
    AmbiguousName,
    ApiKey,
    ApprovalRequest,
    ApprovalState,
    ChallengeUnusable,
    ConnectionReport,
    CredentialUnusable,
    InvalidArgument,
    Invite,
    InviteUnusable,
    LoginChallenge,
    MigrationRefused,
    NotFound,
    Operator,
    RegistrationKey,
    RegistrationKeyUnusable,
    SchemaOutOfDate,
    SchemaTooNew,
    Session,
    SessionState,
    Store,
    StoredPolicyBundle,
    StoreError,
    StoreUnavailable,
    Team,
    TokenHolder,
    UnusableReason,
)

__all__ = [
    "Agent",
    "AgentConnection",
    "AgentListing",
    "AgentQuery",
    "AlreadyExists",
    "AmbiguousName",
    "ApiKey",
    "ApprovalRequest",
    "ApprovalState",
    "ChallengeUnusable",
    "ConnectionReport",
    "CredentialUnusable",
    "InvalidArgument",
    "Invite",
    "InviteUnusable",
    "MigrationRefused",
    "SchemaOutOfDate",
    "SchemaTooNew",
    "LoginChallenge",
    "NotFound",
    "Operator",
    "RegistrationKey",
    "RegistrationKeyUnusable",
    "Session",
    "SessionState",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "StoredPolicyBundle",
    "Team",
    "TokenHolder",
    "UnusableReason",
    "backend_for",
    "describe_applied",
    "describe_database",
    "open_store",
    "require_current_schema",
]

logger = logging.getLogger("tucdesk.rendezvous.store")

SQLITE_SCHEME = "sqlite://"
POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def backend_for(database: str | Path) -> tuple[str, str]:
    """Which backend a URL or path names: ``("sqlite", file path)`` or ``("postgres", url)``."""
    text = str(database)
    if not text.strip():
        raise StoreUnavailable("no database given: use sqlite:///PATH, a file path, or postgresql://…")
    if text.startswith(POSTGRES_SCHEMES):
        return "postgres", text
    if text.startswith(SQLITE_SCHEME):
        # sqlite:///abs/path -> /abs/path ; sqlite://rel/path -> rel/path
        path = text[len(SQLITE_SCHEME) :]
        if path.startswith("//"):
            path = path[1:]
        if not path:
            raise StoreUnavailable("sqlite URL names no file: use sqlite:///path/to/file.db")
        return "sqlite", path
    if "://" in text:
        raise StoreUnavailable(
            "unsupported database URL scheme: use sqlite:///PATH, a file path, or postgresql://…"
        )
    return "sqlite", text


def describe_database(database: str | Path) -> str:
    """The store for a log line: the SQLite file, or PostgreSQL host, port and database name
    (never the user or password)."""
    kind, location = backend_for(database)
    if kind == "sqlite":
        return f"SQLite {location}"
    try:
        parts = urllib.parse.urlsplit(location)
        host, port = parts.hostname or "localhost", parts.port or 5432
    except ValueError:
        return "PostgreSQL (the URL could not be parsed)"
    # A password holding '/', '?', '#' or '@' makes urlsplit cut the netloc short, and the rest of
    # the password lands in the "host", "port" or "path": show nothing unless the split is sure.
    at_signs = location.count("@")
    if at_signs > 1 or (at_signs == 1 and "@" not in parts.netloc):
        return "PostgreSQL (URL not shown)"
    return f"PostgreSQL {host}:{port}/{parts.path.lstrip('/') or '(default database)'}"


DEFAULT_POOL_SIZE = 10


@asynccontextmanager
async def open_store(
    database: str | Path,
    *,
    pool_size: int = DEFAULT_POOL_SIZE,
    password_file: Path | None = None,
    migrate: bool = True,
    migrate_while_running: bool = False,
) -> AsyncIterator[Store]:
    """Open (creating and migrating if needed) the store named by a URL or path; close on exit.

    PostgreSQL only: ``pool_size`` connections at most, each reading its password from
    ``password_file`` when given; pending migrations are refused while other clients are
    connected unless ``migrate_while_running``. ``migrate=False`` opens without migrating
    (``db status``).
    """
    kind, location = backend_for(database)
    if kind == "postgres":
        from rendezvous.store.postgres import open_postgres_store

        async with open_postgres_store(
            location,
            max_size=pool_size,
            password_file=password_file,
            migrate=migrate,
            migrate_while_running=migrate_while_running,
        ) as pg_store:
            if migrate:
                _log_schema(pg_store, location)
            yield pg_store
    else:
        from rendezvous.store.sqlite import open_sqlite_store

        async with open_sqlite_store(location, migrate=migrate) as sqlite_store:
            if migrate:
                _log_schema(sqlite_store, location)
            yield sqlite_store


async def require_current_schema(store: Store) -> None:
    """Raise unless the database schema is exactly the one this program knows: SchemaOutOfDate
    when migrations are pending (``init`` applies them), SchemaTooNew when it is newer.

    For stores opened with ``migrate=False`` by admin commands, which must neither migrate a
    database an older instance still serves nor work on one with rules they do not know.
    """
    version = await store.schema_version()
    needed = store.understood_schema_version
    if version > needed:
        raise SchemaTooNew(
            f"the database schema is {version}, newer than this program understands ({needed}): "
            "use the tucdesk-rendezvous of the newer version"
        )
    if await store.pending_migrations():
        raise SchemaOutOfDate(
            f"the database schema is {version}, this program needs {needed}: run "
            "`tucdesk-rendezvous init` first (stop every instance before: "
            "docs/self-hosting.md, 'Upgrading')"
        )


def _log_schema(store: Store, location: str) -> None:
    """Say (at INFO: serve's start lines) which migrations were applied and the schema now."""
    logger.info("store %s: %s", describe_database(location), describe_applied(store))


def describe_applied(store: Store) -> str:
    """``applied migrations 7..11: names; schema now 11`` or ``schema 11, up to date``."""
    applied = store.applied_migrations
    if not applied:
        return f"schema {store.understood_schema_version}, up to date"
    first, last = applied[0][0], applied[-1][0]
    numbers = str(first) if first == last else f"{first}..{last}"
    names = ", ".join(name for _, name in applied)
    return f"applied migrations {numbers}: {names}; schema now {last}"
