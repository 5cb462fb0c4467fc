"""Changing an agent's tags (``PUT /v1/agents/{id}/tags``): who may, what is kept, what is audited.

The new tags are pending like a roster change: `GET /v1/policy` hands them to the admin who signs
next (``agent_tags``), and policy decides on signed tags only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rendezvous.store import Store
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness, harness
from tests.rendezvous.sessions_support import EnrolledAgent, enroll_agent

pytestmark = pytest.mark.anyio


@pytest.fixture
async def service(store: Store, tmp_path: Path) -> AsyncIterator[ServiceHarness]:
    async with harness(store, tmp_path / "data") as running:
        yield running


def tags_path(agent: EnrolledAgent | str) -> str:
    return f"/v1/agents/{agent if isinstance(agent, str) else agent.agent_id}/tags"


async def listed_tags(service: ServiceHarness, operator: OperatorSession) -> dict[str, list[str]]:
    response = await service.call(operator, "GET", "/v1/agents")
    assert response.status_code == 200, response.text
    return {agent["id"]: agent["tags"] for agent in response.json()["agents"]}


async def test_an_admin_changes_an_agents_tags_audited_and_pending_for_signing(
    service: ServiceHarness,
) -> None:
    team = await service.team("ops")
    admin = await service.operator(team, "admin")
    agent = await enroll_agent(service, admin, "web-1")
    body = {"tags": ["Prod", " pci ", "prod"]}
    response = await service.call(admin, "PUT", tags_path(agent), body)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "id": agent.agent_id, "name": "web-1", "tags": ["prod", "pci"], "previous_tags": [],
    }
    assert (await listed_tags(service, admin))[agent.agent_id] == ["prod", "pci"]
    [record] = await service.audit_events(team, "agent.tags_changed")
    assert record["target"] == agent.agent_id
    assert record["actor"]["id"] == admin.operator_id
    assert record["context"] == {"name": "web-1", "previous_tags": [], "tags": ["prod", "pci"]}
    policy = await service.call(admin, "GET", "/v1/policy")
    assert policy.status_code == 200, policy.text
    assert policy.json()["pending"]["agent_tags"][agent.agent_id] == ["pci", "prod"]


async def test_setting_the_same_tags_again_audits_nothing(service: ServiceHarness) -> None:
    team = await service.team("ops")
    admin = await service.operator(team, "admin")
    agent = await enroll_agent(service, admin)
    for _ in range(2):
        response = await service.call(admin, "PUT", tags_path(agent), {"tags": ["db"]})
        assert response.status_code == 200, response.text
    assert len(await service.audit_events(team, "agent.tags_changed")) == 1


@pytest.mark.parametrize("role", ["operator", "approver", "auditor"])
async def test_roles_other_than_admin_may_not_change_tags(
    service: ServiceHarness, role: str
) -> None:
    team = await service.team("ops")
    admin = await service.operator(team, "admin")
    agent = await enroll_agent(service, admin)
    someone = await service.operator(team, role)
    response = await service.call(someone, "PUT", tags_path(agent), {"tags": ["prod"]})
    assert response.status_code == 403, response.text
    assert (await listed_tags(service, admin))[agent.agent_id] == []
    assert await service.audit_events(team, "agent.tags_changed") == []


async def test_no_api_key_may_change_tags(service: ServiceHarness) -> None:
    team = await service.team("ops")
    admin = await service.operator(team, "admin")
    agent = await enroll_agent(service, admin)
    created = await service.call(
        admin, "POST", "/v1/api-keys", {"name": "ci", "scopes": ["agents:read"]}
    )
    secret = created.json()["key"]
    response = await service.http.put(
        tags_path(agent), json={"tags": ["prod"]}, headers={"Authorization": f"Bearer {secret}"}
    )
    assert response.status_code == 403, response.text
    assert (await listed_tags(service, admin))[agent.agent_id] == []


async def test_another_teams_agent_is_not_found_exactly_like_an_unknown_one(
    service: ServiceHarness,
) -> None:
    admin = await service.operator(await service.team("ops"), "admin")
    other_team = await service.team("other")
    other_admin = await service.operator(other_team, "admin")
    theirs = await enroll_agent(service, other_admin)
    cross = await service.call(admin, "PUT", tags_path(theirs), {"tags": ["pwned"]})
    unknown = await service.call(admin, "PUT", tags_path("agt_" + "a" * 16), {"tags": ["x"]})
    assert cross.status_code == unknown.status_code == 404
    assert cross.json() == unknown.json()
    assert (await listed_tags(service, other_admin))[theirs.agent_id] == []
    assert await service.audit_events(other_team, "agent.tags_changed") == []


async def test_a_removed_agent_cannot_be_retagged(service: ServiceHarness) -> None:
    team = await service.team("ops")
    admin = await service.operator(team, "admin")
    agent = await enroll_agent(service, admin)
    assert (await service.call(admin, "DELETE", f"/v1/agents/{agent.agent_id}")).status_code == 200
    response = await service.call(admin, "PUT", tags_path(agent), {"tags": ["prod"]})
    assert response.status_code == 404, response.text
    assert await service.audit_events(team, "agent.tags_changed") == []


@pytest.mark.parametrize(
    "body",
    [{"tags": ["bad tag"]}, {"tags": [""]}, {"tags": ["x" * 65]}, {"tags": "prod"},
     {"tags": [f"t{number}" for number in range(33)]}, {}, {"tags": ["a"], "team_id": "x"}],
)
async def test_bad_tags_are_refused_and_change_nothing(
    service: ServiceHarness, body: dict[str, object]
) -> None:
    team = await service.team("ops")
    admin = await service.operator(team, "admin")
    agent = await enroll_agent(service, admin)
    response = await service.call(admin, "PUT", tags_path(agent), body)
    assert response.status_code in {400, 422}, response.text
    assert (await listed_tags(service, admin))[agent.agent_id] == []
    assert await service.audit_events(team, "agent.tags_changed") == []


async def test_a_tag_change_without_a_request_proof_is_refused(service: ServiceHarness) -> None:
    team = await service.team("ops")
    admin = await service.operator(team, "admin")
    agent = await enroll_agent(service, admin)
    response = await service.call(
        admin, "PUT", tags_path(agent), {"tags": ["prod"]}, with_proof=False
    )
    assert response.status_code == 401, response.text
    assert (await listed_tags(service, admin))[agent.agent_id] == []
