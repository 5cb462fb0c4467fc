"""Operator enrollment, login, access tokens and request proofs, on SQLite and PostgreSQL.

Each forged-token and forged-proof case from the issue is its own test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from protocol.identity import SigningIdentity, b64url
from protocol.tokens import ACCESS_TOKEN_TYPE, SESSION_GRANT_TYPE, issue_token
from rendezvous.audit_trail import SERVICE_LOG
from rendezvous.store import Store
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness, harness

pytestmark = pytest.mark.anyio


@pytest.fixture
async def service(store: Store, tmp_path: Path) -> AsyncIterator[ServiceHarness]:
    async with harness(store, tmp_path / "data") as running:
        yield running


def _claims(service: ServiceHarness, operator: OperatorSession, **changes: Any) -> dict[str, Any]:
    claims = {
        "team_id": operator.team_id,
        "email": "x@example.test",
        "role": operator.role,
        "jti": b64url(b"forged-token-id-1"),
        "iat_ms": int(service.clock.now * 1000),
        "cnf": {"jkt": operator.identity.public.key_id},
    }
    claims.update(changes)
    return claims


def _forge(
    service: ServiceHarness,
    operator: OperatorSession,
    *,
    signer: SigningIdentity | None = None,
    typ: str = ACCESS_TOKEN_TYPE,
    issuer: str | None = None,
    audience: str | None = None,
    issued_at: float | None = None,
    lifetime: int = 600,
    not_before: int | None = None,
    **claims: Any,
) -> str:
    return issue_token(
        signer or service.ctx.keys.jwt_issuer,
        typ=typ,
        issuer=issuer or service.config.issuer,
        audience=audience or service.config.audience,
        subject=operator.operator_id,
        issued_at=int(service.clock.now if issued_at is None else issued_at),
        lifetime_seconds=lifetime,
        claims=_claims(service, operator, **claims),
        not_before=not_before,
    )


def _segment(value: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


async def _whoami(service: ServiceHarness, operator: OperatorSession, token: str) -> int:
    """whoami with ``token`` and a valid proof by ``operator``'s key: only the token decides."""
    response = await service.call(operator, "GET", "/v1/auth/whoami", token=token)
    if response.status_code >= 400:
        assert set(response.json()) == {"error", "message"}
    return response.status_code


# ---- enrollment and login ---------------------------------------------------------------


async def test_operator_enrolls_with_invite_and_logs_in_by_signed_challenge(
    service: ServiceHarness,
) -> None:
    team = await service.team("ops")
    operator = await service.operator(team, "operator")
    response = await service.call(operator, "GET", "/v1/auth/whoami")
    assert response.status_code == 200
    assert response.json()["team_id"] == team
    assert response.json()["role"] == "operator"
    actions = await service.audit_actions(team)
    assert actions == ["operator.invite_used", "operator.login_succeeded"]


async def test_access_token_carries_the_documented_claims_and_lives_at_most_15_minutes(
    service: ServiceHarness,
) -> None:
    team = await service.team("ops")
    operator = await service.operator(team)
    payload = json.loads(base64.urlsafe_b64decode(operator.token.split(".")[1] + "=="))
    header = json.loads(base64.urlsafe_b64decode(operator.token.split(".")[0] + "=="))
    for claim in ("iss", "aud", "sub", "team_id", "email", "role", "iat", "exp", "jti"):
        assert claim in payload
    assert payload["cnf"]["jkt"] == operator.identity.public.key_id
    assert payload["exp"] - payload["iat"] <= 15 * 60
    assert header["alg"] == "EdDSA"
    assert header["kid"] == service.ctx.keys.jwt_issuer.public.key_id


async def test_reused_invite_is_refused(service: ServiceHarness) -> None:
    team = await service.team("ops")
    code = await service.invite(team, "operator")
    first = await service.http.post(
        "/v1/operators/enroll", json=service.enrollment(SigningIdentity.generate(), code)
    )
    second = await service.http.post(
        "/v1/operators/enroll", json=service.enrollment(SigningIdentity.generate(), code)
    )
    assert first.status_code == 200
    assert second.status_code == 401
    assert "used" in second.json()["message"]


