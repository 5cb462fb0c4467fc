"""The agent's control client against a scripted rendezvous: answers a real one gives only when
its store fails (``audit_event_failed``), and offers that arrive while the daemon stops.

The scripted side is a real WebSocket server speaking the control protocol (challenge, welcome,
then whatever the test sends); the client under test is the daemon's, unchanged.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, serve_websocket

import agent.control_client as control_client
from agent.control_client import STOPPING_REFUSAL_REASON, ControlClient
from agent.event_spool import EventSpool
from agent.state_file import AgentState
from tests.agent.session_helpers import trio_test
from tests.agent.test_event_spool import _event
from tests.agent.test_session_host_daemon import MACHINE

WAIT_SECONDS = 10
AGENT_ID = "agt_1"

Script = Callable[[WebSocketConnection], Awaitable[None]]


def _state(port: int) -> AgentState:
    return AgentState(
        agent_id=AGENT_ID, team_id="tm_1", server_url=f"http://127.0.0.1:{port}",
        identity_seed=bytes(32), service_keys={},
    )  # fmt: skip


async def _receive(websocket: WebSocketConnection) -> dict[str, Any]:
    message: dict[str, Any] = json.loads(await websocket.get_message())
    return message


@asynccontextmanager
async def scripted_rendezvous(script: Script) -> AsyncIterator[int]:
    """A control-channel server on loopback that welcomes the agent, then runs ``script``."""

    async def handler(request: WebSocketRequest) -> None:
        websocket = await request.accept()
        await websocket.send_message(
            json.dumps({"type": "challenge", "challenge": "c", "audience": "test-rendezvous",
                        "heartbeat_seconds": 30})
        )  # fmt: skip
        assert (await _receive(websocket))["type"] == "auth"
        await websocket.send_message(
            json.dumps({"type": "welcome", "agent_id": AGENT_ID, "features": ["live_sessions"]})
        )
        try:
            await script(websocket)
            await trio.sleep_forever()
        except ConnectionClosed:
            pass  # the agent closed the channel: the script is over

    async with trio.open_nursery() as nursery:
        server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
        yield server.port
        nursery.cancel_scope.cancel()


@trio_test
async def test_an_event_the_rendezvous_could_not_store_now_is_sent_again_after_a_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control_client, "AUDIT_RETRY_INITIAL_SECONDS", 0.2, raising=False)
    # More than fit in flight at once: before, every failed one stayed in flight for ever and
    # the client stopped sending events (and its live_sessions report) altogether.
    count = control_client.MAX_AUDIT_IN_FLIGHT + 6
    failed_at: dict[str, float] = {}
    resent_at: dict[str, float] = {}
    order: list[str] = []
    report = trio.Event()

    async def script(websocket: WebSocketConnection) -> None:
        while not report.is_set():
            message = await _receive(websocket)
            if message["type"] == "live_sessions":
                assert len(resent_at) == count  # it waits for the events queued before it
                report.set()
                continue
            if message["type"] != "audit_event":
                continue
            event_id = message["id"]
            order.append(event_id)
            if event_id not in failed_at:
                failed_at[event_id] = trio.current_time()
                answer = {"type": "audit_event_failed", "id": event_id,
                          "reason": "audit log unavailable"}  # fmt: skip
            else:
                resent_at[event_id] = trio.current_time()
                answer = {"type": "audit_event_ack", "id": event_id}
            await websocket.send_message(json.dumps(answer))

    spool = EventSpool(tmp_path / "spool")
    async with scripted_rendezvous(script) as port:
        client = ControlClient(
            _state(port), MACHINE.fingerprint(), lambda offer: None, event_spool=spool,
            live_sessions=frozenset,
        )  # fmt: skip
        for number in range(count):
            client.send_audit_event(_event(number))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            with trio.fail_after(WAIT_SECONDS):
                await report.wait()
            nursery.cancel_scope.cancel()
    assert client.pending_audit_events == 0
    assert client.acknowledged_audit_events == count and client.refused_audit_events == 0
    assert spool.load() == []
    first = order[0]
    # Not hammered: the first event comes back only after the wait, and before the others.
    assert resent_at[first] - failed_at[first] >= 0.2
    repeated = [key for number, key in enumerate(order) if key in order[:number]]
    assert repeated[0] == first


@trio_test
async def test_an_offer_arriving_while_the_agent_stops_is_refused_and_never_started() -> None:
    refused: list[dict[str, Any]] = []
    session_running = trio.Event()
    offered = trio.Event()
    live: set[str] = {"ses_running"}

    async def script(websocket: WebSocketConnection) -> None:
        while True:
            message = await _receive(websocket)
            if message["type"] == "live_sessions":
                session_running.set()
                await offered.wait()
                await websocket.send_message(json.dumps({
                    "type": "session_offer", "session_id": "ses_late",
                }))  # fmt: skip
            elif message["type"] == "session_offer_refused":
                refused.append(message)
                live.clear()  # the running session ends: the drain may finish

    started: list[dict[str, Any]] = []
    async with scripted_rendezvous(script) as port:
        client = ControlClient(
            _state(port), MACHINE.fingerprint(), started.append, live_sessions=lambda: set(live),
        )  # fmt: skip
        with trio.fail_after(WAIT_SECONDS):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.run)
                await session_running.wait()
                nursery.cancel_scope.cancel()  # SIGTERM: the client drains, still connected
                offered.set()
    assert started == []
    assert refused == [
        {"type": "session_offer_refused", "session_id": "ses_late",
         "reason": STOPPING_REFUSAL_REASON},
    ]  # fmt: skip


@trio_test
async def test_the_stop_drain_ends_when_the_last_session_does_not_at_a_poll(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A poll would first look again after this long: the signal ends the drain well before.
    monkeypatch.setattr(control_client, "DRAIN_CHECK_SECONDS", 3.0)
    reported = trio.Event()
    live: set[str] = {"ses_running"}
    all_ended = trio.Event()

    async def sessions_ended() -> None:
        await all_ended.wait()

    async def script(websocket: WebSocketConnection) -> None:
        while True:
            if (await _receive(websocket))["type"] == "live_sessions":
                reported.set()

    async with scripted_rendezvous(script) as port:
        client = ControlClient(
            _state(port), MACHINE.fingerprint(), lambda offer: None,
            live_sessions=lambda: set(live), sessions_ended=sessions_ended,
        )  # fmt: skip
        stopping = trio.CancelScope()
        stopped = trio.Event()

        async def run_client() -> None:
            with stopping:
                await client.run()
            stopped.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_client)
            with trio.fail_after(WAIT_SECONDS):
                await reported.wait()
            stopping.cancel()  # SIGTERM: the drain waits for the session
            await trio.sleep(0.2)
            assert client.is_connected and not stopped.is_set()
            live.clear()
            all_ended.set()
            ended_at = trio.current_time()
            with trio.fail_after(WAIT_SECONDS):
                await stopped.wait()
        assert trio.current_time() - ended_at < 1.0
        assert not client.is_connected
