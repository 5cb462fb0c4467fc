"""database_pool_size: validated, honoured, and checked against the server's max_connections."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from rendezvous.config import ServiceConfig, load_config
from rendezvous.errors import ConfigError
from rendezvous.main import _prepare_postgres
from rendezvous.store import open_store
from rendezvous.store.postgres import PostgresStore
from tests.pg_cluster import PostgresCluster

CLUSTER_MAX_CONNECTIONS = 200  # tests/pg_cluster.py starts every cluster with this


@pytest.mark.parametrize("size", ["0", "1", "1001", "ten"])
def test_out_of_range_pool_sizes_are_refused(size: str) -> None:
    with pytest.raises(ConfigError, match="database_pool_size"):
        load_config({}, {"TUCDESK_DATABASE_POOL_SIZE": size})


def test_pool_size_defaults_to_ten_and_reaches_the_store() -> None:
    assert ServiceConfig().database_pool_size == 10
    config = load_config({}, {"TUCDESK_DATABASE_POOL_SIZE": "25"})
    assert config.store_options()["pool_size"] == 25


@pytest.mark.anyio
@pytest.mark.postgres
async def test_a_process_opens_no_more_connections_than_its_pool_size(
    postgres_cluster: PostgresCluster,
) -> None:
    url = postgres_cluster.create_database("sizing_pool")
    async with open_store(url, pool_size=3) as store:
        assert isinstance(store, PostgresStore)
        backends: set[int] = set()

        async def busy() -> None:
            row = await store._fetchrow("SELECT pg_backend_pid() AS pid, pg_sleep(0.2)")
            assert row is not None
            backends.add(int(row["pid"]))

        async with trio.open_nursery() as nursery:
            for _ in range(9):
                nursery.start_soon(busy)
    assert 1 <= len(backends) <= 3


@pytest.mark.postgres
def test_serve_warns_when_its_connections_do_not_fit_max_connections(
    postgres_cluster: PostgresCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = postgres_cluster.create_database("sizing_warning")
    too_many = ServiceConfig(
        data_dir=tmp_path, database=url, workers=4, database_pool_size=60
    )  # 240 > 200
    with caplog.at_level(logging.INFO, logger="tucdesk.rendezvous"):
        trio.run(_prepare_postgres, too_many, False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "may open 240 (4 worker(s) x database_pool_size 60)" in warnings[0]
    assert f"max_connections {CLUSTER_MAX_CONNECTIONS} - reserved 3" in warnings[0]
    assert "instances x workers x database_pool_size under max_connections - reserved" in (
        warnings[0]
    )

    caplog.clear()
    fitting = ServiceConfig(data_dir=tmp_path, database=url, workers=2, database_pool_size=10)
    with caplog.at_level(logging.INFO, logger="tucdesk.rendezvous"):
        trio.run(_prepare_postgres, fitting, False)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(
        "this serve opens up to 20 (2 worker(s) x database_pool_size 10)" in r.getMessage()
        for r in caplog.records
    )