async def test_expired_invite_is_refused(service: ServiceHarness) -> None:
    team = await service.team("ops")
    code = await service.invite(team, "operator")
    service.clock.now += 2 * 3600
    response = await service.http.post(
        "/v1/operators/enroll", json=service.enrollment(SigningIdentity.generate(), code)
    )
    assert response.status_code == 401
    assert "expired" in response.json()["message"]


async def test_enrollment_signed_by_another_key_than_the_one_enrolled_is_refused(
    service: ServiceHarness,
) -> None:
    team = await service.team("ops")
    code = await service.invite(team, "operator")
    victim, attacker = SigningIdentity.generate(), SigningIdentity.generate()
    envelope = service.enrollment(attacker, code)
    envelope["payload"]["public_key"] = b64url(victim.public.raw)
    response = await service.http.post("/v1/operators/enroll", json=envelope)
    assert response.status_code == 401
    # The invite was not spent by the failed attempt.
    good = await service.http.post(
        "/v1/operators/enroll", json=service.enrollment(victim, code)
    )
    assert good.status_code == 200


async def test_login_answer_replayed_is_refused(service: ServiceHarness) -> None:
    team = await service.team("ops")
    operator = await service.operator(team)
    envelope = await service.login_envelope(operator.identity)
    assert (await service.http.post("/v1/auth/login", json=envelope)).status_code == 200
    replay = await service.http.post("/v1/auth/login", json=envelope)
    assert replay.status_code == 401
    assert "operator.login_failed" in await service.audit_actions(team)


async def test_login_signed_by_another_key_is_refused_and_audited(
    service: ServiceHarness,
) -> None:
    team = await service.team("ops")
    operator = await service.operator(team)
    envelope = await service.login_envelope(SigningIdentity.generate())
    envelope["payload"]["key_thumbprint"] = operator.identity.public.key_id
    response = await service.http.post("/v1/auth/login", json=envelope)
    assert response.status_code == 401
    assert (await service.audit_actions(team))[-1] == "operator.login_failed"


async def test_login_with_unenrolled_key_is_refused_and_audited_in_the_service_log(
    service: ServiceHarness,
) -> None:
    envelope = await service.login_envelope(SigningIdentity.generate())
    response = await service.http.post("/v1/auth/login", json=envelope)
    assert response.status_code == 401
    assert await service.audit_actions(SERVICE_LOG) == ["operator.login_failed"]


# ---- forged and stale access tokens -----------------------------------------------------


async def test_token_with_alg_none_is_refused(service: ServiceHarness) -> None:
    operator = await service.operator(await service.team("ops"))
    genuine = json.loads(base64.urlsafe_b64decode(operator.token.split(".")[1] + "=="))
    kid = service.ctx.keys.jwt_issuer.public.key_id
    header = {"alg": "none", "typ": ACCESS_TOKEN_TYPE, "kid": kid}
    token = f"{_segment(header)}.{_segment(genuine)}."
    assert await _whoami(service, operator, token) == 401


async def test_token_signed_hs256_with_the_public_key_as_secret_is_refused(
    service: ServiceHarness,
) -> None:
    operator = await service.operator(await service.team("ops"))
    genuine = json.loads(base64.urlsafe_b64decode(operator.token.split(".")[1] + "=="))
    public = service.ctx.keys.jwt_issuer.public
    header = {"alg": "HS256", "typ": ACCESS_TOKEN_TYPE, "kid": public.key_id}
    signing_input = f"{_segment(header)}.{_segment(genuine)}"
    for secret in (public.raw, public.to_pem()):
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        token = signing_input + "." + b64url(mac)
        assert await _whoami(service, operator, token) == 401


async def test_expired_token_is_refused(service: ServiceHarness) -> None:
    operator = await service.operator(await service.team("ops"))
    assert await _whoami(service, operator, operator.token) == 200
    service.clock.now += 16 * 60
    assert await _whoami(service, operator, operator.token) == 401


