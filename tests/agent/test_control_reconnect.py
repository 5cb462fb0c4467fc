"""The agent's reconnect after a silent network drop is not taken for a clone of itself.

A loopback TCP proxy stands between the real ControlClient and the real rendezvous. Cutting it
closes the agent's side but leaves the rendezvous's side open and silent: the half-open
connection a laptop sleep or a NAT timeout leaves behind, which the rendezvous only notices at
its heartbeat timeout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from agent.control_client import ControlClient, ReconnectBackoff
from rendezvous.store import open_store
from tests.agent.test_control_client import MACHINE, enrolled_agent
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


async def audit_events(store_url: str, team_id: str, action: str) -> list[dict[str, Any]]:
    async with open_store(store_url) as store:
        records = await store.audit.read_records(team_id, 0, 10_000)
    events = [json.loads(record.canonical)["event"] for record in records]
    return [event for event in events if event["action"] == action]


async def test_reconnect_after_a_silent_drop_supersedes_the_half_open_connection(
    tmp_path: Path, database_url: str  # noqa: F811 - the fixture: SQLite and PostgreSQL
) -> None:
    store_url = database_url
    # A heartbeat timeout far longer than the test: the rendezvous keeps holding the old channel.
    async with (
        live_service(
            tmp_path / "data", store_url, heartbeat_seconds=1.0, heartbeat_timeout_seconds=60.0
        ) as (direct_url, _),
        trio.open_nursery() as nursery,
    ):
        proxy = HalfOpeningProxy(int(direct_url.rsplit(":", 1)[1]))
        await nursery.start(proxy.serve)
        state = await enrolled_agent(
            f"http://127.0.0.1:{proxy.port}", store_url, tmp_path / "state"
        )
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
        nursery.cancel_scope.cancel()
