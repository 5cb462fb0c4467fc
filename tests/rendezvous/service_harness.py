"""A rendezvous app over a real store, driven in-process through httpx's ASGI transport.

``ServiceHarness`` builds keys in a temporary data dir, a ServiceContext with a settable clock,
and helpers to enroll operators, log in, sign proofs and build agent registration payloads
with the real protocol/ code, so tests read as the scenario they pin.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from protocol.domains import Purpose
from protocol.identity import SigningIdentity, b64url
from protocol.request_proof import PROOF_HEADER, create_proof
from protocol.signed_payload import create_signed_payload
from rendezvous.app import create_app
from rendezvous.config import ServiceConfig
from rendezvous.context import ServiceContext
from rendezvous.credentials import hash_secret, new_invite_code
from rendezvous.server import build_context
from rendezvous.service_keys import create_missing_keys
from rendezvous.store import Store

BASE_URL = "http://rendezvous.test"


class Clock:
    """A settable clock shared by the service and the test's signers."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class OperatorSession:
    """An enrolled, logged-in operator: its key, ids and access token."""

    identity: SigningIdentity
    operator_id: str
    team_id: str
    role: str
    token: str


class ServiceHarness:
    """One service instance over ``store`` plus an HTTP client talking to it in-process."""

    def __init__(self, store: Store, data_dir: Path, **settings: Any) -> None:
        create_missing_keys(data_dir)
        self.config = ServiceConfig(data_dir=data_dir, **settings)
        self.store = store
        self.clock = Clock()
        self.ctx: ServiceContext = build_context(self.config, store)
        self.ctx.clock = self.clock
        self.app = create_app(self.ctx)
        self.http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url=BASE_URL
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    # ---- teams and operators -------------------------------------------------------------

    async def team(self, name: str) -> str:
        team = await self.store.create_team(name, self.clock.now)
        return team.id

    async def invite(self, team_id: str, role: str, email: str | None = None) -> str:
        code = new_invite_code()
        await self.store.create_invite(
            team_id,
            email or f"{role}@{team_id}.test",
            role,
            hash_secret(code),
            self.clock.now + 3600,
            "test",
            self.clock.now,
        )
        return code

    def enrollment(self, identity: SigningIdentity, code: str) -> dict[str, Any]:
        return create_signed_payload(
            identity,
            Purpose.OPERATOR_ENROLL,
            {"invite": code, "public_key": b64url(identity.public.raw)},
            self.clock.now,
        )

    async def login_envelope(self, identity: SigningIdentity) -> dict[str, Any]:
        response = await self.http.post(
            "/v1/auth/challenge", json={"key_thumbprint": identity.public.key_id}
        )
        assert response.status_code == 200, response.text
        challenge = response.json()
        return create_signed_payload(
            identity,
            Purpose.OPERATOR_LOGIN,
            {
                "challenge_id": challenge["challenge_id"],
                "challenge": challenge["challenge"],
                "audience": challenge["audience"],
                "key_thumbprint": identity.public.key_id,
            },
            self.clock.now,
        )

    async def login(self, identity: SigningIdentity) -> dict[str, Any]:
        response = await self.http.post("/v1/auth/login", json=await self.login_envelope(identity))
        assert response.status_code == 200, response.text
        result: dict[str, Any] = response.json()
        return result

    async def operator(self, team_id: str, role: str = "admin") -> OperatorSession:
        identity = SigningIdentity.generate()
        code = await self.invite(team_id, role)
        response = await self.http.post(
            "/v1/operators/enroll", json=self.enrollment(identity, code)
        )
        assert response.status_code == 200, response.text
        token = await self.login(identity)
        return OperatorSession(
            identity, token["operator_id"], team_id, role, token["access_token"]
        )

    # ---- authenticated requests ----------------------------------------------------------

    def proof(
        self,
        signer: SigningIdentity,
        method: str,
        target: str,
        body: bytes,
        token: str,
        proof_id: str | None = None,
    ) -> str:
        return create_proof(
            signer,
            method=method,
            target=target,
            body=body,
            access_token=token,
            now=int(self.clock.now),
            proof_id=proof_id,
        )

    async def call(
        self,
        operator: OperatorSession,
        method: str,
        target: str,
        body: Any = None,
        *,
        token: str | None = None,
        signer: SigningIdentity | None = None,
        proof: str | None = None,
        with_proof: bool = True,
    ) -> httpx.Response:
        token = token if token is not None else operator.token
        content = b"" if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {token}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if with_proof:
            headers[PROOF_HEADER] = proof or self.proof(
                signer or operator.identity, method, target, content, token
            )
        return await self.http.request(method, target, content=content, headers=headers)

    async def registration_key(
        self, operator: OperatorSession, tags: list[str] | None = None, ttl: int | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"tags": tags or []}
        if ttl is not None:
            body["ttl_seconds"] = ttl
        response = await self.call(operator, "POST", "/v1/registration-keys", body)
        assert response.status_code == 201, response.text
        result: dict[str, Any] = response.json()
        return result

    # ---- agents --------------------------------------------------------------------------

    def registration(
        self,
        agent: SigningIdentity,
        key: str,
        *,
        hostname: str = "web-1",
        machine: str = "machine-1",
        now: float | None = None,
    ) -> dict[str, Any]:
        return create_signed_payload(
            agent,
            Purpose.REGISTER,
            {
                "registration_key": key,
                "public_key": b64url(agent.public.raw),
                "machine_fingerprint": machine,
                "hostname": hostname,
            },
            self.clock.now if now is None else now,
        )

    async def register(self, agent: SigningIdentity, key: str, **kwargs: Any) -> httpx.Response:
        payload = self.registration(agent, key, **kwargs)
        return await self.http.post("/v1/agents/register", json=payload)

    async def audit_events(self, team_id: str, action: str | None = None) -> list[dict[str, Any]]:
        """The team's audit events in log order (only ``action``'s, if given)."""
        records = await self.store.audit.read_records(team_id, 0, 10_000)
        events = [json.loads(record.canonical)["event"] for record in records]
        return [event for event in events if action is None or event["action"] == action]

    async def audit_actions(self, team_id: str) -> list[str]:
        return [event["action"] for event in await self.audit_events(team_id)]


@asynccontextmanager
async def harness(store: Store, data_dir: Path, **settings: Any) -> AsyncIterator[ServiceHarness]:
    """A ServiceHarness closed on exit."""
    service = ServiceHarness(store, data_dir, **settings)
    try:
        yield service
    finally:
        await service.aclose()