async def test_token_issued_in_the_future_is_refused(service: ServiceHarness) -> None:
    operator = await service.operator(await service.team("ops"))
    token = _forge(service, operator, issued_at=service.clock.now + 3600)
    assert await _whoami(service, operator, token) == 401


async def test_token_not_valid_before_a_future_time_is_refused(service: ServiceHarness) -> None:
    operator = await service.operator(await service.team("ops"))
    token = _forge(service, operator, not_before=int(service.clock.now) + 3600)
    assert await _whoami(service, operator, token) == 401


async def test_token_for_another_audience_is_refused(service: ServiceHarness) -> None:
    operator = await service.operator(await service.team("ops"))
    assert await _whoami(service, operator, _forge(service, operator)) == 200
    forged = _forge(service, operator, audience="another-service")
    assert await _whoami(service, operator, forged) == 401


async def test_token_from_another_issuer_is_refused(service: ServiceHarness) -> None:
    operator = await service.operator(await service.team("ops"))
    assert await _whoami(service, operator, _forge(service, operator, issuer="someone-else")) == 401


async def test_token_of_another_type_is_refused(service: ServiceHarness) -> None:
    operator = await service.operator(await service.team("ops"))
    forged = _forge(service, operator, typ=SESSION_GRANT_TYPE)
    assert await _whoami(service, operator, forged) == 401


async def test_token_signed_by_an_unknown_key_id_is_refused(service: ServiceHarness) -> None:
    operator = await service.operator(await service.team("ops"))
    token = _forge(service, operator, signer=SigningIdentity.generate())
    assert await _whoami(service, operator, token) == 401


async def test_token_signed_by_another_service_key_is_refused(service: ServiceHarness) -> None:
    operator = await service.operator(await service.team("ops"))
    token = _forge(service, operator, signer=service.ctx.keys.relay_token)
    assert await _whoami(service, operator, token) == 401


async def test_token_with_a_forged_team_id_claim_but_no_valid_signature_is_refused(
    service: ServiceHarness,
) -> None:
    team_a, team_b = await service.team("a"), await service.team("b")
    operator = await service.operator(team_a)
    header, payload, signature = operator.token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims["team_id"] = team_b
    assert await _whoami(service, operator, f"{header}.{_segment(claims)}.{signature}") == 401


async def test_revoked_token_is_refused_by_jti(service: ServiceHarness) -> None:
    team = await service.team("ops")
    admin = await service.operator(team)
    victim = await service.operator(team, "operator")
    claims = json.loads(base64.urlsafe_b64decode(victim.token.split(".")[1] + "=="))
    response = await service.call(
        admin, "POST", "/v1/tokens/revoke", {"jti": claims["jti"], "expires_at": claims["exp"]}
    )
    assert response.status_code == 204
    assert await _whoami(service, victim, victim.token) == 401
    assert await _whoami(service, admin, admin.token) == 200
    assert "operator.token_revoked" in await service.audit_actions(team)


async def test_admin_cannot_revoke_a_token_of_another_team(service: ServiceHarness) -> None:
    admin_a = await service.operator(await service.team("a"))
    victim_b = await service.operator(await service.team("b"), "operator")
    claims = json.loads(base64.urlsafe_b64decode(victim_b.token.split(".")[1] + "=="))
    response = await service.call(
        admin_a, "POST", "/v1/tokens/revoke", {"jti": claims["jti"], "expires_at": claims["exp"]}
    )
    assert response.status_code == 204  # a jti is not secret to its own team: nothing to learn
    assert await _whoami(service, victim_b, victim_b.token) == 200


async def test_logout_revokes_the_token_it_carries(service: ServiceHarness) -> None:
    operator = await service.operator(await service.team("ops"), "operator")
    assert (await service.call(operator, "POST", "/v1/auth/logout")).status_code == 204
    assert await _whoami(service, operator, operator.token) == 401


