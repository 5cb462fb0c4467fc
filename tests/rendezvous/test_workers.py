"""``serve --workers N``: several instances (processes) on one listening socket act as one service.

The service runs as a real ``tucdesk-rendezvous serve --workers 2`` process tree. Which worker
accepts a connection is the kernel's choice (``SO_REUSEPORT`` hashing), so the tests connect
agents until both workers hold some, and read who holds what from the shared database.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from protocol.request_proof import PROOF_HEADER
from rendezvous.store import open_store
from rendezvous.workers import refuse_if_in_use
from tests.pg_cluster import PostgresCluster
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness, harness
from tests.rendezvous.sessions_support import (
    RELAY,
    AgentChannel,
    EnrolledAgent,
    agent_channel,
    enroll_agent,
)

pytestmark = pytest.mark.anyio

SERVE = [sys.executable, "-m", "rendezvous.main", "serve"]
START_SECONDS = 60
STOP_SECONDS = 30
MAX_AGENTS = 24  # connected one by one until both workers hold a channel
_numbers = itertools.count(1)


class WorkerService:
    """A running ``serve --workers N`` process: its URL, log and worker pids."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path, url: str) -> None:
        self.process = process
        self.log = log
        self.url = url

    def worker_pids(self) -> list[int]:
        """The pids the supervisor logged when it started its workers."""
        return [int(pid) for pid in re.findall(r"worker \d+ started \(pid (\d+)\)", self.text())]

    def text(self) -> str:
        """Everything the service has logged so far."""
        return self.log.read_text(errors="replace")


def serve_command(data_dir: Path, database_url: str, listen: str, workers: int) -> list[str]:
    """``tucdesk-rendezvous serve --workers`` on plain loopback HTTP with the test relay."""
    return [*SERVE, "--data-dir", str(data_dir), "--database", database_url, "--listen", listen,
            "--insecure-http", "--relay", RELAY, "--workers", str(workers)]  # fmt: skip


@contextmanager
def serve_workers(
    data_dir: Path, database_url: str, workers: int = 2
) -> Iterator[WorkerService]:
    """Start ``serve --workers`` on an ephemeral port; wait until every worker serves."""
    log = data_dir.parent / f"serve-{next(_numbers)}.log"
    command = serve_command(data_dir, database_url, "127.0.0.1:0", workers)
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_SECONDS
        while True:
            urls = re.findall(r"Running on (http://127\.0\.0\.1:\d+)", log.read_text())
            if len(urls) >= workers:
                break
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"workers did not start:\n{log.read_text()}"
            time.sleep(0.05)
        assert len(set(urls)) == 1, urls  # one address, shared
        yield WorkerService(process, log, urls[0])
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def shared_database(postgres_cluster: PostgresCluster) -> str:
    """A fresh PostgreSQL database for the workers (and the test's own instance) to share."""
    return postgres_cluster.create_database(f"workers_{os.getpid()}_{next(_numbers)}")


async def _call(
    url: str, service: ServiceHarness, operator: OperatorSession, method: str, path: str,
    body: Any = None,
) -> httpx.Response:
    """An authenticated request (with its request proof) over real HTTP."""
    service.clock.now = time.time()
    content = b"" if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {operator.token}", "Content-Type": "application/json"}
    headers[PROOF_HEADER] = service.proof(operator.identity, method, path, content, operator.token)
    async with httpx.AsyncClient(base_url=url) as http:
        return await http.request(method, path, content=content, headers=headers)


async def _holder(service: ServiceHarness, agent: EnrolledAgent) -> str:
    connections = await service.store.list_agent_connections(agent.team_id, agent.agent_id)
    assert len(connections) == 1, connections
    return connections[0].instance_id


