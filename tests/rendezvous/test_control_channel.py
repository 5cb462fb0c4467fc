"""The agent control channel over a real WebSocket: signed challenge, presence, clone anomalies."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from protocol.domains import Purpose
from protocol.identity import SigningIdentity, b64url
from protocol.signed_payload import create_signed_payload
from rendezvous.credentials import hash_secret, new_registration_key
from rendezvous.store import open_store
from tests.rendezvous.live_server import live_service

pytestmark = pytest.mark.anyio

WAIT_SECONDS = 15


async def _registered_agent(
    url: str, database_url: str, machine: str = "machine-1"
) -> tuple[SigningIdentity, str, str]:
    """Register a fresh agent through the HTTP API; returns (identity, agent id, team id)."""
    key = new_registration_key()
    async with open_store(database_url) as store:
        team = await store.get_team_by_name("ops") or await store.create_team("ops", time.time())
        await store.create_registration_key(
            team.id, hash_secret(key), ["web"], time.time() + 600, "test", time.time()
        )
    agent = SigningIdentity.generate()
    payload = create_signed_payload(
        agent,
        Purpose.REGISTER,
        {
            "registration_key": key,
            "public_key": b64url(agent.public.raw),
            "machine_fingerprint": machine,
            "hostname": "web-1",
        },
        time.time(),
    )
    async with httpx.AsyncClient() as client:
        response = await client.post(url + "/v1/agents/register", json=payload)
    assert response.status_code == 200, response.text
    return agent, response.json()["agent_id"], team.id


def _answer(
    agent: SigningIdentity, agent_id: str, challenge: dict[str, Any], machine: str
) -> str:
    envelope = create_signed_payload(
        agent,
        Purpose.AGENT_AUTH,
        {
            "agent_id": agent_id,
            "public_key": b64url(agent.public.raw),
            "challenge": challenge["challenge"],
            "audience": challenge["audience"],
            "machine_fingerprint": machine,
        },
        time.time(),
    )
    return json.dumps({"type": "auth", "envelope": envelope})


@asynccontextmanager
async def _channel(
    url: str, agent: SigningIdentity, agent_id: str, machine: str = "machine-1"
) -> AsyncIterator[tuple[WebSocketConnection, dict[str, Any]]]:
    ws_url = url.replace("http://", "ws://") + "/v1/agents/connect"
    async with open_websocket_url(ws_url) as ws:
        with trio.fail_after(WAIT_SECONDS):
            challenge = json.loads(await ws.get_message())
            assert challenge["type"] == "challenge"
            await ws.send_message(_answer(agent, agent_id, challenge, machine))
            welcome = json.loads(await ws.get_message())
        yield ws, welcome


async def _agent_view(store_url: str, team_id: str, agent_id: str):
    async with open_store(store_url) as store:
        return await store.get_agent(team_id, agent_id)


async def _actions(store_url: str, team_id: str) -> list[str]:
    async with open_store(store_url) as store:
        records = await store.audit.read_records(team_id, 0, 10_000)
    return [json.loads(record.canonical)["event"]["action"] for record in records]


async def _wait_until(predicate) -> None:
    """Poll the database (another process's view) until ``predicate`` holds, with a deadline."""
    with trio.fail_after(WAIT_SECONDS):
        while not await predicate():  # noqa: ASYNC110 - state lives in the database, no event
            await trio.sleep(0.05)


async def test_agent_authenticates_by_signed_challenge_and_shows_online(
    database_url: str, tmp_path: Path
) -> None:
    async with live_service(tmp_path / "data", database_url) as (url, _):
        agent, agent_id, team_id = await _registered_agent(url, database_url)
        async with _channel(url, agent, agent_id) as (ws, welcome):
            assert welcome["type"] == "welcome"
            assert welcome["agent_id"] == agent_id
            with trio.fail_after(WAIT_SECONDS):
                await ws.send_message(json.dumps({"type": "heartbeat"}))
                assert json.loads(await ws.get_message())["type"] == "heartbeat_ack"
            view = await _agent_view(database_url, team_id, agent_id)
            assert view is not None and view.online and view.last_seen_at is not None
            async with httpx.AsyncClient() as client:
                metrics = (await client.get(url + "/metrics")).text
            assert "tucdesk_connected_agents 1.0" in metrics

        async def offline() -> bool:
            view = await _agent_view(database_url, team_id, agent_id)
            return view is not None and not view.online

        await _wait_until(offline)
        actions = await _actions(database_url, team_id)
        assert "agent.connected" in actions and "agent.disconnected" in actions


async def test_challenge_signed_by_another_key_is_refused(
    database_url: str, tmp_path: Path
) -> None:
    async with live_service(tmp_path / "data", database_url) as (url, _):
        agent, agent_id, team_id = await _registered_agent(url, database_url)
        impostor = SigningIdentity.generate()
        ws_url = url.replace("http://", "ws://") + "/v1/agents/connect"
        async with open_websocket_url(ws_url) as ws:
            with trio.fail_after(WAIT_SECONDS):
                challenge = json.loads(await ws.get_message())
                answer = json.loads(_answer(impostor, agent_id, challenge, "machine-1"))
                # Claim the registered agent's key, but sign with the impostor's.
                answer["envelope"]["payload"]["public_key"] = b64url(agent.public.raw)
                await ws.send_message(json.dumps(answer))
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
        assert closed.value.reason.code == 1008
        view = await _agent_view(database_url, team_id, agent_id)
        assert view is not None and not view.online


async def test_answer_to_another_challenge_is_refused(database_url: str, tmp_path: Path) -> None:
    async with live_service(tmp_path / "data", database_url) as (url, _):
        agent, agent_id, _ = await _registered_agent(url, database_url)
        ws_url = url.replace("http://", "ws://") + "/v1/agents/connect"
        async with open_websocket_url(ws_url) as ws:
            with trio.fail_after(WAIT_SECONDS):
                challenge = json.loads(await ws.get_message())
                challenge["challenge"] = "a-different-challenge"
                await ws.send_message(_answer(agent, agent_id, challenge, "machine-1"))
                with pytest.raises(ConnectionClosed):
                    await ws.get_message()


async def test_second_live_connection_is_flagged_as_clone_anomaly(
    database_url: str, tmp_path: Path
) -> None:
    async with live_service(tmp_path / "data", database_url) as (url, _):
        agent, agent_id, team_id = await _registered_agent(url, database_url)
        async with _channel(url, agent, agent_id) as (_, first):
            async with _channel(url, agent, agent_id) as (_, second):
                assert first["type"] == second["type"] == "welcome"
                actions = await _actions(database_url, team_id)
                assert "agent.clone_anomaly" in actions
                async with httpx.AsyncClient() as client:
                    metrics = (await client.get(url + "/metrics")).text
                assert 'tucdesk_clone_anomalies_total{kind="concurrent_connection"} 1.0' in metrics


async def test_second_machine_fingerprint_is_flagged_as_clone_anomaly(
    database_url: str, tmp_path: Path
) -> None:
    async with live_service(tmp_path / "data", database_url) as (url, _):
        agent, agent_id, team_id = await _registered_agent(url, database_url)
        async with _channel(url, agent, agent_id, machine="another-machine"):
            pass
        actions = await _actions(database_url, team_id)
        assert "agent.clone_anomaly" in actions
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(url + "/metrics")).text
        assert 'tucdesk_clone_anomalies_total{kind="machine_fingerprint"} 1.0' in metrics


