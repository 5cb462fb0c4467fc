"""``GET /v1/sessions?operator=&agent=``: an operator by id or email, an agent by id or name (a
removed agent's too, its history stays); one naming nobody in the caller's team is refused
naming it, never answered with an empty list that reads as "no sessions"; on SQLite and
PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from protocol.identity import SigningIdentity
from rendezvous.store import Session, SessionState, Store
from rendezvous.store.base import new_id
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness, harness

pytestmark = pytest.mark.anyio


@pytest.fixture
async def service(store: Store, tmp_path: Path) -> AsyncIterator[ServiceHarness]:
    async with harness(store, tmp_path / "data") as running:
        yield running


async def _agent(service: ServiceHarness, admin: OperatorSession, hostname: str) -> str:
    key = await service.registration_key(admin)
    response = await service.register(
        SigningIdentity.generate(), key["key"], hostname=hostname, machine=new_id("m")
    )
    assert response.status_code == 200, response.text
    agent_id: str = response.json()["agent_id"]
    return agent_id


async def _operator(service: ServiceHarness, team_id: str, email: str) -> OperatorSession:
    """An operator enrolled with an invite for ``email`` (role operator)."""
    identity = SigningIdentity.generate()
    code = await service.invite(team_id, "operator", email)
    response = await service.http.post(
        "/v1/operators/enroll", json=service.enrollment(identity, code)
    )
    assert response.status_code == 200, response.text
    token = await service.login(identity)
    return OperatorSession(
        identity, token["operator_id"], team_id, "operator", token["access_token"]
    )


async def _session(
    service: ServiceHarness, team_id: str, agent_id: str, operator_id: str, age: float
) -> str:
    created_at = service.clock.now - age
    session = await service.store.create_session(Session(
        id=new_id("ses"), team_id=team_id, agent_id=agent_id, operator_id=operator_id,
        operator_key_thumbprint="jkt", mode="exec", command=("id",), relay_id="relay-1",
        relay_host="127.0.0.1", relay_port=7000, relay_udp_port=None, policy_result="allow",
        policy_rule_id=None, state=SessionState.ENDED, state_reason=None,
        created_at=created_at, expires_at=created_at + 60, updated_at=created_at,
    ))  # fmt: skip
    return session.id


async def _list(
    service: ServiceHarness, caller: OperatorSession, **query: str
) -> tuple[int, dict[str, Any]]:
    response = await service.call(caller, "GET", f"/v1/sessions?{urlencode(query)}")
    body: dict[str, Any] = response.json()
    return response.status_code, body


def _ids(body: dict[str, Any]) -> list[str]:
    return [session["session_id"] for session in body["sessions"]]


async def test_the_operator_filter_takes_an_email_and_finds_every_id_it_had(
    service: ServiceHarness,
) -> None:
    team = await service.team("ops")
    admin = await service.operator(team)
    other_team = await service.team("dev")
    web = await _agent(service, admin, "web-1")
    alice = await _operator(service, team, "alice@example.com")
    bob = await _operator(service, team, "bob@example.com")
    first = await _session(service, team, web, alice.operator_id, 30)
    await _session(service, team, web, bob.operator_id, 20)
    # Alice is disabled, then invited again: a new id, the same person.
    await service.store.disable_operator(team, alice.operator_id, service.clock.now)
    alice_again = await _operator(service, team, "alice@example.com")
    second = await _session(service, team, web, alice_again.operator_id, 10)
    # Another team's alice is not this team's.
    stranger = await _operator(service, other_team, "alice@example.com")
    await _session(service, other_team, await _agent(service, await service.operator(
        other_team), "web-1"), stranger.operator_id, 5)  # fmt: skip
    for asked in ("alice@example.com", "Alice@Example.COM"):
        status, body = await _list(service, admin, operator=asked)
        assert status == 200, body
        assert _ids(body) == [second, first], asked
    status, body = await _list(service, admin, operator=alice.operator_id)
    assert (status, _ids(body)) == (200, [first])


async def test_an_operator_or_agent_naming_nobody_in_the_team_is_refused_naming_it(
    service: ServiceHarness,
) -> None:
    team = await service.team("ops")
    admin = await service.operator(team)
    web = await _agent(service, admin, "web-1")
    await _session(service, team, web, admin.operator_id, 10)
    for asked in ("nobody@example.com", "op_nobody"):
        status, body = await _list(service, admin, operator=asked)
        assert (status, body["error"]) == (404, "not_found"), body
        assert repr(asked) in body["message"], body
    for asked in ("nowhere", "agt_nowhere"):
        status, body = await _list(service, admin, agent=asked)
        assert (status, body["error"]) == (404, "not_found"), body
        assert repr(asked) in body["message"], body


async def test_an_operator_lists_their_own_by_email_and_is_refused_anyone_elses_alike(
    service: ServiceHarness,
) -> None:
    team = await service.team("ops")
    admin = await service.operator(team)
    web = await _agent(service, admin, "web-1")
    alice = await _operator(service, team, "alice@example.com")
    await _operator(service, team, "bob@example.com")
    mine = await _session(service, team, web, alice.operator_id, 10)
    await _session(service, team, web, admin.operator_id, 5)
    status, body = await _list(service, alice, operator="ALICE@example.com")
    assert (status, _ids(body)) == (200, [mine])
    # A teammate and nobody at all get the same answer: it tells nothing about who is in the team.
    answers = set()
    for asked in ("bob@example.com", "nobody@example.com"):
        status, body = await _list(service, alice, operator=asked)
        assert (status, body["error"]) == (403, "forbidden"), body
        answers.add(body["message"].replace(repr(asked), "…"))
    assert len(answers) == 1


async def test_a_removed_agents_sessions_are_listed_by_its_id_and_by_a_name_only_it_had(
    service: ServiceHarness,
) -> None:
    team = await service.team("ops")
    admin = await service.operator(team)
    stolen = await _agent(service, admin, "db-1")
    old = await _session(service, team, stolen, admin.operator_id, 30)
    removed = await service.call(admin, "DELETE", f"/v1/agents/{stolen}")
    assert removed.status_code == 200, removed.text
    for asked in (stolen, "db-1"):
        status, body = await _list(service, admin, agent=asked)
        assert (status, _ids(body)) == (200, [old]), (asked, body)
        assert body["sessions"][0]["agent_name"] == "db-1"
    # Once a current agent carries the name, the name means it; the removed one is its id.
    rebuilt = await _agent(service, admin, "db-1")
    new = await _session(service, team, rebuilt, admin.operator_id, 10)
    status, body = await _list(service, admin, agent="db-1")
    assert (status, _ids(body)) == (200, [new])
    status, body = await _list(service, admin, agent=stolen)
    assert (status, _ids(body)) == (200, [old])
    # Two removed agents had the name: which one is for the caller to say.
    assert (await service.call(admin, "DELETE", f"/v1/agents/{rebuilt}")).status_code == 200
    status, body = await _list(service, admin, agent="db-1")
    assert (status, body["error"]) == (409, "ambiguous_target"), body
    assert stolen in body["message"] and rebuilt in body["message"]
