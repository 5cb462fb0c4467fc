"""Authenticating a read stays a cheap path without going stale: on SQLite and PostgreSQL.

The signature of an access token is verified once per token text (``VerifiedTokenCache``);
revocation and the operator's standing are read from the store on every request. These tests
use a token first (so its verification is cached, on both instances when there are two), then
revoke it one way or another on one instance and expect the very next request to be refused.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from protocol.identity import SigningIdentity
from rendezvous.store import open_store
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness, harness

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def two_instances(
    database_url: str, data_dir: Path
) -> AsyncIterator[tuple[ServiceHarness, ServiceHarness]]:
    """Two service instances, each with its own store connection, on one database."""
    async with (
        open_store(database_url) as store_a,
        open_store(database_url) as store_b,
        harness(store_a, data_dir) as instance_a,
        harness(store_b, data_dir) as instance_b,
    ):
        yield instance_a, instance_b


async def _list_status(service: ServiceHarness, token: str) -> int:
    response = await service.http.get("/v1/agents", headers={"Authorization": f"Bearer {token}"})
    return response.status_code


async def _use_everywhere(token: str, *instances: ServiceHarness) -> None:
    for instance in instances:
        assert await _list_status(instance, token) == 200
        assert await _list_status(instance, token) == 200  # the second one uses the cache


def _claims(operator: OperatorSession) -> dict[str, object]:
    payload = operator.token.split(".")[1]
    claims: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "=="))
    return claims


async def test_token_revoked_on_one_instance_is_refused_by_the_other_at_once(
    database_url: str, tmp_path: Path
) -> None:
    async with two_instances(database_url, tmp_path / "data") as (instance_a, instance_b):
        team = await instance_a.team("ops")
        admin = await instance_a.operator(team)
        victim = await instance_a.operator(team, "operator")
        await _use_everywhere(victim.token, instance_a, instance_b)
        assert instance_b.ctx.verified_tokens.holds(victim.token)
        claims = _claims(victim)
        revoked = await instance_a.call(
            admin, "POST", "/v1/tokens/revoke", {"jti": claims["jti"], "expires_at": claims["exp"]}
        )
        assert revoked.status_code == 204
        assert await _list_status(instance_b, victim.token) == 401
        assert await _list_status(instance_a, victim.token) == 401
        assert await _list_status(instance_b, admin.token) == 200


async def test_operator_disabled_on_one_instance_is_refused_by_the_other_at_once(
    database_url: str, tmp_path: Path
) -> None:
    async with two_instances(database_url, tmp_path / "data") as (instance_a, instance_b):
        team = await instance_a.team("ops")
        admin = await instance_a.operator(team)
        victim = await instance_a.operator(team, "operator")
        await _use_everywhere(victim.token, instance_a, instance_b)
        disabled = await instance_a.call(
            admin, "POST", f"/v1/operators/{victim.operator_id}/disable"
        )
        assert disabled.status_code == 200
        assert await _list_status(instance_b, victim.token) == 401
        failures = instance_b.ctx.metrics.auth_failures.labels("operator_disabled")
        assert failures._value.get() == 1


async def test_logout_everywhere_on_one_instance_kills_cached_tokens_on_the_other(
    database_url: str, tmp_path: Path
) -> None:
    async with two_instances(database_url, tmp_path / "data") as (instance_a, instance_b):
        team = await instance_a.team("ops")
        victim = await instance_a.operator(team, "operator")
        await _use_everywhere(victim.token, instance_a, instance_b)
        instance_a.clock.now += 1  # tokens issued before this moment die
        instance_b.clock.now = instance_a.clock.now
        now = instance_a.clock.now
        await instance_a.store.revoke_operator_tokens(team, victim.operator_id, now)
        assert await _list_status(instance_b, victim.token) == 401


async def test_api_key_revoked_on_one_instance_is_refused_by_the_other_at_once(
    database_url: str, tmp_path: Path
) -> None:
    async with two_instances(database_url, tmp_path / "data") as (instance_a, instance_b):
        admin = await instance_a.operator(await instance_a.team("ops"))
        created = await instance_a.call(
            admin, "POST", "/v1/api-keys", {"name": "ci", "scopes": ["agents:read"]}
        )
        assert created.status_code == 201
        secret = created.json()["key"]
        await _use_everywhere(secret, instance_a, instance_b)
        revoked = await instance_a.call(admin, "DELETE", f"/v1/api-keys/{created.json()['id']}")
        assert revoked.status_code == 200
        assert await _list_status(instance_b, secret) == 401


async def test_cached_token_is_refused_once_it_expires(database_url: str, tmp_path: Path) -> None:
    async with open_store(database_url) as store, harness(store, tmp_path / "data") as service:
        operator = await service.operator(await service.team("ops"), "operator")
        await _use_everywhere(operator.token, service)
        service.clock.now += service.config.access_token_seconds + 3600
        assert await _list_status(service, operator.token) == 401


async def test_edited_token_is_verified_afresh_after_the_original_was_cached(
    database_url: str, tmp_path: Path
) -> None:
    """The cache is keyed by the exact token text: an edited copy is verified afresh."""
    async with open_store(database_url) as store, harness(store, tmp_path / "data") as service:
        operator = await service.operator(await service.team("ops"), "operator")
        await _use_everywhere(operator.token, service)
        header, payload, signature = operator.token.split(".")
        claims = _claims(operator)
        claims["role"] = "admin"
        forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode()
        forged = ".".join((header, forged_payload.rstrip("="), signature))
        assert await _list_status(service, forged) == 401


async def test_the_list_read_with_the_token_matches_the_api_key_list_and_stays_in_the_team(
    database_url: str, tmp_path: Path
) -> None:
    async with open_store(database_url) as store, harness(store, tmp_path / "data") as service:
        team, other_team = await service.team("ops"), await service.team("other")
        admin, stranger = await service.operator(team), await service.operator(other_team)
        for hostname in ("web-1", "db-1"):
            key = await service.registration_key(admin)
            agent = SigningIdentity.generate()
            assert (await service.register(agent, key["key"], hostname=hostname)).is_success
        created = await service.call(
            admin, "POST", "/v1/api-keys", {"name": "ci", "scopes": ["agents:read"]}
        )
        api_key = {"Authorization": f"Bearer {created.json()['key']}"}
        by_token = await service.call(admin, "GET", "/v1/agents")
        by_api_key = await service.http.get("/v1/agents", headers=api_key)
        assert by_token.status_code == by_api_key.status_code == 200
        assert by_token.json() == by_api_key.json()
        assert [agent["hostname"] for agent in by_token.json()["agents"]] == ["db-1", "web-1"]
        elsewhere = await service.call(stranger, "GET", "/v1/agents")
        assert elsewhere.status_code == 200 and elsewhere.json()["agents"] == []