async def test_disabled_operator_loses_all_tokens_and_cannot_log_in(
    service: ServiceHarness,
) -> None:
    team = await service.team("ops")
    admin = await service.operator(team)
    victim = await service.operator(team, "operator")
    response = await service.call(admin, "POST", f"/v1/operators/{victim.operator_id}/disable")
    assert response.status_code == 200
    assert await _whoami(service, victim, victim.token) == 401
    login = await service.http.post(
        "/v1/auth/login", json=await service.login_envelope(victim.identity)
    )
    assert login.status_code == 401
    assert "operator.revoked" in await service.audit_actions(team)


async def test_admin_cannot_disable_an_operator_of_another_team(service: ServiceHarness) -> None:
    admin_a = await service.operator(await service.team("a"))
    victim_b = await service.operator(await service.team("b"), "operator")
    response = await service.call(admin_a, "POST", f"/v1/operators/{victim_b.operator_id}/disable")
    assert response.status_code == 404
    assert await _whoami(service, victim_b, victim_b.token) == 200


# ---- request proofs ---------------------------------------------------------------------


async def test_state_changing_request_without_proof_is_refused(service: ServiceHarness) -> None:
    admin = await service.operator(await service.team("ops"))
    response = await service.call(
        admin, "POST", "/v1/registration-keys", {"tags": []}, with_proof=False
    )
    assert response.status_code == 401
    assert "TucDesk-Proof" in response.json()["message"]


async def test_replayed_proof_is_refused(service: ServiceHarness) -> None:
    admin = await service.operator(await service.team("ops"))
    body = {"tags": ["web"]}
    content = json.dumps(body).encode()
    proof = service.proof(admin.identity, "POST", "/v1/registration-keys", content, admin.token)
    first = await service.call(admin, "POST", "/v1/registration-keys", body, proof=proof)
    second = await service.call(admin, "POST", "/v1/registration-keys", body, proof=proof)
    assert first.status_code == 201
    assert second.status_code == 401
    assert "already used" in second.json()["message"]


async def test_proof_signed_by_another_key_is_refused(service: ServiceHarness) -> None:
    admin = await service.operator(await service.team("ops"))
    response = await service.call(
        admin, "POST", "/v1/registration-keys", {"tags": []}, signer=SigningIdentity.generate()
    )
    assert response.status_code == 401
    assert "not bound" in response.json()["message"]


async def test_proof_for_another_body_is_refused(service: ServiceHarness) -> None:
    admin = await service.operator(await service.team("ops"))
    other = json.dumps({"tags": ["other"]}).encode()
    proof = service.proof(admin.identity, "POST", "/v1/registration-keys", other, admin.token)
    response = await service.call(
        admin, "POST", "/v1/registration-keys", {"tags": ["web"]}, proof=proof
    )
    assert response.status_code == 401


async def test_proof_for_another_url_is_refused(service: ServiceHarness) -> None:
    admin = await service.operator(await service.team("ops"))
    content = json.dumps({"tags": []}).encode()
    proof = service.proof(admin.identity, "POST", "/v1/api-keys", content, admin.token)
    response = await service.call(admin, "POST", "/v1/registration-keys", {"tags": []}, proof=proof)
    assert response.status_code == 401


async def test_proof_bound_to_another_access_token_is_refused(service: ServiceHarness) -> None:
    team = await service.team("ops")
    admin = await service.operator(team)
    second_token = (await service.login(admin.identity))["access_token"]
    content = json.dumps({"tags": []}).encode()
    proof = service.proof(admin.identity, "POST", "/v1/registration-keys", content, second_token)
    response = await service.call(admin, "POST", "/v1/registration-keys", {"tags": []}, proof=proof)
    assert response.status_code == 401


async def test_proof_outside_the_clock_skew_window_is_refused(service: ServiceHarness) -> None:
    admin = await service.operator(await service.team("ops"))
    content = json.dumps({"tags": []}).encode()
    proof = service.proof(admin.identity, "POST", "/v1/registration-keys", content, admin.token)
    service.clock.now += service.config.clock_skew_seconds + 5
    response = await service.call(admin, "POST", "/v1/registration-keys", {"tags": []}, proof=proof)
    assert response.status_code == 401