async def test_silent_agent_is_disconnected_after_the_heartbeat_timeout(
    database_url: str, tmp_path: Path
) -> None:
    async with live_service(
        tmp_path / "data", database_url, heartbeat_seconds=0.2, heartbeat_timeout_seconds=0.5
    ) as (url, _):
        agent, agent_id, _ = await _registered_agent(url, database_url)
        async with _channel(url, agent, agent_id) as (ws, _):
            with trio.fail_after(WAIT_SECONDS), pytest.raises(ConnectionClosed):
                while True:
                    await ws.get_message()


@pytest.mark.parametrize(
    "first_message",
    ["not json", "[1, 2]", json.dumps({"type": "heartbeat"}), "x" * 20_000,
     json.dumps({"type": "auth", "envelope": {"payload": {}, "signature": "AA"}})],
)
async def test_malformed_first_message_closes_the_channel_as_a_policy_violation(
    database_url: str, tmp_path: Path, first_message: str
) -> None:
    async with live_service(tmp_path / "data", database_url) as (url, _):
        ws_url = url.replace("http://", "ws://") + "/v1/agents/connect"
        async with open_websocket_url(ws_url) as ws:
            with trio.fail_after(WAIT_SECONDS):
                await ws.get_message()
                await ws.send_message(first_message)
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
        assert closed.value.reason.code == 1008


