"""A store that refuses writes: /healthz says so until writes succeed again, and an agent whose
control channel meets the failure is told why, with no traceback on the service.

Full disks are real: the SQLite database lives on a 1 MiB tmpfs (root only; the tests skip
otherwise), as in the fault audit that found /healthz answering 200 while every write failed.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from protocol.identity import SigningIdentity
from rendezvous.control_channel import CLOSE_TRY_AGAIN_LATER, STORE_UNAVAILABLE_REASON
from rendezvous.store import open_store
from tests.pg_cluster import PostgresCluster, PostgresUnavailable, find_postgres_bin_dir
from tests.rendezvous.live_server import live_service
from tests.rendezvous.service_harness import ServiceHarness
from tests.rendezvous.test_control_channel import _answer, _registered_agent

pytestmark = pytest.mark.anyio

TMPFS_BYTES = 1024 * 1024
WAIT_SECONDS = 15
FILLER_CHUNK = 4096


@contextmanager
def small_tmpfs(directory: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs at ``directory`` (root only: the test skips otherwise)."""
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES},mode=0700", "tmpfs", str(directory)],
        capture_output=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {mounted.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


def fill(directory: Path, leave_bytes: int = 0) -> Path:
    """Write a filler file until about ``leave_bytes`` are left on the file system."""
    filler = directory / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                stats = os.statvfs(directory)
                free = stats.f_bavail * stats.f_frsize
                if free <= leave_bytes:
                    break
                out.write(b"\0" * min(FILLER_CHUNK, free - leave_bytes))
                out.flush()
        except OSError:
            pass  # full
    return filler


async def test_healthz_fails_while_the_disk_is_too_full_for_writes_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with small_tmpfs(tmp_path / "db") as db_dir:
        async with open_store(f"sqlite:///{db_dir / 'rendezvous.db'}") as store:
            service = ServiceHarness(store, tmp_path / "data")
            try:
                assert (await service.http.get("/healthz")).status_code == 200
                # Room for a few small writes in place (the old probe's kind), not for more.
                filler = fill(db_dir, leave_bytes=12 * 1024)
                now = service.clock.now
                await store.remember_nonce("healthz", service.ctx.instance_id, now, now)
                service.clock.now += 60  # past the interval between write probes
                caplog.set_level(logging.ERROR, logger="tucdesk.rendezvous")
                response = await service.http.get("/healthz")
                assert response.status_code == 503, response.text
                assert response.json() == {
                    "error": "unavailable",
                    "message": "the service's database refuses reads or writes: "
                    "the database's disk is full",
                }
                assert "store error on GET /healthz: SQLite: database or disk is full" in (
                    caplog.text
                )
                # Known failing: every call probes again, none answers 200 from a cached write.
                assert (await service.http.get("/healthz")).status_code == 503
                assert service.ctx.store_health.failure is not None

                filler.unlink()
                response = await service.http.get("/healthz")
                assert response.status_code == 200, response.text
                assert service.ctx.store_health.failure is None
            finally:
                await service.aclose()


async def test_a_request_the_store_fails_is_remembered_for_healthz(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "db") as db_dir:
        async with open_store(f"sqlite:///{db_dir / 'rendezvous.db'}") as store:
            service = ServiceHarness(store, tmp_path / "data")
            try:
                admin = await service.operator(await service.team("ops"))
                assert (await service.http.get("/healthz")).status_code == 200
                filler = fill(db_dir)
                refused = await service.call(admin, "POST", "/v1/registration-keys", {"tags": []})
                assert refused.status_code == 503, refused.text
                assert service.ctx.store_health.failure is not None
                filler.unlink()
                assert (await service.http.get("/healthz")).status_code == 200
                assert service.ctx.store_health.failure is None
            finally:
                await service.aclose()


async def test_a_known_store_failure_makes_healthz_probe_at_once(tmp_path: Path) -> None:
    async with open_store(f"sqlite:///{tmp_path / 'rendezvous.db'}") as store:
        service = ServiceHarness(store, tmp_path / "data")
        try:
            assert (await service.http.get("/healthz")).status_code == 200
            probe = service.ctx.store_health.last_good_write
            service.clock.now += 1  # well within the interval between write probes
            service.ctx.store_health.failed("SQLite: database or disk is full", service.clock.now)
            # The store works again: the probe that the failure made due clears it.
            assert (await service.http.get("/healthz")).status_code == 200
            assert service.ctx.store_health.failure is None
            assert service.ctx.store_health.last_good_write == service.clock.now != probe
        finally:
            await service.aclose()


async def _connect_until_closed(
    url: str, agent: SigningIdentity, agent_id: str
) -> ConnectionClosed:
    """Answer the challenge as ``agent`` and return how the rendezvous closed the channel."""
    ws_url = url.replace("http://", "ws://") + "/v1/agents/connect"
    with trio.fail_after(WAIT_SECONDS):
        async with open_websocket_url(ws_url) as ws:
            challenge = json.loads(await ws.get_message())
            await ws.send_message(_answer(agent, agent_id, challenge, "machine-1"))
            try:
                while True:
                    await ws.get_message()
            except ConnectionClosed as closed:
                return closed
    raise AssertionError("unreachable")


def _assert_closed_for_the_store(
    closed: ConnectionClosed, caplog: pytest.LogCaptureFixture
) -> None:
    assert closed.reason.code == CLOSE_TRY_AGAIN_LATER
    assert closed.reason.reason == STORE_UNAVAILABLE_REASON
    assert "store error during an agent's authentication" in caplog.text
    assert "Error in ASGI" not in caplog.text
    # asyncpg's pool logs its own reconnect attempts with a traceback; the service must not.
    tracebacks = [
        record.getMessage()
        for record in caplog.records
        if record.exc_info and not record.name.startswith("asyncpg")
    ]
    assert not tracebacks


async def test_agent_meeting_a_full_disk_at_connect_is_told_the_database_is_unavailable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with small_tmpfs(tmp_path / "db") as db_dir:
        database = f"sqlite:///{db_dir / 'rendezvous.db'}"
        async with live_service(tmp_path / "data", database) as (url, _):
            agent, agent_id, _ = await _registered_agent(url, database)
            fill(db_dir)
            caplog.set_level(logging.INFO)
            closed = await _connect_until_closed(url, agent, agent_id)
            _assert_closed_for_the_store(closed, caplog)
            async with httpx.AsyncClient() as client:
                assert (await client.get(url + "/healthz")).status_code == 503


def _pg_ctl(cluster: PostgresCluster, action: str) -> None:
    """Stop (immediately, as a crash would) or start the cluster's server, keeping its data."""
    options = f"-p {cluster.port} -k {cluster.socket_dir} -c listen_addresses=127.0.0.1"
    argv = [str(cluster.bin_dir / "pg_ctl"), "-D", str(cluster.data_dir), "-w"]
    if action == "stop":
        argv += ["-m", "immediate", "stop"]
    else:
        argv += ["-l", str(cluster.data_dir.parent / "server.log"), "-o", options, "start"]
    cluster._run(argv)  # noqa: SLF001 - the same runner (as the postgres user when root)


@pytest.mark.postgres
async def test_agent_connecting_while_postgresql_is_stopped_is_told_the_database_is_unavailable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bin_dir = find_postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL tests need a local PostgreSQL (initdb, pg_ctl)")
    cluster = PostgresCluster(bin_dir)  # its own: this test stops the server
    try:
        try:
            cluster.start()
        except PostgresUnavailable as exc:
            pytest.skip(f"PostgreSQL did not start: {exc}")
        database = cluster.create_database("store_failures")
        async with live_service(tmp_path / "data", database) as (url, _):
            agent, agent_id, _ = await _registered_agent(url, database)
            await trio.to_thread.run_sync(_pg_ctl, cluster, "stop")
            caplog.set_level(logging.INFO)
            closed = await _connect_until_closed(url, agent, agent_id)
            _assert_closed_for_the_store(closed, caplog)
            async with httpx.AsyncClient() as client:
                response = await client.get(url + "/healthz")
                assert response.status_code == 503
                assert response.json()["message"].endswith("the database is unreachable")
                await trio.to_thread.run_sync(_pg_ctl, cluster, "start")
                # Healthy again once the instance listens for offers again (within seconds).
                with trio.fail_after(WAIT_SECONDS):
                    while (response := await client.get(url + "/healthz")).status_code != 200:
                        assert response.status_code == 503, response.text
                        await trio.sleep(0.1)
    finally:
        cluster.stop()
