"""/healthz fails when the store refuses writes; /metrics can move off the public port."""

from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path

import httpx
import pytest
import trio

from rendezvous.store import open_store
from tests.pg_cluster import PostgresCluster, free_loopback_port
from tests.rendezvous.live_server import live_service
from tests.rendezvous.service_harness import ServiceHarness

pytestmark = pytest.mark.anyio

_numbers = itertools.count(1)


@pytest.mark.postgres
async def test_healthz_reports_a_store_that_refuses_writes_and_logs_why(
    postgres_cluster: PostgresCluster, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"health_{os.getpid()}_{next(_numbers)}"
    url = postgres_cluster.create_database(name)
    async with open_store(url) as store, open_store(url) as admin_store:
        service = ServiceHarness(store, tmp_path / "data")
        try:
            assert (await service.http.get("/healthz")).status_code == 200
            # Reads still work, writes are refused (as on a full disk or a read-only replica).
            await admin_store._execute(  # noqa: SLF001 - raw SQL
                f"ALTER DATABASE {name} SET default_transaction_read_only = on"
            )
            await admin_store._fetch(  # noqa: SLF001 - raw SQL
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            await trio.sleep(0.1)  # the store's connections notice they were closed
            service.clock.now += 60  # past the interval between write probes
            caplog.set_level(logging.ERROR, logger="tucdesk.rendezvous")
            response = await service.http.get("/healthz")
            assert response.status_code == 503, response.text
            assert (
                "store error on GET /healthz: PostgreSQL: ReadOnlySQLTransactionError: "
                "cannot execute INSERT in a read-only transaction"
            ) in caplog.text
        finally:
            await service.aclose()


async def test_metrics_listen_serves_metrics_there_and_not_on_the_api_port(
    tmp_path: Path,
) -> None:
    metrics_address = f"127.0.0.1:{free_loopback_port()}"
    database = f"sqlite:///{tmp_path / 'rendezvous.db'}"
    async with (
        live_service(tmp_path / "data", database, metrics_listen=metrics_address) as (url, _),
        httpx.AsyncClient() as client,
    ):
        assert (await client.get(url + "/healthz")).status_code == 200
        assert (await client.get(url + "/metrics")).status_code == 404
        private = await client.get(f"http://{metrics_address}/metrics")
        assert private.status_code == 200
        assert 'tucdesk_http_requests_total{method="GET",route="/healthz",status="200"}' in (
            private.text
        )
        assert (await client.get(f"http://{metrics_address}/healthz")).status_code == 404


async def test_metrics_stay_on_the_api_port_by_default(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'rendezvous.db'}"
    async with (
        live_service(tmp_path / "data", database) as (url, _),
        httpx.AsyncClient() as client,
    ):
        response = await client.get(url + "/metrics")
        assert response.status_code == 200 and "tucdesk_" in response.text