async def test_stolen_token_without_the_operator_key_cannot_change_state(
    service: ServiceHarness,
) -> None:
    admin = await service.operator(await service.team("ops"))
    thief = SigningIdentity.generate()
    response = await service.call(
        admin, "POST", "/v1/registration-keys", {"tags": []}, signer=thief
    )
    assert response.status_code == 401
    assert (await service.call(admin, "GET", "/v1/registration-keys")).json() == []


@pytest.mark.parametrize(
    "path",
    ["/v1/sessions", "/v1/audit/export", "/v1/policy", "/v1/approvals", "/v1/registration-keys",
     "/v1/api-keys", "/v1/auth/whoami"],
)
async def test_stolen_token_without_the_operator_key_cannot_read(
    service: ServiceHarness, path: str
) -> None:
    admin = await service.operator(await service.team("ops"))
    bare = await service.http.get(path, headers={"Authorization": f"Bearer {admin.token}"})
    assert bare.status_code == 401
    assert "needs a" in bare.json()["message"]  # the proof header, named
    thief = SigningIdentity.generate()
    assert (await service.call(admin, "GET", path, signer=thief)).status_code == 401
    assert (await service.call(admin, "GET", path)).status_code in {200, 404}


async def test_agent_directory_is_readable_with_the_token_alone(service: ServiceHarness) -> None:
    admin = await service.operator(await service.team("ops"))
    response = await service.http.get(
        "/v1/agents", headers={"Authorization": f"Bearer {admin.token}"}
    )
    assert response.status_code == 200


# ---- roles and API keys -----------------------------------------------------------------


async def test_operator_role_cannot_create_registration_keys(service: ServiceHarness) -> None:
    operator = await service.operator(await service.team("ops"), "operator")
    response = await service.call(operator, "POST", "/v1/registration-keys", {"tags": []})
    assert response.status_code == 403


async def test_operator_role_cannot_export_the_audit_log(service: ServiceHarness) -> None:
    operator = await service.operator(await service.team("ops"), "operator")
    response = await service.call(operator, "GET", "/v1/audit/export")
    assert response.status_code == 403


async def test_api_key_is_scoped_hashed_and_revoked_instantly(service: ServiceHarness) -> None:
    team = await service.team("ops")
    admin = await service.operator(team)
    created = await service.call(
        admin, "POST", "/v1/api-keys", {"name": "ci", "scopes": ["agents:read"]}
    )
    assert created.status_code == 201
    secret = created.json()["key"]
    assert secret.startswith("sk_live_")
    bearer = {"Authorization": f"Bearer {secret}"}
    assert (await service.http.get("/v1/agents", headers=bearer)).status_code == 200
    assert (await service.http.get("/v1/registration-keys", headers=bearer)).status_code == 403
    listed = await service.call(admin, "GET", "/v1/api-keys")
    assert secret not in listed.text
    revoked = await service.call(admin, "DELETE", f"/v1/api-keys/{created.json()['id']}")
    assert revoked.status_code == 200
    assert (await service.http.get("/v1/agents", headers=bearer)).status_code == 401
    actions = await service.audit_actions(team)
    assert "api_key.created" in actions and "api_key.revoked" in actions


async def test_api_key_with_an_unknown_scope_is_refused(service: ServiceHarness) -> None:
    admin = await service.operator(await service.team("ops"))
    response = await service.call(
        admin, "POST", "/v1/api-keys", {"name": "ci", "scopes": ["everything"]}
    )
    assert response.status_code == 400


async def test_auth_failures_are_counted_by_reason(service: ServiceHarness) -> None:
    await _whoami(service, await service.operator(await service.team("ops")), "not-a-token")
    metrics = (await service.http.get("/metrics")).text
    assert 'tucdesk_auth_failures_total{reason="invalid_token"}' in metrics
