"""Running rendezvous instances for session tests: real Hypercorn, real agent WebSockets.

``served_instance`` serves a ServiceHarness's app on an ephemeral loopback port and runs the
offer listener, so HTTP calls can go in-process (``harness.call``) while agents connect over a
real WebSocket to the same instance. ``AgentChannel`` is an agent's side of the control channel
built from the real protocol code.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.trio import serve
from trio_websocket import WebSocketConnection, open_websocket_url

from audit.actions import Action, ActorKind
from audit.record import Actor, AuditEvent, SignedEvent, sign_event
from protocol.domains import Purpose
from protocol.identity import PublicIdentity, SigningIdentity, b64url
from protocol.signed_payload import create_signed_payload
from rendezvous.offer_bus import listen_for_offers
from rendezvous.server import hypercorn_config
from rendezvous.store import Store
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness

WAIT_SECONDS = 15
RELAY = "relay-1=127.0.0.1:7000/7001"


@asynccontextmanager
async def served_instance(
    store: Store, data_dir: Path, **settings: Any
) -> AsyncIterator[tuple[ServiceHarness, str]]:
    """A harness whose app is also served on 127.0.0.1 (yields harness and base URL)."""
    settings.setdefault("relays", (RELAY,))
    service = ServiceHarness(
        store, data_dir, listen="127.0.0.1:0", insecure_http=True, **settings
    )
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(WAIT_SECONDS):
                await nursery.start(partial(listen_for_offers, service.ctx))
                binds = await nursery.start(
                    partial(serve, service.app, hypercorn_config(service.config))
                )
            yield service, binds[0]
            nursery.cancel_scope.cancel()
    finally:
        await service.aclose()


@dataclass
class EnrolledAgent:
    """An agent registered through the HTTP API."""

    identity: SigningIdentity
    agent_id: str
    team_id: str
    name: str


async def enroll_agent(
    service: ServiceHarness, admin: OperatorSession, hostname: str = "web-1"
) -> EnrolledAgent:
    """Register a fresh agent key in the admin's team."""
    key = await service.registration_key(admin)
    identity = SigningIdentity.generate()
    response = await service.register(identity, key["key"], hostname=hostname)
    assert response.status_code == 200, response.text
    return EnrolledAgent(identity, response.json()["agent_id"], admin.team_id, hostname)


class AgentChannel:
    """An agent's end of the control channel: authenticated, then message by message."""

    def __init__(self, ws: WebSocketConnection, agent: EnrolledAgent) -> None:
        self.ws = ws
        self.agent = agent

    async def receive(self, kind: str | None = None) -> dict[str, Any]:
        """The next message (of type ``kind`` if given, skipping heartbeat acks)."""
        with trio.fail_after(WAIT_SECONDS):
            while True:
                message: dict[str, Any] = json.loads(await self.ws.get_message())
                if message.get("type") == "heartbeat_ack":
                    continue
                if kind is None or message.get("type") == kind:
                    return message

    async def send(self, message: dict[str, Any]) -> None:
        """Send one JSON message."""
        with trio.fail_after(WAIT_SECONDS):
            await self.ws.send_message(json.dumps(message))

    async def send_event(
        self,
        action: Action,
        *,
        session_id: str | None,
        signer: SigningIdentity | None = None,
        actor_id: str | None = None,
        team_id: str | None = None,
        context: dict[str, Any] | None = None,
        event_id: str = "e1",
    ) -> dict[str, Any]:
        """Sign an audit event (by default honestly) and send it; returns the server's answer."""
        from datetime import UTC, datetime

        key = signer or self.agent.identity
        event = AuditEvent(
            occurred_at=datetime.now(UTC),
            team_id=team_id or self.agent.team_id,
            actor=Actor(ActorKind.AGENT, actor_id or self.agent.agent_id, self.agent.name),
            action=action,
            signer=key.public.key_id,
            session_id=session_id,
            context=context or {},
        )
        signed: SignedEvent = sign_event(key, event)
        await self.send({"type": "audit_event", "event": signed.to_json(), "id": event_id})
        with trio.fail_after(WAIT_SECONDS):
            while True:
                answer = await self.receive()
                if answer.get("type", "").startswith("audit_event_"):
                    return answer


@asynccontextmanager
async def agent_channel(url: str, agent: EnrolledAgent) -> AsyncIterator[AgentChannel]:
    """Connect ``agent`` to the instance at ``url`` and answer its signed challenge."""
    ws_url = url.replace("http://", "ws://") + "/v1/agents/connect"
    async with open_websocket_url(ws_url) as ws:
        with trio.fail_after(WAIT_SECONDS):
            challenge = json.loads(await ws.get_message())
            envelope = create_signed_payload(
                agent.identity,
                Purpose.AGENT_AUTH,
                {
                    "agent_id": agent.agent_id,
                    "public_key": b64url(agent.identity.public.raw),
                    "challenge": challenge["challenge"],
                    "audience": challenge["audience"],
                    "machine_fingerprint": "machine-1",
                },
                time.time(),
            )
            await ws.send_message(json.dumps({"type": "auth", "envelope": envelope}))
            welcome = json.loads(await ws.get_message())
            assert welcome["type"] == "welcome", welcome
        yield AgentChannel(ws, agent)


def jwt_issuer_keys(service: ServiceHarness) -> dict[str, PublicIdentity]:
    """The keys an agent pinned for grants: the JWT issuer key, by kid."""
    key = service.ctx.keys.jwt_issuer.public
    return {key.key_id: key}


def relay_token_keys(service: ServiceHarness) -> dict[str, PublicIdentity]:
    """The keys a relay pins: the relay-token signer, by kid."""
    key = service.ctx.keys.relay_token.public
    return {key.key_id: key}


async def wait_for_session_state(
    service: ServiceHarness, operator: OperatorSession, session_id: str, state: str
) -> dict[str, Any]:
    """Poll ``GET /v1/sessions/{id}`` until the session is in ``state`` (with a deadline)."""
    path = f"/v1/sessions/{session_id}"
    with trio.fail_after(WAIT_SECONDS):
        while True:
            response = await service.call(operator, "GET", path)
            assert response.status_code == 200, response.text
            view: dict[str, Any] = response.json()
            if view["state"] == state:
                return view
            # The state lives in the database (maybe written by another instance): no event.
            await trio.sleep(0.02)
