"""Bad input on every endpoint: oversized and malformed bodies get a JSON 4xx, never a 500.

Each case runs against every route in the service's OpenAPI document, with and without valid
credentials (so bodies reach validation), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from protocol.request_proof import PROOF_HEADER
from rendezvous.store import Store
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness, harness

pytestmark = pytest.mark.anyio

MALFORMED_BODIES = [
    b"{",
    b"not json at all",
    b"[]",
    b'"a string"',
    b"null",
    b"1e999999",
    b"[" * 5000 + b"]" * 5000,
    b'{"a":' * 3000 + b"1" + b"}" * 3000,
    b"\xff\xfe\x00garbage",
    b'{"payload": {"ts": 1e400, "nonce": []}, "signature": 7}',
    b'{"payload": "x", "signature": "y"}',
    b'{"payload": {}, "signature": "' + b"A" * 60000 + b'"}',
    b'{"tags": "web", "ttl_seconds": -1}',
    b'{"tags": [' + b'"a",' * 5000 + b'"a"]}',
    b'{"key_thumbprint": null}',
    b'{"jti": {"$ne": null}}',
    b'{"name": "", "scopes": []}',
]


@pytest.fixture
async def service(store: Store, tmp_path: Path) -> AsyncIterator[ServiceHarness]:
    async with harness(store, tmp_path / "data") as running:
        yield running


async def _routes(service: ServiceHarness) -> list[tuple[str, str]]:
    document = (await service.http.get("/v1/openapi.json")).json()
    routes = []
    for path, operations in document["paths"].items():
        concrete = path.replace("{key_id}", "rk_x").replace("{api_key_id}", "ak_x")
        concrete = concrete.replace("{operator_id}", "op_x")
        for method in operations:
            routes.append((method.upper(), concrete))
    assert len(routes) >= 14
    return routes


def _assert_clean_refusal(response, method: str, path: str) -> None:
    assert response.status_code < 500, (method, path, response.status_code, response.text)
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error", "message"}, (method, path, body)
        assert "Traceback" not in body["message"]


def _headers(service: ServiceHarness, admin: OperatorSession | None, method: str, path: str,
             body: bytes) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if admin is not None:
        headers["Authorization"] = f"Bearer {admin.token}"
        headers[PROOF_HEADER] = service.proof(admin.identity, method, path, body, admin.token)
    return headers


async def test_oversized_bodies_are_refused_with_413_on_every_endpoint(
    service: ServiceHarness,
) -> None:
    admin = await service.operator(await service.team("ops"))
    oversized = b'{"x": "' + b"a" * (service.config.max_body_bytes + 1) + b'"}'
    for method, path in await _routes(service):
        if method == "GET":
            continue
        for who in (None, admin):
            headers = _headers(service, who, method, path, oversized)
            response = await service.http.request(method, path, content=oversized, headers=headers)
            assert response.status_code == 413, (method, path)
            assert response.json()["error"] == "payload_too_large"


async def test_chunked_body_over_the_cap_is_refused_with_413(service: ServiceHarness) -> None:
    size = service.config.max_body_bytes

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(4):
            yield b"a" * (size // 2)

    response = await service.http.post(
        "/v1/agents/register", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413


async def test_malformed_content_length_is_refused_with_400(service: ServiceHarness) -> None:
    response = await service.http.post(
        "/v1/auth/challenge", content=b"{}", headers={"Content-Length": "12abc"}
    )
    assert response.status_code == 400


async def test_malformed_bodies_never_cause_a_server_error_on_any_endpoint(
    service: ServiceHarness,
) -> None:
    admin = await service.operator(await service.team("ops"))
    for method, path in await _routes(service):
        for body in MALFORMED_BODIES:
            for who in (None, admin):
                headers = _headers(service, who, method, path, body)
                response = await service.http.request(method, path, content=body, headers=headers)
                _assert_clean_refusal(response, method, path)
    metrics = (await service.http.get("/metrics")).text
    assert 'status="500"' not in metrics


async def test_malformed_authorization_headers_are_refused_cleanly(
    service: ServiceHarness,
) -> None:
    for value in ["", "Bearer", "Bearer ", "Basic abc", "Bearer a.b", "Bearer " + "x" * 9000,
                  "Bearer sk_live_", "Bearer sk_live_" + "a" * 200, "Bearer ...."]:
        response = await service.http.get("/v1/agents", headers={"Authorization": value})
        assert response.status_code == 401, value
        _assert_clean_refusal(response, "GET", "/v1/agents")


async def test_malformed_proofs_are_refused_cleanly(service: ServiceHarness) -> None:
    admin = await service.operator(await service.team("ops"))
    body = json.dumps({"tags": []}).encode()
    for proof in ["", ".", "a.b", "x" * 5000, "e30.e30", "AAAA.AAAA", "..."]:
        response = await service.http.post(
            "/v1/registration-keys",
            content=body,
            headers={
                "Authorization": f"Bearer {admin.token}",
                PROOF_HEADER: proof,
                "Content-Type": "application/json",
            },
        )
        assert response.status_code == 401, proof
        _assert_clean_refusal(response, "POST", "/v1/registration-keys")


async def test_unknown_routes_and_methods_answer_json_errors(service: ServiceHarness) -> None:
    missing = await service.http.get("/v1/nothing-here")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"
    wrong_method = await service.http.put("/v1/agents")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"] == "method_not_allowed"


async def test_openapi_document_is_served_under_v1(service: ServiceHarness) -> None:
    document = (await service.http.get("/v1/openapi.json")).json()
    assert "/v1/agents/register" in document["paths"]
    assert "/v1/auth/login" in document["paths"]