async def _channels_on_two_workers(
    stack: AsyncExitStack, url: str, service: ServiceHarness, admin: OperatorSession
) -> dict[str, tuple[EnrolledAgent, AgentChannel]]:
    """Connect agents one at a time until two workers hold one each; by holder instance id."""
    holders: dict[str, tuple[EnrolledAgent, AgentChannel]] = {}
    for number in range(MAX_AGENTS):
        agent = await enroll_agent(service, admin, hostname=f"web-{number}")
        channel = await stack.enter_async_context(agent_channel(url, agent))
        holders.setdefault(await _holder(service, agent), (agent, channel))
        if len(holders) == 2:
            return holders
    pytest.fail(f"{MAX_AGENTS} agent channels all landed on one worker")


@pytest.mark.postgres
async def test_offers_cross_workers_and_metrics_sum_over_them(
    shared_database: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with (
        open_store(shared_database) as store,
        harness(store, data) as service,  # creates the service keys the workers load
    ):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        with serve_workers(data, shared_database) as served:
            async with AsyncExitStack() as stack:
                holders = await _channels_on_two_workers(stack, served.url, service, admin)
                connected = len(await service.store.list_agents(team))
                # Whichever worker takes each request, one of the two agents is held by the
                # other worker: at least one offer crosses between worker processes.
                for agent, channel in holders.values():
                    body = {"target": agent.name, "mode": "exec", "command": ["hostname"]}
                    response = await _call(served.url, service, admin, "POST", "/v1/sessions",
                                           body)  # fmt: skip
                    assert response.status_code == 201, response.text
                    offer = await channel.receive("session_offer")
                    assert offer["session_id"] == response.json()["session_id"]

                # Each worker counts only its own channels; /metrics reports the whole service.
                async with httpx.AsyncClient(base_url=served.url) as http:
                    for _ in range(4):  # whichever worker answers, the sums are the same
                        metrics = (await http.get("/metrics")).text
                        assert f"tucdesk_connected_agents {float(connected)}" in metrics
                        sessions = re.search(
                            r'tucdesk_http_requests_total\{method="POST",route="/sessions",'
                            r'status="201"\} (\S+)', metrics
                        )  # fmt: skip
                        assert sessions is not None and float(sessions.group(1)) == 2.0


@pytest.mark.postgres
async def test_a_dying_worker_stops_the_whole_service(
    shared_database: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with open_store(shared_database) as store, harness(store, data):
        with serve_workers(data, shared_database) as served:
            pids = served.worker_pids()
            assert len(pids) == 2
            os.kill(pids[0], signal.SIGKILL)
            assert served.process.wait(STOP_SECONDS) != 0
            assert "stopping the service" in served.text()
            # The supervisor has exited, so it already stopped (and reaped) the other worker.
            assert not _alive(pids[1])


@pytest.mark.postgres
async def test_sigterm_stops_every_worker_and_removes_the_metrics_directory(
    shared_database: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with open_store(shared_database) as store, harness(store, data):
        with serve_workers(data, shared_database) as served:
            pids = served.worker_pids()
            directories = _metrics_directories(served.process.pid)
            assert len(directories) == 1 and directories[0].stat().st_mode & 0o777 == 0o700
            served.process.send_signal(signal.SIGTERM)
            assert served.process.wait(STOP_SECONDS) == 0
            assert not any(_alive(pid) for pid in pids)
            assert not directories[0].exists()


def test_several_workers_on_sqlite_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    completed = subprocess.run(
        [*SERVE, "--data-dir", str(data), "--listen", "127.0.0.1:0", "--insecure-http",
         "--workers", "2"],
        capture_output=True, timeout=START_SECONDS,
    )  # fmt: skip
    assert completed.returncode == 1
    assert b"needs PostgreSQL" in completed.stderr
    assert b"Running on" not in completed.stdout + completed.stderr


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def _metrics_directories(supervisor_pid: int) -> list[Path]:
    """The PROMETHEUS_MULTIPROC_DIR the supervisor handed its workers (from their environment)."""
    found = set()
    children = Path(f"/proc/{supervisor_pid}/task/{supervisor_pid}/children").read_text().split()
    for child in children:
        environment = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        for entry in environment:
            if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                found.add(Path(entry.split(b"=", 1)[1].decode()))
    return sorted(found)


@pytest.mark.postgres
async def test_sigterm_to_the_whole_process_group_still_stops_every_worker_gracefully(
    shared_database: str, tmp_path: Path
) -> None:
    # systemd's default KillMode signals every process of the service at once (and Ctrl-C
    # signals the terminal's whole process group): the workers ignore it and stop when the
    # supervisor tells them to, instead of dying by a second SIGTERM mid-shutdown.
    data = tmp_path / "data"
    async with open_store(shared_database) as store, harness(store, data):
        with serve_workers(data, shared_database) as served:
            pids = served.worker_pids()
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
            await anyio.sleep(0.5)
            assert all(_alive(pid) for pid in pids), served.text()
            served.process.send_signal(signal.SIGTERM)
            assert served.process.wait(STOP_SECONDS) == 0
            text = served.text()
            assert text.count("stopped (exit code 0)") == len(pids), text
            assert not any(_alive(pid) for pid in pids)


@pytest.mark.postgres
async def test_workers_refuse_a_port_another_service_listens_on_even_with_so_reuseport(
    shared_database: str, tmp_path: Path
) -> None:
    # Without the check, SO_REUSEPORT would let the new service join this socket's port and
    # split connections with it.
    data = tmp_path / "data"
    async with open_store(shared_database) as store, harness(store, data):
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            other.bind(("127.0.0.1", 0))
            other.listen()
            port = other.getsockname()[1]
            command = serve_command(data, shared_database, f"127.0.0.1:{port}", 2)
            with anyio.fail_after(START_SECONDS):
                result = await anyio.run_process(command, check=False)
            assert result.returncode != 0
            assert b"another rendezvous still running" in result.stderr, result.stderr
        refuse_if_in_use("127.0.0.1", port)  # free again: no complaint


@pytest.mark.postgres
async def test_sighup_to_the_supervisor_reaches_every_worker_and_stops_nothing(
    shared_database: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    async with open_store(shared_database) as store, harness(store, data):
        with serve_workers(data, shared_database) as served:
            pids = served.worker_pids()
            served.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + STOP_SECONDS
            while served.text().count("received SIGHUP") < len(pids):
                assert time.monotonic() < deadline, served.text()
                await anyio.sleep(0.05)
            assert served.process.poll() is None
            assert all(_alive(pid) for pid in pids)
            async with httpx.AsyncClient(base_url=served.url) as http:
                assert (await http.get("/healthz")).status_code == 200


@pytest.mark.postgres
async def test_a_sighup_to_a_starting_worker_does_not_end_the_service(
    shared_database: str, tmp_path: Path
) -> None:
    """A worker ignores SIGHUP from its first instruction (inherited from the supervisor)
    until its instance listens for it."""
    data = tmp_path / "data"
    async with open_store(shared_database) as store, harness(store, data):
        log = tmp_path / "serve.log"
        command = serve_command(data, shared_database, "127.0.0.1:0", 2)
        with log.open("wb") as output:
            process = subprocess.Popen(  # noqa: ASYNC220 - started here, not waited on
                command, stdout=output, stderr=subprocess.STDOUT
            )
        try:
            deadline = time.monotonic() + START_SECONDS
            hung_up: set[int] = set()
            while log.read_text().count("Running on http://") < 2:
                text = log.read_text()
                assert process.poll() is None, text
                assert time.monotonic() < deadline, text
                for pid in re.findall(r"worker \d+ started \(pid (\d+)\)", text):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGHUP)
                    hung_up.add(int(pid))
                await anyio.sleep(0.005)
            assert len(hung_up) == 2
            assert process.poll() is None
            assert all(_alive(pid) for pid in hung_up)
            assert "stopped (exit code" not in log.read_text()
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(STOP_SECONDS)
