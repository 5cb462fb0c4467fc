"""The agent's reconnect after a silent network drop is not taken for a clone of itself, nor is
a process restarted after one (the connection id kept in the state dir); a VM cloned from a disk
snapshot, which carries that file, still is.

A loopback TCP proxy stands between the real ControlClient and the real rendezvous. Cutting it
closes the agent's side but leaves the rendezvous's side open and silent: the half-open
connection a laptop sleep or a NAT timeout leaves behind, which the rendezvous only notices at
its heartbeat timeout.
"""

from __future__ import annotations

import json
import shutil
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from subprocess import DEVNULL
from typing import Any, NamedTuple

import httpx
import pytest
import trio

from agent.config import AgentConfig
from agent.control_client import ControlClient, ReconnectBackoff
from agent.state_file import AgentState, load_state
from rendezvous.store import open_store
from tests.agent.test_control_client import (
    AGENT_COMMAND,
    MACHINE,
    daemon_options,
    enrolled_agent,
    fast_backoff,
)
from tests.rendezvous.conftest import database_url, postgres_cluster  # noqa: F401 - fixtures
from tests.rendezvous.live_server import live_service

pytestmark = pytest.mark.anyio

WAIT_SECONDS = 20
PUMP_BYTES = 65536


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


class HalfOpeningProxy:
    """Forwards loopback TCP to ``upstream_port``; ``cut`` drops the client sides only."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.held: list[trio.SocketStream] = []  # rendezvous sides of cut connections, left open
        self._live: list[tuple[trio.CancelScope, trio.SocketStream]] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._forward, listeners, task_status=task_status)

    def cut(self) -> None:
        """Close every client side now; keep each upstream side open and say nothing on it."""
        for scope, upstream in self._live:
            self.held.append(upstream)
            scope.cancel()
        self._live.clear()

    async def _forward(self, client: trio.SocketStream) -> None:
        upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        pair = (trio.CancelScope(), upstream)
        self._live.append(pair)
        with pair[0]:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_pump, client, upstream, nursery.cancel_scope)
                nursery.start_soon(_pump, upstream, client, nursery.cancel_scope)
        if pair in self._live:
            self._live.remove(pair)
        if upstream not in self.held:
            await upstream.aclose()
        # serve_listeners closes the client side when this returns.


async def _pump(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
    try:
        while data := await source.receive_some(PUMP_BYTES):
            await sink.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    done.cancel()


class ProxiedAgent(NamedTuple):
    """What ``agent_behind_a_proxy`` runs: the rendezvous's own URL, the proxy the agent goes
    through, a nursery for the test's tasks, and the agent's state."""

    direct_url: str
    proxy: HalfOpeningProxy
    nursery: trio.Nursery
    state: AgentState


@asynccontextmanager
async def agent_behind_a_proxy(
    tmp_path: Path, store_url: str, state_dir: Path
) -> AsyncIterator[ProxiedAgent]:
    """A rendezvous whose heartbeat timeout (60 s) outlasts the test, so it keeps holding a
    channel the proxy half-opens, and an agent enrolled through the proxy into ``state_dir``.
    The nursery is cancelled on the way out."""
    async with (
        live_service(
            tmp_path / "data", store_url, heartbeat_seconds=1.0, heartbeat_timeout_seconds=60.0
        ) as (direct_url, _),
        trio.open_nursery() as nursery,
    ):
        proxy = HalfOpeningProxy(int(direct_url.rsplit(":", 1)[1]))
        await nursery.start(proxy.serve)
        state = await enrolled_agent(f"http://127.0.0.1:{proxy.port}", store_url, state_dir)
        yield ProxiedAgent(direct_url, proxy, nursery, state)
        nursery.cancel_scope.cancel()


async def audit_events(store_url: str, team_id: str, action: str) -> list[dict[str, Any]]:
    async with open_store(store_url) as store:
        records = await store.audit.read_records(team_id, 0, 10_000)
    events = [json.loads(record.canonical)["event"] for record in records]
    return [event for event in events if event["action"] == action]


async def test_reconnect_after_a_silent_drop_supersedes_the_half_open_connection(
    tmp_path: Path, database_url: str  # noqa: F811 - the fixture: SQLite and PostgreSQL
) -> None:
    store_url = database_url
    async with agent_behind_a_proxy(tmp_path, store_url, tmp_path / "state") as (
        direct_url, proxy, nursery, state,
    ):  # fmt: skip
        client = ControlClient(
            state, MACHINE.fingerprint(), lambda offer: None,
            backoff=ReconnectBackoff(initial=0.05, cap=0.3),
        )  # fmt: skip
        nursery.start_soon(client.run)
        with trio.fail_after(WAIT_SECONDS):
            await client.wait_connected()
        first_id = client.info.connection_id
        assert first_id is not None

        proxy.cut()
        with trio.fail_after(WAIT_SECONDS):
            while client.connections < 2 or not client.is_connected:  # noqa: ASYNC110
                await trio.sleep(0.02)
        second_id = client.info.connection_id
        assert second_id not in (None, first_id)

        async with open_store(store_url) as store:
            listed = await store.list_agent_connections(state.team_id, state.agent_id)
        assert [connection.connection_id for connection in listed] == [second_id]
        assert await audit_events(store_url, state.team_id, "agent.clone_anomaly") == []
        connected = await audit_events(store_url, state.team_id, "agent.connected")
        assert [event["context"].get("replaces") for event in connected] == [None, first_id]
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(direct_url + "/metrics")).text
        assert "tucdesk_clone_anomalies_total{" not in metrics
        # The rendezvous closed the superseded channel instead of waiting for its timeout.
        [held] = proxy.held
        with trio.fail_after(WAIT_SECONDS):
            while await held.receive_some(PUMP_BYTES):
                pass


async def _run_until(scope: trio.CancelScope, client: ControlClient) -> None:
    with scope:
        await client.run()


async def _connection_ids(store_url: str, state: AgentState) -> list[str]:
    async with open_store(store_url) as store:
        listed = await store.list_agent_connections(state.team_id, state.agent_id)
    return [connection.connection_id for connection in listed]


def _replaces_by_connection(connected: list[dict[str, Any]]) -> dict[str, str | None]:
    return {
        event["context"]["connection_id"]: event["context"].get("replaces") for event in connected
    }


async def test_a_restarted_agent_names_the_connection_its_predecessor_held_and_is_no_clone(
    tmp_path: Path, database_url: str  # noqa: F811 - the fixture: SQLite and PostgreSQL
) -> None:
    """A crash or kill -9 after a silent drop: the new process names the old connection."""
    store_url = database_url
    state_dir = tmp_path / "state"
    async with agent_behind_a_proxy(tmp_path, store_url, state_dir) as (_, proxy, nursery, state):
        connection_file = AgentConfig(state_dir=state_dir).connection_file
        first = ControlClient(
            state, MACHINE.fingerprint(), lambda offer: None,
            backoff=fast_backoff(), connection_file=connection_file,
        )  # fmt: skip
        first_process = trio.CancelScope()
        nursery.start_soon(_run_until, first_process, first)
        with trio.fail_after(WAIT_SECONDS):
            await first.wait_connected()
        first_id = first.info.connection_id
        assert first_id is not None
        assert connection_file.read_bytes() == f"{first_id}\n".encode()
        assert stat.S_IMODE(connection_file.stat().st_mode) == 0o600

        # The network path drops and the process dies in the same instant (no checkpoint in
        # between): no close, no reconnect reaches the rendezvous, which still holds the row.
        proxy.cut()
        first_process.cancel()
        assert await _connection_ids(store_url, state) == [first_id]

        restarted = ControlClient(
            load_state(state_dir / "agent.state", MACHINE), MACHINE.fingerprint(),
            lambda offer: None, backoff=fast_backoff(), connection_file=connection_file,
        )  # fmt: skip
        nursery.start_soon(restarted.run)
        with trio.fail_after(WAIT_SECONDS):
            await restarted.wait_connected()
        second_id = restarted.info.connection_id
        assert second_id not in (None, first_id)

        assert await _connection_ids(store_url, state) == [second_id]
        assert await audit_events(store_url, state.team_id, "agent.clone_anomaly") == []
        connected = await audit_events(store_url, state.team_id, "agent.connected")
        assert _replaces_by_connection(connected) == {first_id: None, second_id: first_id}
        assert connection_file.read_bytes() == f"{second_id}\n".encode()
        # The rendezvous closed the superseded half-open channel instead of waiting 60 s.
        [held] = proxy.held
        with trio.fail_after(WAIT_SECONDS):
            while await held.receive_some(PUMP_BYTES):
                pass


async def test_a_killed_agent_daemon_restarted_after_a_silent_drop_is_no_clone(
    tmp_path: Path,
) -> None:
    """The real ``tucdesk-agent run``, killed with SIGKILL after its network path dropped."""
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    state_dir = tmp_path / "state"
    options, environment = daemon_options(tmp_path, state_dir)
    command = [AGENT_COMMAND, "run", *options]
    connection_file = AgentConfig(state_dir=state_dir).connection_file
    async with agent_behind_a_proxy(tmp_path, store_url, state_dir) as (_, proxy, _, state):
        first = await trio.lowlevel.open_process(command, env=environment, stderr=DEVNULL)
        try:
            first_id = await _welcomed_connection(store_url, state, connection_file)
            # Dead before it can notice the drop, so nothing of it reaches the rendezvous.
            proxy.cut()
            first.kill()
            await first.wait()
        finally:
            first.kill()
        assert await _connection_ids(store_url, state) == [first_id]
        second = await trio.lowlevel.open_process(command, env=environment, stderr=DEVNULL)
        try:
            second_id = await _welcomed_connection(store_url, state, connection_file, first_id)
            assert await audit_events(store_url, state.team_id, "agent.clone_anomaly") == []
            connected = await audit_events(store_url, state.team_id, "agent.connected")
            assert _replaces_by_connection(connected) == {first_id: None, second_id: first_id}
            assert await _connection_ids(store_url, state) == [second_id]
        finally:
            second.kill()
            await second.wait()


async def _welcomed_connection(
    store_url: str, state: AgentState, connection_file: Path, previous: str | None = None
) -> str:
    """Wait until the daemon has kept a connection id other than ``previous`` that the
    rendezvous lists; that id."""
    with trio.fail_after(WAIT_SECONDS):
        while True:
            try:
                kept = connection_file.read_text().strip()  # noqa: ASYNC240 - a few bytes
            except FileNotFoundError:
                kept = None
            if kept not in (None, previous) and kept in await _connection_ids(store_url, state):
                assert kept is not None
                return kept
            await trio.sleep(0.05)


# The original reconnects after a backoff wait of at most BACKOFF_INITIAL_SECONDS.
FLAGGED_WITHIN_SECONDS = 5
ANOMALY = "agent.clone_anomaly"


async def test_a_vm_cloned_from_disk_while_the_original_is_live_is_flagged_on_its_reconnect(
    tmp_path: Path, database_url: str  # noqa: F811 - the fixture: SQLite and PostgreSQL
) -> None:
    """The clone names the original's connection (the copied file) and supersedes it; the
    original, closed, reconnects at once naming its own id and finds the clone: flagged."""
    store_url = database_url
    async with (
        live_service(tmp_path / "data", store_url) as (url, _),
        trio.open_nursery() as nursery,
    ):
        original_dir, clone_dir = tmp_path / "original", tmp_path / "clone"
        state = await enrolled_agent(url, store_url, original_dir)
        original = ControlClient(
            state, MACHINE.fingerprint(), lambda offer: None,
            connection_file=AgentConfig(state_dir=original_dir).connection_file,
        )  # fmt: skip
        nursery.start_soon(original.run)
        with trio.fail_after(WAIT_SECONDS):
            await original.wait_connected()
        original_id = original.info.connection_id
        assert original_id is not None

        shutil.copytree(original_dir, clone_dir)  # the disk snapshot the clone boots from
        clone = ControlClient(
            load_state(clone_dir / "agent.state", MACHINE), MACHINE.fingerprint(),
            lambda offer: None, connection_file=AgentConfig(state_dir=clone_dir).connection_file,
        )  # fmt: skip
        nursery.start_soon(clone.run)
        with trio.fail_after(WAIT_SECONDS):
            await clone.wait_connected()
        clone_id = clone.info.connection_id
        assert clone_id is not None
        with trio.fail_after(FLAGGED_WITHIN_SECONDS):
            # The audit log is in the store, which signals nothing to a test: poll it.
            while not (anomalies := await audit_events(store_url, state.team_id, ANOMALY)):  # noqa: ASYNC110
                await trio.sleep(0.05)
            while original.connections < 2 or not original.is_connected:  # noqa: ASYNC110
                await trio.sleep(0.02)
        reconnected_id = original.info.connection_id
        assert reconnected_id not in (None, original_id, clone_id)

        [anomaly] = anomalies
        assert anomaly["context"]["kinds"] == ["concurrent_connection"]
        assert anomaly["context"]["other_connections"] == [clone_id]
        connected = await audit_events(store_url, state.team_id, "agent.connected")
        # The anomaly is recorded just after the connection that finds the other copy live.
        assert connected[-1]["context"]["connection_id"] == reconnected_id
        assert _replaces_by_connection(connected) == {
            original_id: None, clone_id: original_id, reconnected_id: original_id,
        }  # fmt: skip
        disconnected = await audit_events(store_url, state.team_id, "agent.disconnected")
        assert [e["context"] for e in disconnected] == [
            {"connection_id": original_id, "reason": "superseded"}
        ]
        assert set(await _connection_ids(store_url, state)) == {clone_id, reconnected_id}
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(url + "/metrics")).text
        assert 'tucdesk_clone_anomalies_total{kind="concurrent_connection"} 1.0' in metrics
        nursery.cancel_scope.cancel()


async def test_a_vm_cloned_from_disk_before_the_originals_last_reconnect_is_flagged_at_once(
    tmp_path: Path,
) -> None:
    """The copied file names a connection the original has left since: it matches nothing."""
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    original_dir, clone_dir = tmp_path / "original", tmp_path / "clone"
    async with agent_behind_a_proxy(tmp_path, store_url, original_dir) as (
        _, proxy, nursery, state,
    ):  # fmt: skip
        original = ControlClient(
            state, MACHINE.fingerprint(), lambda offer: None, backoff=fast_backoff(),
            connection_file=AgentConfig(state_dir=original_dir).connection_file,
        )  # fmt: skip
        nursery.start_soon(original.run)
        with trio.fail_after(WAIT_SECONDS):
            await original.wait_connected()
        snapshot_id = original.info.connection_id
        shutil.copytree(original_dir, clone_dir)
        proxy.cut()  # the original's network blips; it reconnects, naming snapshot_id
        with trio.fail_after(WAIT_SECONDS):
            while original.connections < 2 or not original.is_connected:  # noqa: ASYNC110
                await trio.sleep(0.02)
        live_id = original.info.connection_id
        assert await _connection_ids(store_url, state) == [live_id]

        clone = ControlClient(
            load_state(clone_dir / "agent.state", MACHINE), MACHINE.fingerprint(),
            lambda offer: None, connection_file=AgentConfig(state_dir=clone_dir).connection_file,
        )  # fmt: skip
        nursery.start_soon(clone.run)
        with trio.fail_after(WAIT_SECONDS):
            await clone.wait_connected()
        # Recorded before the clone was welcomed: at its connect, not later.
        [anomaly] = await audit_events(store_url, state.team_id, "agent.clone_anomaly")
        assert anomaly["context"]["other_connections"] == [live_id]
        connected = await audit_events(store_url, state.team_id, "agent.connected")
        assert _replaces_by_connection(connected)[clone.info.connection_id] == snapshot_id
        assert set(await _connection_ids(store_url, state)) == {live_id, clone.info.connection_id}
