"""``GET /v1/agents`` is answered in front of FastAPI (``rendezvous.agent_list_endpoint``): every
answer, refusals included, must be the one the FastAPI route gives, on SQLite and PostgreSQL.

Each request is sent twice: to the service's app, and to the FastAPI application inside it
(the route the endpoint stands in for), and the two answers are compared byte for byte.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from protocol.identity import SigningIdentity
from rendezvous.dependencies import current_principal_reading_agents
from rendezvous.errors import ServiceUnavailable
from rendezvous.store import Store
from tests.rendezvous.service_harness import BASE_URL, ServiceHarness, harness

pytestmark = pytest.mark.anyio


@pytest.fixture
async def service(store: Store, tmp_path: Path) -> AsyncIterator[ServiceHarness]:
    async with harness(store, tmp_path / "data") as running:
        yield running


@pytest.fixture
async def fastapi_only(service: ServiceHarness) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the FastAPI application inside the service's ASGI layers."""
    layer = service.app
    while not isinstance(layer, FastAPI):
        layer = layer.app
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=layer), base_url=BASE_URL
    ) as client:
        yield client


async def _same_answer(
    service: ServiceHarness,
    fastapi_only: httpx.AsyncClient,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    endpoint = await service.http.request(method, path, headers=headers)
    route = await fastapi_only.request(method, path, headers=headers)
    assert (endpoint.status_code, endpoint.headers.raw, endpoint.content) == (
        route.status_code,
        route.headers.raw,
        route.content,
    )
    return endpoint


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _team_with_agents(service: ServiceHarness, count: int = 3):
    team = await service.team("ops")
    admin = await service.operator(team)
    for index in range(count):
        key = await service.registration_key(admin, tags=["web", f"n{index}"])
        agent = SigningIdentity.generate()
        response = await service.register(
            agent, key["key"], hostname=f"web-{index}", machine=f"m-{index}"
        )
        assert response.status_code == 200, response.text
    return team, admin


async def test_agent_list_is_the_fastapi_routes_answer_byte_for_byte(
    service: ServiceHarness, fastapi_only: httpx.AsyncClient
) -> None:
    team, admin = await _team_with_agents(service)
    auditor = await service.operator(team, role="auditor")
    answer = await _same_answer(service, fastapi_only, "GET", "/v1/agents", _bearer(admin.token))
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert [agent["hostname"] for agent in body["agents"]] == ["web-0", "web-1", "web-2"]
    assert body["agents"][0]["last_seen_at"] is None  # nulls are written, not left out
    await _same_answer(service, fastapi_only, "GET", "/v1/agents", _bearer(auditor.token))
    await _same_answer(service, fastapi_only, "GET", "/v1/agents?team_id=x", _bearer(admin.token))


async def test_agent_list_refusals_are_the_fastapi_routes_refusals(
    service: ServiceHarness, fastapi_only: httpx.AsyncClient
) -> None:
    _, admin = await _team_with_agents(service, count=1)
    audit_only = await service.call(
        admin, "POST", "/v1/api-keys", {"name": "ci", "scopes": ["audit:read"]}
    )
    assert audit_only.status_code == 201, audit_only.text
    refusals = [
        (None, 401),
        ({"Authorization": "Basic abc"}, 401),
        (_bearer("not-a-token"), 401),
        (_bearer(admin.token[:-4] + "AAAA"), 401),
        (_bearer("sk_live_" + "A" * 43), 401),
        (_bearer(audit_only.json()["key"]), 403),
    ]
    for headers, status in refusals:
        answer = await _same_answer(service, fastapi_only, "GET", "/v1/agents", headers)
        assert answer.status_code == status, (headers, answer.text)
        assert set(answer.json()) == {"error", "message"}
    unauthorized = await service.http.get("/v1/agents")
    assert unauthorized.headers["www-authenticate"] == "Bearer"


async def test_revoked_token_is_refused_by_the_agent_list_at_once(
    service: ServiceHarness, fastapi_only: httpx.AsyncClient
) -> None:
    _, admin = await _team_with_agents(service, count=1)
    assert (await service.http.get("/v1/agents", headers=_bearer(admin.token))).status_code == 200
    logout = await service.call(admin, "POST", "/v1/auth/logout")
    assert logout.status_code in {200, 204}, logout.text
    answer = await _same_answer(service, fastapi_only, "GET", "/v1/agents", _bearer(admin.token))
    assert answer.status_code == 401


async def test_other_methods_and_paths_near_the_agent_list_still_go_to_fastapi(
    service: ServiceHarness, fastapi_only: httpx.AsyncClient
) -> None:
    _, admin = await _team_with_agents(service, count=1)
    for method, path in (
        ("HEAD", "/v1/agents"),
        ("PUT", "/v1/agents"),
        ("GET", "/v1/agents/"),
        ("GET", "/v1/agents/connect"),
        ("GET", "/agents"),
    ):
        endpoint = await service.http.request(method, path, headers=_bearer(admin.token))
        route = await fastapi_only.request(method, path, headers=_bearer(admin.token))
        assert (endpoint.status_code, endpoint.content) == (route.status_code, route.content)
        assert endpoint.status_code != 200, (method, path)


async def test_agent_list_does_not_go_through_fastapis_routing_and_dependencies(
    service: ServiceHarness, fastapi_only: httpx.AsyncClient
) -> None:
    _, admin = await _team_with_agents(service, count=1)
    layer = service.app
    while not isinstance(layer, FastAPI):
        layer = layer.app

    async def unavailable() -> None:
        raise ServiceUnavailable("the FastAPI route was used")

    layer.dependency_overrides[current_principal_reading_agents] = unavailable
    assert (await fastapi_only.get("/v1/agents", headers=_bearer(admin.token))).status_code == 503
    answer = await service.http.get("/v1/agents", headers=_bearer(admin.token))
    assert answer.status_code == 200, answer.text


async def test_database_failure_during_the_agent_list_is_a_bare_503(
    service: ServiceHarness, fastapi_only: httpx.AsyncClient
) -> None:
    _, admin = await _team_with_agents(service, count=1)
    async with service.store._autocommit() as session:  # a real failure, not a stand-in
        await session.execute("ALTER TABLE agents RENAME TO agents_gone")
    answer = await _same_answer(service, fastapi_only, "GET", "/v1/agents", _bearer(admin.token))
    assert answer.status_code == 503
    assert answer.json() == {
        "error": "unavailable",
        "message": "the service's database is unavailable; retry later",
    }


async def test_agent_list_requests_are_counted_under_their_route(service: ServiceHarness) -> None:
    _, admin = await _team_with_agents(service, count=1)
    assert (await service.http.get("/v1/agents", headers=_bearer(admin.token))).status_code == 200
    assert (await service.http.get("/v1/agents", headers=_bearer("not-a-token"))).status_code == 401
    exposition = (await service.http.get("/metrics")).text
    assert 'tucdesk_http_requests_total{method="GET",route="/agents",status="200"} 1.0' in (
        exposition
    )
    assert 'tucdesk_http_requests_total{method="GET",route="/agents",status="401"} 1.0' in (
        exposition
    )
    assert 'tucdesk_auth_failures_total{reason="invalid_token"} 1.0' in exposition


# ---- pages and filters ----------------------------------------------------------------------


async def _pages(
    service: ServiceHarness, fastapi_only: httpx.AsyncClient, token: str, query: str
) -> list[dict]:
    """Every page of the list for ``query`` (both paths must agree on each), followed by cursor."""
    agents: list[dict] = []
    after = ""
    for _ in range(50):
        answer = await _same_answer(
            service, fastapi_only, "GET", f"/v1/agents?{query}{after}", _bearer(token)
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        agents += body["agents"]
        if body["next_after"] is None:
            return agents
        after = f"&after={body['next_after']}"
    raise AssertionError("the list did not end")


async def test_pages_cover_every_agent_once_in_order_on_both_paths(
    service: ServiceHarness, fastapi_only: httpx.AsyncClient
) -> None:
    _, admin = await _team_with_agents(service, count=5)
    whole = await _same_answer(service, fastapi_only, "GET", "/v1/agents", _bearer(admin.token))
    assert whole.json()["next_after"] is None
    everyone = whole.json()["agents"]
    assert [agent["name"] for agent in everyone] == [f"web-{index}" for index in range(5)]
    for limit in (1, 2, 4, 5, 1000):
        assert await _pages(service, fastapi_only, admin.token, f"limit={limit}") == everyone
    first = (await service.http.get("/v1/agents?limit=2", headers=_bearer(admin.token))).json()
    assert [agent["name"] for agent in first["agents"]] == ["web-0", "web-1"]
    assert isinstance(first["next_after"], str) and "web" not in first["next_after"]  # opaque


async def test_filters_by_tag_online_state_and_name_prefix_on_both_paths(
    service: ServiceHarness, fastapi_only: httpx.AsyncClient
) -> None:
    _, admin = await _team_with_agents(service, count=4)  # tags web and n0..n3

    async def names(query: str) -> list[str]:
        return [agent["name"] for agent in await _pages(service, fastapi_only, admin.token,
                                                         f"limit=1&{query}")]

    assert await names("tag=web") == ["web-0", "web-1", "web-2", "web-3"]
    assert await names("tag=web&tag=n2") == ["web-2"]
    assert await names("tag=n1&tag=n2") == []
    assert await names("online=false") == ["web-0", "web-1", "web-2", "web-3"]
    assert await names("online=true") == []
    assert await names("name=web-3") == ["web-3"]
    assert await names("name=web-&tag=n0&online=false") == ["web-0"]
    assert await names("name=db") == []


@pytest.mark.parametrize(
    ("query", "status", "field"),
    [
        ("limit=0", 422, "limit"),
        ("limit=1001", 422, "limit"),
        ("limit=ten", 422, "limit"),
        ("limit=%2B5", 422, "limit"),
        ("limit=", 422, "limit"),
        ("limit=1&limit=2", 422, "limit"),
        ("online=yes", 422, "online"),
        ("name=", 422, "name"),
        ("tag=", 422, "tag"),
        ("tag=" + "t" * 65, 422, "tag"),
        ("name=%FF", 422, "query"),
        ("after=", 400, "after"),
        ("after=not-a-cursor!", 400, "after"),
        ("after=WyJ3ZWIiXQ", 400, "after"),  # base64url of ["web"]: one part, not two
        ("after=eyJuYW1lIjoid2ViIn0", 400, "after"),  # {"name":"web"}
        ("after=WyJ3ZWIiLCAiYWd0X3giXQ", 400, "after"),  # ["web", "agt_x"]: not as issued
        ("after=" + "A" * 20000, 400, "after"),
    ],
)
async def test_a_query_out_of_bounds_is_refused_clearly_on_both_paths(
    service: ServiceHarness, fastapi_only: httpx.AsyncClient, query: str, status: int,
    field: str,
) -> None:
    _, admin = await _team_with_agents(service, count=1)
    answer = await _same_answer(
        service, fastapi_only, "GET", f"/v1/agents?{query}", _bearer(admin.token)
    )
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["error"] == ("invalid_request" if status == 422 else "bad_request")
    assert body["message"].startswith(f"{field}:"), body
    exposition = (await service.http.get("/metrics")).text
    assert 'tucdesk_rejected_inputs_total{reason="invalid"} 2.0' in exposition


async def test_a_bad_query_is_refused_only_after_the_credential_and_the_permission(
    service: ServiceHarness, fastapi_only: httpx.AsyncClient
) -> None:
    _, admin = await _team_with_agents(service, count=1)
    audit_only = await service.call(
        admin, "POST", "/v1/api-keys", {"name": "ci", "scopes": ["audit:read"]}
    )
    for headers, status in (
        (None, 401),
        (_bearer("not-a-token"), 401),
        (_bearer(audit_only.json()["key"]), 403),
    ):
        answer = await _same_answer(
            service, fastapi_only, "GET", "/v1/agents?limit=0&after=x", headers
        )
        assert answer.status_code == status, answer.text


async def test_a_cursor_from_another_team_shows_nothing_of_that_team(
    service: ServiceHarness, fastapi_only: httpx.AsyncClient
) -> None:
    _, admin_a = await _team_with_agents(service, count=3)
    team_b = await service.team("other")
    admin_b = await service.operator(team_b)
    key_b = await service.registration_key(admin_b)
    # Sorts after team A's cursor position: that position is all a cursor carries.
    await service.register(SigningIdentity.generate(), key_b["key"], hostname="z-1", machine="b")
    page_a = (await service.http.get("/v1/agents?limit=1", headers=_bearer(admin_a.token))).json()
    assert page_a["next_after"] is not None
    answer = await _same_answer(
        service, fastapi_only, "GET", f"/v1/agents?after={page_a['next_after']}",
        _bearer(admin_b.token),
    )
    assert [agent["name"] for agent in answer.json()["agents"]] == ["z-1"]


async def test_an_api_key_pages_the_list_as_a_token_does(
    service: ServiceHarness, fastapi_only: httpx.AsyncClient
) -> None:
    _, admin = await _team_with_agents(service, count=3)
    created = await service.call(
        admin, "POST", "/v1/api-keys", {"name": "ci", "scopes": ["agents:read"]}
    )
    by_key = await _pages(service, fastapi_only, created.json()["key"], "limit=2")
    assert by_key == await _pages(service, fastapi_only, admin.token, "limit=2")
    assert len(by_key) == 3
