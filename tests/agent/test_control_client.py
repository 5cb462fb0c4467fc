"""The agent's control channel against a real rendezvous: connect, presence, restarts, audit."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.control_client import MAX_AUDIT_BACKLOG, ControlClient, ReconnectBackoff
from agent.enrollment import EnrollmentRequest, enroll
from agent.errors import ConfigError, EnrollmentError
from agent.machine_identity import MachineIdentifiers
from agent.state_file import AgentState
from agent.status import read_status
from audit.actions import Action, ActorKind
from audit.record import Actor, AuditEvent, SignedEvent, sign_event
from rendezvous.config import ServiceConfig
from rendezvous.credentials import hash_secret, new_registration_key
from rendezvous.server import run_service
from rendezvous.service_keys import create_missing_keys
from rendezvous.store import open_store
from tests.agent.policy_support import ensure_team_admin
from tests.rendezvous.conftest import database_url, postgres_cluster  # noqa: F401 - fixtures
from tests.rendezvous.live_server import live_service, make_certificate

pytestmark = pytest.mark.anyio

WAIT_SECONDS = 20
AGENT_COMMAND = str(Path(sys.executable).parent / "tucdesk-agent")
MACHINE = MachineIdentifiers(machine_id="0123456789abcdef0123456789abcdef")


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@asynccontextmanager
async def rendezvous_on(data_dir: Path, store_url: str, port: int) -> AsyncIterator[str]:
    """A rendezvous on a fixed loopback port, so a test can stop it and start it again."""
    create_missing_keys(data_dir)
    config = ServiceConfig(
        data_dir=data_dir, database=store_url, listen=f"127.0.0.1:{port}",
        insecure_http=True, heartbeat_seconds=1.0, heartbeat_timeout_seconds=5.0,
    )
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT_SECONDS):
            binds = await nursery.start(run_service, config)
        yield binds[0]
        nursery.cancel_scope.cancel()


async def enrolled_agent(url: str, store_url: str, state_dir: Path) -> AgentState:
    key = new_registration_key()
    async with open_store(store_url) as store:
        team = await store.get_team_by_name("ops") or await store.create_team("ops", time.time())
        await store.create_registration_key(
            team.id, hash_secret(key), [], time.time() + 600, "test", time.time()
        )
        await ensure_team_admin(store, team.id)
    return await enroll(EnrollmentRequest(url, key, state_dir / "agent.state"), MACHINE)


async def agent_online(store_url: str, state: AgentState) -> bool:
    async with open_store(store_url) as store:
        agent = await store.get_agent(state.team_id, state.agent_id)
    return agent is not None and agent.online


def fast_backoff() -> ReconnectBackoff:
    return ReconnectBackoff(initial=0.05, cap=0.3)


def session_event(state: AgentState, session_id: str) -> SignedEvent:
    identity = state.identity()
    event = AuditEvent(
        occurred_at=datetime.now(UTC),
        team_id=state.team_id,
        actor=Actor(ActorKind.AGENT, state.agent_id, state.name),
        action=Action.SESSION_STARTED,
        signer=identity.public.key_id,
        session_id=session_id,
    )
    return sign_event(identity, event)


async def test_agent_authenticates_shows_online_and_reports_connected(
    tmp_path: Path, database_url: str  # noqa: F811 - the fixture: SQLite and PostgreSQL
) -> None:
    store_url = database_url
    offers: list[dict[str, Any]] = []
    async with rendezvous_on(tmp_path / "data", store_url, free_port()) as url:
        state = await enrolled_agent(url, store_url, tmp_path / "state")
        status_file = tmp_path / "state" / "status.json"
        client = ControlClient(
            state, MACHINE.fingerprint(), offers.append, status_file=status_file,
            backoff=fast_backoff(),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            with trio.fail_after(WAIT_SECONDS):
                await client.wait_connected()
            assert client.issuer == "tucdesk-rendezvous"
            assert await agent_online(store_url, state)
            status = read_status(status_file)
            assert status is not None and status.connected and status.is_running()
            # Heartbeats keep the channel up past the server's heartbeat timeout window.
            await trio.sleep(1.5)
            assert client.is_connected and client.connections == 1
            nursery.cancel_scope.cancel()
    assert offers == []


async def test_agent_comes_back_by_itself_after_the_rendezvous_restarts(
    tmp_path: Path, database_url: str  # noqa: F811 - the fixture: SQLite and PostgreSQL
) -> None:
    store_url = database_url
    port = free_port()
    async with rendezvous_on(tmp_path / "data", store_url, port) as url:
        state = await enrolled_agent(url, store_url, tmp_path / "state")
    status_file = tmp_path / "state" / "status.json"
    client = ControlClient(
        state, MACHINE.fingerprint(), lambda offer: None, status_file=status_file,
        backoff=fast_backoff(),
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        async with rendezvous_on(tmp_path / "data", store_url, port):
            with trio.fail_after(WAIT_SECONDS):
                await client.wait_connected()
        with trio.fail_after(WAIT_SECONDS):
            await client.wait_disconnected()
        stopped = read_status(status_file)
        assert stopped is not None and not stopped.connected and stopped.last_error
        async with rendezvous_on(tmp_path / "data", store_url, port):
            with trio.fail_after(WAIT_SECONDS):
                await client.wait_connected()
            assert client.connections == 2
            assert await agent_online(store_url, state)
        nursery.cancel_scope.cancel()


async def test_agent_enrolls_and_connects_over_tls_trusting_the_given_ca_file(
    tmp_path: Path,
) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    cert, key = make_certificate(tmp_path / "tls")
    async with live_service(
        tmp_path / "data", store_url, tls_cert=cert, tls_key=key
    ) as (url, _):
        assert url.startswith("https://")
        registration = new_registration_key()
        async with open_store(store_url) as store:
            team = await store.create_team("ops", time.time())
            await store.create_registration_key(
                team.id, hash_secret(registration), [], time.time() + 600, "test", time.time()
            )
            await ensure_team_admin(store, team.id)
        request = EnrollmentRequest(url, registration, tmp_path / "state" / "agent.state")
        with pytest.raises(EnrollmentError, match="cannot reach the rendezvous"):
            await enroll(request, MACHINE)  # the system CAs do not know this certificate
        state = await enroll(
            EnrollmentRequest(url, registration, request.state_file, ca_file=cert), MACHINE
        )
        # Its own copy, beside the state (tests/agent/test_daemon_ops_ca.py).
        assert state.ca_file == str((tmp_path / "state" / "rendezvous-ca.pem").resolve())
        client = ControlClient(state, MACHINE.fingerprint(), lambda o: None, backoff=fast_backoff())
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            with trio.fail_after(WAIT_SECONDS):
                await client.wait_connected()
            nursery.cancel_scope.cancel()


def daemon_options(tmp_path: Path, state_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Options for a ``tucdesk-agent`` process on ``state_dir`` whose machine is MACHINE (a
    machine root under ``tmp_path``), and its environment (no TUCDESK_AGENT_ settings)."""
    machine_root = tmp_path / "machine"
    (machine_root / "etc").mkdir(parents=True, exist_ok=True)
    (machine_root / "etc" / "machine-id").write_text(MACHINE.machine_id + "\n")
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TUCDESK_AGENT_")}
    return ["--state-dir", str(state_dir), "--machine-root", str(machine_root)], environment


