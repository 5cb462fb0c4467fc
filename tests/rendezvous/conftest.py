"""Fixtures for rendezvous tests: every storage-touching test runs on SQLite and on PostgreSQL.

* ``database_url`` — parametrized ``sqlite`` / ``postgres``: a fresh, empty database per test
  (a file under ``tmp_path``, or a new database in the session's throwaway PostgreSQL cluster).
  Open it yourself with ``async with open_store(database_url) as store`` — e.g. to restart.
* ``store`` — that database, opened and migrated, for async tests (``pytestmark =
  pytest.mark.anyio``; ``anyio_backend`` here makes anyio's pytest plugin run them on trio).
* ``postgres_cluster`` — the session's cluster (tests/pg_cluster.py), for tests that need
  several databases or the raw server.

PostgreSQL tests skip with a clear message when initdb/pg_ctl are not installed, and fail
instead when the environment variable ``CI`` is ``true``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from rendezvous.store import Store, open_store
from tests.pg_cluster import PostgresCluster, PostgresUnavailable, find_postgres_bin_dir

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
]
_database_numbers = itertools.count(1)


def _postgres_missing(reason: str) -> None:
    message = f"PostgreSQL tests need a local PostgreSQL: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (CI=true: a missing PostgreSQL is a failure, not a skip)")
    pytest.skip(f"{message} (install postgresql, e.g. scripts/install-system-deps)")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throwaway PostgreSQL cluster for the whole test session, removed at the end."""
    bin_dir = find_postgres_bin_dir()
    if bin_dir is None:
        _postgres_missing("initdb and pg_ctl were not found on PATH or in /usr/lib/postgresql")
    assert bin_dir is not None
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.start()
    except PostgresUnavailable as exc:
        cluster.stop()
        _postgres_missing(f"the cluster did not start: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def anyio_backend() -> str:
    """Run ``pytest.mark.anyio`` tests on trio, the project's concurrency library."""
    return "trio"


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh empty database on each backend: ``sqlite:///…`` or ``postgresql://…``."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'rendezvous.db'}"
    cluster: PostgresCluster = request.getfixturevalue("postgres_cluster")
    return cluster.create_database(f"test_{os.getpid()}_{next(_database_numbers)}")


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[Store]:
    """The test's database, opened and migrated; closed after the test."""
    async with open_store(database_url) as opened:
        yield opened