async def test_unregistered_agent_key_is_refused(database_url: str, tmp_path: Path) -> None:
    async with live_service(tmp_path / "data", database_url) as (url, _):
        stranger = SigningIdentity.generate()
        ws_url = url.replace("http://", "ws://") + "/v1/agents/connect"
        async with open_websocket_url(ws_url) as ws:
            with trio.fail_after(WAIT_SECONDS):
                challenge = json.loads(await ws.get_message())
                await ws.send_message(_answer(stranger, "agt_nobody", challenge, "machine-1"))
                with pytest.raises(ConnectionClosed) as closed:
                    await ws.get_message()
        assert closed.value.reason.code == 1008
        assert "not registered" in (closed.value.reason.reason or "")


async def test_service_can_push_a_message_down_a_live_channel(
    database_url: str, tmp_path: Path
) -> None:
    from functools import partial

    from hypercorn.trio import serve

    from rendezvous.app import create_app
    from rendezvous.config import ServiceConfig
    from rendezvous.server import build_context, hypercorn_config
    from rendezvous.service_keys import create_missing_keys

    data = tmp_path / "data"
    create_missing_keys(data)
    config = ServiceConfig(
        data_dir=data, database=database_url, listen="127.0.0.1:0", insecure_http=True
    )
    async with open_store(database_url) as store, trio.open_nursery() as nursery:
        ctx = build_context(config, store)
        connections = ctx.connections
        assert connections is not None
        with trio.fail_after(WAIT_SECONDS):
            binds = await nursery.start(partial(serve, create_app(ctx), hypercorn_config(config)))
        url = binds[0]
        agent, agent_id, team_id = await _registered_agent(url, database_url)
        assert not await connections.send(team_id, agent_id, {"type": "offer"})
        async with _channel(url, agent, agent_id) as (ws, _):
            assert len(connections.channels(team_id, agent_id)) == 1
            assert not await connections.send("tm_other", agent_id, {"type": "offer"})
            assert await connections.send(team_id, agent_id, {"type": "offer", "sid": "s1"})
            with trio.fail_after(WAIT_SECONDS):
                assert json.loads(await ws.get_message()) == {"type": "offer", "sid": "s1"}
        nursery.cancel_scope.cancel()


async def test_a_store_error_inside_the_control_channel_is_answered_not_crashed(
    store: Any, tmp_path: Path
) -> None:
    # The app's error handlers also see the agent's WebSocket, which has no HTTP method: they
    # raised AttributeError on it instead of logging the store's reason.
    from starlette.websockets import WebSocket

    from rendezvous.app import create_app
    from rendezvous.config import ServiceConfig
    from rendezvous.server import build_context
    from rendezvous.service_keys import create_missing_keys
    from rendezvous.store.base import StoreError, StoreUnavailable

    data = tmp_path / "data"
    create_missing_keys(data)
    config = ServiceConfig(data_dir=data, database=str(data / "x.db"), listen="127.0.0.1:0",
                           insecure_http=True)  # fmt: skip
    app = create_app(build_context(config, store))
    while not hasattr(app, "exception_handlers"):  # inside the ASGI middleware
        app = app.app
    scope = {"type": "websocket", "path": "/v1/agent/channel", "headers": [], "query_string": b""}

    async def never() -> dict[str, Any]:
        raise AssertionError("not read")

    async def ignore(message: dict[str, Any]) -> None:
        pass

    websocket = WebSocket(scope, never, ignore)
    response = await app.exception_handlers[StoreError](websocket, StoreUnavailable("disk full"))
    assert response.status_code == 503