async def test_daemon_process_reports_connected_and_stops_cleanly_on_sigterm(
    tmp_path: Path,
) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    state_dir = tmp_path / "state"
    common, environment = daemon_options(tmp_path, state_dir)
    async with rendezvous_on(tmp_path / "data", store_url, free_port()) as url:
        state = await enrolled_agent(url, store_url, state_dir)
        process = await trio.lowlevel.open_process(
            [AGENT_COMMAND, "run", *common], env=environment, stderr=subprocess.DEVNULL
        )
        try:
            with trio.fail_after(WAIT_SECONDS):
                while "Connected:    yes" not in await agent_status(common, environment):  # noqa: ASYNC110 - another process
                    await trio.sleep(0.1)
            assert await agent_online(store_url, state)
            process.send_signal(signal.SIGTERM)
            with trio.fail_after(WAIT_SECONDS):
                assert await process.wait() == 0
        finally:
            process.kill()
            await process.wait()
        status = await agent_status(common, environment)
    assert "Daemon:       not running" in status and "Connected:    no" in status


async def agent_status(common: list[str], environment: dict[str, str]) -> str:
    result = await trio.run_process(
        [AGENT_COMMAND, "status", *common], capture_stdout=True, check=False, env=environment
    )
    return str(result.stdout.decode())


async def test_audit_events_queued_while_offline_are_sent_and_answered(
    tmp_path: Path,
) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    async with rendezvous_on(tmp_path / "data", store_url, free_port()) as url:
        state = await enrolled_agent(url, store_url, tmp_path / "state")
        client = ControlClient(state, MACHINE.fingerprint(), lambda o: None, backoff=fast_backoff())
        # Queued before any connection; the server refuses them (no such session was offered),
        # which proves each was delivered, verified and answered.
        for number in range(3):
            client.send_audit_event(session_event(state, f"ses_unknown{number}"))
        assert client.pending_audit_events == 3
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            with trio.fail_after(WAIT_SECONDS):
                while client.pending_audit_events:  # noqa: ASYNC110 - answered by the server
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    assert client.refused_audit_events == 3
    assert client.dropped_audit_events == 0


def test_audit_backlog_is_bounded_and_drops_the_oldest_first() -> None:
    state = AgentState(
        agent_id="agt_1", team_id="tm_1", server_url="http://127.0.0.1:1",
        identity_seed=bytes(32), service_keys={},
    )
    client = ControlClient(state, MACHINE.fingerprint(), lambda o: None)
    for number in range(MAX_AUDIT_BACKLOG + 5):
        client.send_audit_event(session_event(state, f"ses_{number}"))
    assert client.pending_audit_events == MAX_AUDIT_BACKLOG
    assert client.dropped_audit_events == 5
    assert client.send_message({"type": "heartbeat"}) is False  # nothing is queued offline


@settings(max_examples=200, deadline=None)
@given(
    initial=st.floats(0.01, 5),
    cap=st.floats(5, 60),
    attempts=st.integers(0, 80),
    seed=st.integers(0, 2**32),
)
def test_backoff_waits_are_full_jitter_within_the_capped_exponential(
    initial: float, cap: float, attempts: int, seed: int
) -> None:
    backoff = ReconnectBackoff(initial, cap, random.Random(seed))
    for attempt in range(attempts):
        ceiling = min(cap, initial * 2**attempt)
        assert backoff.ceiling() == pytest.approx(ceiling)
        assert 0 <= backoff.next_delay() <= ceiling
    backoff.reset()
    assert backoff.ceiling() == pytest.approx(initial)


def test_a_missing_ca_file_stops_the_client_before_it_connects(tmp_path: Path) -> None:
    state = AgentState(
        agent_id="agt_1", team_id="tm_1", server_url="https://rv.example.com",
        identity_seed=bytes(32), ca_file=str(tmp_path / "gone.pem"),
    )
    with pytest.raises(ConfigError, match="cannot load the CA file"):
        ControlClient(state, MACHINE.fingerprint(), lambda o: None)
