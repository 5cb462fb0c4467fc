"""Agent registration and the agent list, on SQLite and PostgreSQL.

Each refused-registration case from the issue is its own test, and each checks that the refusal
is audited and that the registration key was not spent by it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from protocol.domains import Purpose
from protocol.identity import SigningIdentity, b64url
from protocol.signed_payload import create_signed_payload
from rendezvous.audit_trail import SERVICE_LOG
from rendezvous.store import Store
from tests.rendezvous.service_harness import ServiceHarness, harness

pytestmark = pytest.mark.anyio


@pytest.fixture
async def service(store: Store, tmp_path: Path) -> AsyncIterator[ServiceHarness]:
    async with harness(store, tmp_path / "data") as running:
        yield running


async def _admin_and_key(service: ServiceHarness, tags: list[str] | None = None):
    team = await service.team("ops")
    admin = await service.operator(team)
    key = await service.registration_key(admin, tags=tags)
    return team, admin, key


async def _assert_refused(service: ServiceHarness, response, status: int = 401) -> None:
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error", "message"}
    assert (await service.audit_actions(SERVICE_LOG))[-1] == "agent.registration_refused"


async def test_agent_registers_with_a_signed_payload_and_gets_pinnable_service_keys(
    service: ServiceHarness,
) -> None:
    team, admin, key = await _admin_and_key(service, ["web", "prod"])
    agent = SigningIdentity.generate()
    response = await service.register(agent, key["key"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["agent_id"].startswith("agt_")
    assert body["team_id"] == team
    assert body["tags"] == ["web", "prod"]
    purposes = {jwk["purpose"] for jwk in body["service_keys"]["keys"]}
    assert purposes == {"jwt-issuer", "audit-signer", "relay-token", "policy-signer"}
    assert body["service_keys"] == (await service.http.get("/.well-known/jwks.json")).json()
    actions = await service.audit_actions(team)
    assert actions[-2:] == ["registration_key.used", "agent.registered"]


async def test_registered_agent_appears_in_its_team_list_with_fingerprint(
    service: ServiceHarness,
) -> None:
    _, admin, key = await _admin_and_key(service, ["web"])
    agent = SigningIdentity.generate()
    registered = (await service.register(agent, key["key"], hostname="db-7")).json()
    listing = (await service.call(admin, "GET", "/v1/agents")).json()["agents"]
    assert len(listing) == 1
    entry = listing[0]
    assert entry["id"] == registered["agent_id"]
    assert entry["name"] == "db-7"
    assert entry["tags"] == ["web"]
    assert entry["online"] is False
    assert entry["key_fingerprint"] == agent.public.fingerprint


async def test_team_a_token_never_sees_team_b_agents(service: ServiceHarness) -> None:
    team_a, team_b = await service.team("a"), await service.team("b")
    admin_a, admin_b = await service.operator(team_a), await service.operator(team_b)
    key_b = await service.registration_key(admin_b)
    assert (await service.register(SigningIdentity.generate(), key_b["key"])).status_code == 200
    listing = await service.call(admin_a, "GET", "/v1/agents")
    assert listing.json()["agents"] == []
    assert len((await service.call(admin_b, "GET", "/v1/agents")).json()["agents"]) == 1


async def test_team_id_forged_in_the_url_is_ignored(service: ServiceHarness) -> None:
    team_a, team_b = await service.team("a"), await service.team("b")
    admin_a, admin_b = await service.operator(team_a), await service.operator(team_b)
    key_b = await service.registration_key(admin_b)
    await service.register(SigningIdentity.generate(), key_b["key"])
    listing = await service.call(admin_a, "GET", f"/v1/agents?team_id={team_b}")
    assert listing.status_code == 200
    assert listing.json()["agents"] == []


async def test_team_id_forged_in_a_body_is_refused(service: ServiceHarness) -> None:
    team_a, team_b = await service.team("a"), await service.team("b")
    admin_a = await service.operator(team_a)
    response = await service.call(
        admin_a, "POST", "/v1/registration-keys", {"tags": [], "team_id": team_b}
    )
    assert response.status_code == 422
    admin_b = await service.operator(team_b)
    assert (await service.call(admin_b, "GET", "/v1/registration-keys")).json() == []


async def test_team_a_admin_cannot_revoke_team_b_registration_key(service: ServiceHarness) -> None:
    admin_a = await service.operator(await service.team("a"))
    admin_b = await service.operator(await service.team("b"))
    key_b = await service.registration_key(admin_b)
    response = await service.call(admin_a, "DELETE", f"/v1/registration-keys/{key_b['id']}")
    assert response.status_code == 404
    assert (await service.register(SigningIdentity.generate(), key_b["key"])).status_code == 200


async def test_replayed_registration_payload_is_refused(service: ServiceHarness) -> None:
    _, _, key = await _admin_and_key(service)
    payload = service.registration(SigningIdentity.generate(), key["key"])
    assert (await service.http.post("/v1/agents/register", json=payload)).status_code == 200
    replay = await service.http.post("/v1/agents/register", json=payload)
    await _assert_refused(service, replay)
    assert "already used" in replay.json()["message"]


async def test_registration_with_skewed_timestamp_is_refused(service: ServiceHarness) -> None:
    _, admin, key = await _admin_and_key(service)
    skew = service.config.clock_skew_seconds
    for offset in (-(skew + 30), skew + 30):
        payload = service.registration(
            SigningIdentity.generate(), key["key"], now=service.clock.now + offset
        )
        response = await service.http.post("/v1/agents/register", json=payload)
        await _assert_refused(service, response)
        assert "skew" in response.json()["message"]
    assert (await service.register(SigningIdentity.generate(), key["key"])).status_code == 200


async def test_registration_with_a_bad_signature_is_refused(service: ServiceHarness) -> None:
    _, _, key = await _admin_and_key(service)
    payload = service.registration(SigningIdentity.generate(), key["key"])
    payload["payload"]["hostname"] = "evil-host"
    await _assert_refused(service, await service.http.post("/v1/agents/register", json=payload))


async def test_public_key_swapped_under_the_signature_is_refused(
    service: ServiceHarness,
) -> None:
    _, _, key = await _admin_and_key(service)
    signer, victim = SigningIdentity.generate(), SigningIdentity.generate()
    payload = service.registration(signer, key["key"])
    payload["payload"]["public_key"] = b64url(victim.public.raw)
    await _assert_refused(service, await service.http.post("/v1/agents/register", json=payload))
    assert (await service.register(signer, key["key"])).status_code == 200


async def test_reused_registration_key_is_refused(service: ServiceHarness) -> None:
    _, _, key = await _admin_and_key(service)
    assert (await service.register(SigningIdentity.generate(), key["key"])).status_code == 200
    response = await service.register(SigningIdentity.generate(), key["key"])
    await _assert_refused(service, response)
    assert "used" in response.json()["message"]


async def test_expired_registration_key_is_refused(service: ServiceHarness) -> None:
    team = await service.team("ops")
    admin = await service.operator(team)
    key = await service.registration_key(admin, ttl=60)
    service.clock.now += 120
    response = await service.register(SigningIdentity.generate(), key["key"])
    await _assert_refused(service, response)
    assert "expired" in response.json()["message"]


async def test_revoked_registration_key_is_refused(service: ServiceHarness) -> None:
    team, admin, key = await _admin_and_key(service)
    revoked = await service.call(admin, "DELETE", f"/v1/registration-keys/{key['id']}")
    assert revoked.status_code == 200
    assert revoked.json()["status"] == "revoked"
    response = await service.register(SigningIdentity.generate(), key["key"])
    await _assert_refused(service, response)
    assert "revoked" in response.json()["message"]
    assert "registration_key.revoked" in await service.audit_actions(team)


async def test_other_team_registration_key_is_refused(service: ServiceHarness) -> None:
    team_a, team_b = await service.team("a"), await service.team("b")
    admin_b = await service.operator(team_b)
    key_b = await service.registration_key(admin_b)
    agent = SigningIdentity.generate()
    # The agent expects to join team A, but holds team B's key.
    forged = create_signed_payload(
        agent,
        Purpose.REGISTER,
        {
            "registration_key": key_b["key"],
            "public_key": b64url(agent.public.raw),
            "machine_fingerprint": "machine-1",
            "hostname": "web-1",
            "team_id": team_a,
        },
        service.clock.now,
    )
    response = await service.http.post("/v1/agents/register", json=forged)
    await _assert_refused(service, response)
    assert (await service.register(agent, key_b["key"])).status_code == 200


async def test_unknown_registration_key_is_refused(service: ServiceHarness) -> None:
    await _admin_and_key(service)
    response = await service.register(SigningIdentity.generate(), "rk_live_" + "a" * 52)
    await _assert_refused(service, response)


async def test_two_concurrent_registrations_with_one_key_let_exactly_one_through(
    service: ServiceHarness,
) -> None:
    _, _, key = await _admin_and_key(service)
    statuses: list[int] = []

    async def attempt() -> None:
        response = await service.register(SigningIdentity.generate(), key["key"])
        statuses.append(response.status_code)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(attempt)
    assert sorted(statuses) == [200, 401, 401, 401, 401]


async def test_registrations_are_counted_in_metrics(service: ServiceHarness) -> None:
    _, _, key = await _admin_and_key(service)
    await service.register(SigningIdentity.generate(), key["key"])
    await service.register(SigningIdentity.generate(), key["key"])
    metrics = (await service.http.get("/metrics")).text
    assert 'tucdesk_agent_registrations_total{outcome="ok"} 1.0' in metrics
    assert 'tucdesk_agent_registrations_total{outcome="key_used"} 1.0' in metrics


async def test_registration_key_is_shown_once_and_stored_only_hashed(
    service: ServiceHarness,
) -> None:
    _, admin, key = await _admin_and_key(service)
    assert key["key"].startswith("rk_live_")
    listed = await service.call(admin, "GET", "/v1/registration-keys")
    assert key["key"] not in listed.text
    assert json.loads(listed.text)[0]["id"] == key["id"]
