"""``GET /v1/sessions``: the caller's team's sessions newest first, a page at a time, filtered;
admins and auditors see the team's, any other operator only their own; on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from protocol.identity import SigningIdentity
from rendezvous.session_list_query import encode_session_cursor
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


async def _session(
    service: ServiceHarness,
    team_id: str,
    agent_id: str,
    operator: OperatorSession,
    age: float,
    **changes: object,
) -> Session:
    created_at = service.clock.now - age
    fields: dict[str, object] = dict(
        id=new_id("ses"), team_id=team_id, agent_id=agent_id, operator_id=operator.operator_id,
        operator_key_thumbprint="jkt", mode="exec", command=("uname", "-a"),
        relay_id="relay-1", relay_host="127.0.0.1", relay_port=7000, relay_udp_port=None,
        policy_result="allow", policy_rule_id=None, state=SessionState.ENDED,
        state_reason=None, created_at=created_at, expires_at=created_at + 60,
        updated_at=created_at + 5,
    )  # fmt: skip
    fields.update(changes)
    return await service.store.create_session(Session(**fields))  # type: ignore[arg-type]


async def _list(
    service: ServiceHarness, caller: OperatorSession, **query: Any
) -> tuple[int, dict[str, Any]]:
    pairs = [
        (name, item)
        for name, value in query.items()
        for item in (value if isinstance(value, list) else [value])
    ]
    target = "/v1/sessions" + (f"?{urlencode(pairs)}" if pairs else "")
    response = await service.call(caller, "GET", target)
    body: dict[str, Any] = response.json()
    return response.status_code, body


async def _every_page(
    service: ServiceHarness, caller: OperatorSession, **query: Any
) -> list[str]:
    ids: list[str] = []
    after: str | None = None
    while True:
        status, body = await _list(service, caller, **query, **({"after": after} if after else {}))
        assert status == 200, body
        ids += [session["session_id"] for session in body["sessions"]]
        after = body["next_after"]
        if after is None:
            return ids


class _Team:
    def __init__(self, team_id: str, admin: OperatorSession, auditor: OperatorSession,
                 alice: OperatorSession, bob: OperatorSession, web: str, db: str) -> None:
        self.team_id, self.admin, self.auditor = team_id, admin, auditor
        self.alice, self.bob, self.web, self.db = alice, bob, web, db  # fmt: skip


async def _team(service: ServiceHarness, name: str = "ops") -> _Team:
    team_id = await service.team(name)
    admin = await service.operator(team_id)
    auditor = await service.operator(team_id, role="auditor")
    alice = await service.operator(team_id, role="operator")
    bob = await service.operator(team_id, role="approver")
    web = await _agent(service, admin, "web-1")
    db = await _agent(service, admin, "db-1")
    return _Team(team_id, admin, auditor, alice, bob, web, db)


async def test_pages_list_every_session_once_newest_first(service: ServiceHarness) -> None:
    team = await _team(service)
    made = [
        await _session(service, team.team_id, team.web, team.alice, age)
        for age in (50, 10, 30, 30, 20, 40, 30)
    ]
    newest_first = [
        session.id
        for session in sorted(made, key=lambda s: (s.created_at, s.id), reverse=True)
    ]
    for limit in (1, 2, 3, 7, 1000):
        assert await _every_page(service, team.admin, limit=limit) == newest_first, limit
    status, body = await _list(service, team.admin)
    assert status == 200 and body["next_after"] is None
    assert [session["session_id"] for session in body["sessions"]] == newest_first


async def test_a_listed_session_carries_what_get_one_returns_and_who_and_what(
    service: ServiceHarness,
) -> None:
    team = await _team(service)
    made = await _session(service, team.team_id, team.web, team.alice, 10,
                          state=SessionState.REFUSED, state_reason="not allowed here")  # fmt: skip
    status, body = await _list(service, team.admin)
    assert status == 200
    (listed,) = body["sessions"]
    one = (await service.call(team.admin, "GET", f"/v1/sessions/{made.id}")).json()
    assert {key: listed[key] for key in one} == one
    assert listed["agent_name"] == "web-1"
    assert listed["operator_email"] == f"operator@{team.team_id}.test"
    assert listed["command"] == ["uname", "-a"]
    assert listed["policy_result"] == "allow"
    assert listed["updated_at"] == made.updated_at
    assert (listed["state"], listed["reason"]) == ("refused", "not allowed here")


async def test_each_filter_selects_only_its_sessions(service: ServiceHarness) -> None:
    team = await _team(service)
    a = await _session(service, team.team_id, team.web, team.alice, 40)
    b = await _session(service, team.team_id, team.db, team.bob, 30, state=SessionState.OFFERED)
    c = await _session(service, team.team_id, team.web, team.bob, 20,
                       state=SessionState.ACCEPTED)  # fmt: skip
    d = await _session(service, team.team_id, team.db, team.alice, 10,
                       state=SessionState.REFUSED)  # fmt: skip
    admin = team.admin
    assert await _every_page(service, admin, state="ended", limit=1) == [a.id]
    assert await _every_page(service, admin, state=["offered", "refused"], limit=1) == [
        d.id, b.id,
    ]  # fmt: skip
    assert await _every_page(service, admin, agent=team.web, limit=1) == [c.id, a.id]
    assert await _every_page(service, admin, operator=team.bob.operator_id) == [c.id, b.id]
    assert await _every_page(service, admin, since=str(c.created_at)) == [d.id, c.id]
    assert await _every_page(service, admin, since=int(b.created_at) + 1, agent=team.db) == [
        d.id
    ]


async def test_admins_and_auditors_see_the_team_and_operators_only_their_own(
    service: ServiceHarness,
) -> None:
    team = await _team(service)
    alices = [await _session(service, team.team_id, team.web, team.alice, age) for age in (3, 1)]
    bobs = [await _session(service, team.team_id, team.db, team.bob, age) for age in (4, 2)]
    everyone = [alices[1].id, bobs[1].id, alices[0].id, bobs[0].id]
    assert await _every_page(service, team.admin) == everyone
    assert await _every_page(service, team.auditor, limit=1) == everyone
    assert await _every_page(service, team.alice, limit=1) == [alices[1].id, alices[0].id]
    assert await _every_page(service, team.bob) == [bobs[1].id, bobs[0].id]
    # Asking for another operator's sessions shows none of them (nor the caller's own).
    assert await _every_page(service, team.alice, operator=team.bob.operator_id) == []
    assert await _every_page(service, team.alice, agent=team.db) == []
    assert await _every_page(service, team.alice, operator=team.alice.operator_id) == [
        alices[1].id, alices[0].id,
    ]  # fmt: skip


async def test_another_teams_sessions_never_appear_even_with_its_cursor(
    service: ServiceHarness,
) -> None:
    ours = await _team(service)
    theirs = await _team(service, "other")
    mine = [await _session(service, ours.team_id, ours.web, ours.alice, age) for age in (4, 2)]
    other = [
        await _session(service, theirs.team_id, theirs.web, theirs.alice, age) for age in (3, 1)
    ]
    assert await _every_page(service, ours.admin, limit=1) == [mine[1].id, mine[0].id]
    status, first = await _list(service, theirs.admin, limit=1)
    assert status == 200 and first["next_after"] is not None
    cursor = first["next_after"]
    status, body = await _list(service, ours.admin, after=cursor)
    assert status == 200
    assert all(session["session_id"] not in {s.id for s in other} for session in body["sessions"])
    assert [session["session_id"] for session in body["sessions"]] == [mine[1].id, mine[0].id]
    forged = encode_session_cursor(other[1].created_at + 1, "ses_zzzz")
    status, body = await _list(service, ours.admin, after=forged, operator=theirs.alice.operator_id)
    assert status == 200 and body["sessions"] == []
    status, body = await _list(service, ours.admin, agent=theirs.web)
    assert status == 200 and body["sessions"] == []


async def test_bad_query_values_are_refused_after_the_credential(
    service: ServiceHarness,
) -> None:
    team = await _team(service)
    for query in (
        {"limit": "0"}, {"limit": "1001"}, {"limit": "+5"}, {"limit": "ten"},
        {"limit": ["1", "2"]}, {"state": "running"}, {"state": ""}, {"agent": ""},
        {"operator": "x" * 256}, {"since": "yesterday"}, {"since": "nan"},
        {"since": "-5"}, {"since": "1e999"}, {"since": ["1", "2"]},
    ):  # fmt: skip
        status, body = await _list(service, team.admin, **query)
        assert (status, body["error"]) == (422, "invalid_request"), query
    for cursor in ("not-a-cursor", "", encode_session_cursor(1.0, "ses_x") + "A", "W10"):
        status, body = await _list(service, team.admin, after=cursor)
        assert status == 400, (cursor, body)
    # Without a credential (or with an API key, which may not read sessions) the query is not
    # even looked at.
    unauthenticated = await service.http.get("/v1/sessions?limit=0&after=bad")
    assert unauthenticated.status_code == 401
    api_key = await service.call(
        team.admin, "POST", "/v1/api-keys", {"name": "ci", "scopes": ["agents:read"]}
    )
    assert api_key.status_code == 201, api_key.text
    with_key = await service.http.get(
        "/v1/sessions?limit=0", headers={"Authorization": f"Bearer {api_key.json()['key']}"}
    )
    assert with_key.status_code == 403
