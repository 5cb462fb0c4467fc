"""Changing an agent's tags (``PUT /v1/agents/{id}/tags``): who may, what is kept, what is audited.

The new tags are pending like a roster change: `GET /v1/policy` hands them to the admin who signs
next (``agent_tags``), and policy decides on signed tags only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

from audit.actions import Action
from rendezvous.store import Store
from rendezvous.store.base import TagsChanged
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


async def test_the_store_sets_tags_only_if_they_are_still_the_expected_ones(
    service: ServiceHarness,
) -> None:
    team = await service.team("ops")
    admin = await service.operator(team, "admin")
    agent = await enroll_agent(service, admin)
    store = service.store
    await store.set_agent_tags(team, agent.agent_id, ["db"], expected=[])
    with pytest.raises(TagsChanged) as refused:
        await store.set_agent_tags(team, agent.agent_id, ["web"], expected=[])
    assert refused.value.current == ("db",)
    stored = await store.get_agent(team, agent.agent_id)
    assert stored is not None and stored.tags == ("db",)


async def test_tags_changed_after_the_callers_read_are_refused_not_overwritten_unaudited(
    service: ServiceHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admin A puts back the tags it read (no change, so no record) while admin B's change
    lands in between: A's write must not undo B's change without any record of it."""
    team = await service.team("ops")
    first = await service.operator(team, "admin")
    second = await service.operator(team, "admin")
    agent = await enroll_agent(service, first, "web-1")
    real_set = service.store.set_agent_tags
    entered, other_done = trio.Event(), trio.Event()

    async def pause_first_write(*args: Any, **kwargs: Any) -> Any:
        if not entered.is_set():
            entered.set()
            await other_done.wait()  # the other admin's change commits in this gap
        return await real_set(*args, **kwargs)

    monkeypatch.setattr(service.store, "set_agent_tags", pause_first_write)
    answers: dict[str, Any] = {}

    async def put_back_the_same() -> None:
        answers["first"] = await service.call(first, "PUT", tags_path(agent), {"tags": []})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(put_back_the_same)
        with trio.fail_after(15):
            await entered.wait()
        answers["second"] = await service.call(second, "PUT", tags_path(agent), {"tags": ["pci"]})
        other_done.set()
    assert answers["second"].status_code == 200, answers["second"].text
    refused = answers["first"]
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"] == "tags_changed"
    assert "now: pci" in refused.json()["message"]
    assert (await listed_tags(service, first))[agent.agent_id] == ["pci"]
    [record] = await service.audit_events(team, "agent.tags_changed")
    assert record["context"]["tags"] == ["pci"]


async def test_a_change_audited_then_overtaken_is_recorded_as_failed(
    service: ServiceHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    team = await service.team("ops")
    first = await service.operator(team, "admin")
    second = await service.operator(team, "admin")
    agent = await enroll_agent(service, first, "web-1")
    record = service.ctx.audit.record
    recorded, other_done = trio.Event(), trio.Event()

    async def pause_after_first_record(*args: Any, **kwargs: Any) -> Any:
        await record(*args, **kwargs)
        if kwargs.get("action") is Action.AGENT_TAGS_CHANGED and not recorded.is_set():
            recorded.set()
            await other_done.wait()

    monkeypatch.setattr(service.ctx.audit, "record", pause_after_first_record)
    answers: dict[str, Any] = {}

    async def change() -> None:
        answers["first"] = await service.call(first, "PUT", tags_path(agent), {"tags": ["db"]})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(change)
        with trio.fail_after(15):
            await recorded.wait()
        answers["second"] = await service.call(second, "PUT", tags_path(agent), {"tags": ["pci"]})
        other_done.set()
    assert answers["first"].status_code == 409 and answers["second"].status_code == 200
    events = [
        (event["action"], event["context"].get("tags"))
        for event in await service.audit_events(team)
        if event["action"].startswith("agent.tags_change")
    ]
    assert events == [
        ("agent.tags_changed", ["db"]),
        ("agent.tags_changed", ["pci"]),
        ("agent.tags_change_failed", ["db"]),
    ]
    assert (await listed_tags(service, first))[agent.agent_id] == ["pci"]


async def test_a_change_computed_from_stale_tags_is_refused(service: ServiceHarness) -> None:
    team = await service.team("ops")
    admin = await service.operator(team, "admin")
    agent = await enroll_agent(service, admin)
    await service.call(admin, "PUT", tags_path(agent), {"tags": ["db"]})
    stale = {"tags": ["web"], "previous_tags": []}
    response = await service.call(admin, "PUT", tags_path(agent), stale)
    assert response.status_code == 409 and response.json()["error"] == "tags_changed"
    fresh = {"tags": ["db", "web"], "previous_tags": ["db"]}
    response = await service.call(admin, "PUT", tags_path(agent), fresh)
    assert response.status_code == 200, response.text
    assert (await listed_tags(service, admin))[agent.agent_id] == ["db", "web"]
    assert len(await service.audit_events(team, "agent.tags_changed")) == 2


async def test_a_recorded_change_to_an_agent_removed_meanwhile_is_recorded_as_failed(
    service: ServiceHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """agent.tags_changed is written before the tags are; if the agent is removed in between,
    agent.tags_change_failed (reason not_found) follows, so the log never claims the change."""
    team = await service.team("ops")
    admin = await service.operator(team, "admin")
    agent = await enroll_agent(service, admin, "web-1")
    record = service.ctx.audit.record

    async def remove_after_record(*args: Any, **kwargs: Any) -> Any:
        result = await record(*args, **kwargs)
        if kwargs.get("action") is Action.AGENT_TAGS_CHANGED:
            await service.store.remove_agent(team, agent.agent_id, service.clock.now)
        return result

    monkeypatch.setattr(service.ctx.audit, "record", remove_after_record)
    answer = await service.call(admin, "PUT", tags_path(agent), {"tags": ["pci"]})
    assert answer.status_code == 404, answer.text
    events = [
        (event["action"], event["target"], event["context"])
        for event in await service.audit_events(team)
        if event["action"].startswith("agent.tags_change")
    ]
    assert events == [
        ("agent.tags_changed", agent.agent_id,
         {"name": "web-1", "previous_tags": [], "tags": ["pci"]}),
        ("agent.tags_change_failed", agent.agent_id,
         {"name": "web-1", "previous_tags": [], "tags": ["pci"], "reason": "not_found"}),
    ]  # fmt: skip
