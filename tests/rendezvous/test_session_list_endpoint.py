"""``GET /v1/sessions``: the caller's team's sessions newest first, a page at a time, filtered;
admins, auditors and API keys with the ``sessions:read`` scope see the team's, any other
operator only their own; ``GET /v1/sessions/{id}`` shows one as the list does; on SQLite and
PostgreSQL.
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
    # Asking for another operator's sessions is refused, not answered with an empty list.
    status, body = await _list(service, team.alice, operator=team.bob.operator_id)
    assert (status, body["error"]) == (403, "forbidden")
    assert team.bob.operator_id in body["message"]
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
    # Another team's operator and agent are unknown here, exactly as made-up ids are.
    status, body = await _list(service, ours.admin, after=forged, operator=theirs.alice.operator_id)
    assert status == 404 and theirs.alice.operator_id in body["message"]
    status, body = await _list(service, ours.admin, agent=theirs.web)
    assert status == 404 and theirs.web in body["message"]


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
    # Without a credential (or with an API key without sessions:read) the query is not even
    # looked at.
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


async def _api_key(service: ServiceHarness, admin: OperatorSession, *scopes: str) -> dict[str, str]:
    """The id and the Authorization header of a new API key of ``admin``'s team."""
    created = await service.call(
        admin, "POST", "/v1/api-keys", {"name": "siem", "scopes": list(scopes)}
    )
    assert created.status_code == 201, created.text
    assert created.json()["scopes"] == sorted(scopes)
    return {"id": created.json()["id"], "Authorization": f"Bearer {created.json()['key']}"}


async def _read_with_key(
    service: ServiceHarness, api_key: dict[str, str], target: str
) -> tuple[int, dict[str, Any]]:
    response = await service.http.get(
        target, headers={"Authorization": api_key["Authorization"]}
    )
    body: dict[str, Any] = response.json()
    return response.status_code, body


async def test_a_key_with_sessions_read_lists_and_reads_the_whole_teams_sessions(
    service: ServiceHarness,
) -> None:
    team = await _team(service)
    alices = await _session(service, team.team_id, team.web, team.alice, 20)
    bobs = await _session(service, team.team_id, team.db, team.bob, 10,
                          state=SessionState.REFUSED, state_reason="no shells")  # fmt: skip
    api_key = await _api_key(service, team.admin, "sessions:read")
    status, listed = await _read_with_key(service, api_key, "/v1/sessions")
    assert status == 200, listed
    assert listed == (await _list(service, team.admin))[1]
    assert [session["session_id"] for session in listed["sessions"]] == [bobs.id, alices.id]
    # The same filters and pages as for an operator.
    status, page = await _read_with_key(service, api_key, "/v1/sessions?limit=1")
    assert status == 200 and [s["session_id"] for s in page["sessions"]] == [bobs.id]
    status, rest = await _read_with_key(
        service, api_key, f"/v1/sessions?limit=1&after={page['next_after']}"
    )
    assert status == 200 and [s["session_id"] for s in rest["sessions"]] == [alices.id]
    status, filtered = await _read_with_key(
        service, api_key, f"/v1/sessions?operator={team.alice.operator_id}"
    )
    assert status == 200 and [s["session_id"] for s in filtered["sessions"]] == [alices.id]
    status, one = await _read_with_key(service, api_key, f"/v1/sessions/{bobs.id}")
    assert status == 200, one
    assert one == listed["sessions"][0]
    assert (one["agent_name"], one["operator_email"]) == ("db-1", f"approver@{team.team_id}.test")
    assert (one["state"], one["reason"]) == ("refused", "no shells")


async def test_a_key_without_sessions_read_is_refused_naming_the_scope(
    service: ServiceHarness,
) -> None:
    team = await _team(service)
    session = await _session(service, team.team_id, team.web, team.alice, 10)
    api_key = await _api_key(service, team.admin, "agents:read", "audit:read")
    for target in ("/v1/sessions", f"/v1/sessions/{session.id}", "/v1/sessions/ses_unknown"):
        status, body = await _read_with_key(service, api_key, target)
        # Refused before the lookup: an existing id and an unknown one answer alike.
        assert (status, body["error"]) == (403, "forbidden"), (target, body)
        assert "sessions:read" in body["message"], body


async def test_a_key_of_another_team_reads_none_of_this_teams_sessions(
    service: ServiceHarness,
) -> None:
    ours = await _team(service)
    theirs = await _team(service, "other")
    mine = await _session(service, ours.team_id, ours.web, ours.alice, 10)
    their_key = await _api_key(service, theirs.admin, "sessions:read")
    status, body = await _read_with_key(service, their_key, f"/v1/sessions/{mine.id}")
    unknown = await _read_with_key(service, their_key, "/v1/sessions/ses_unknown")
    assert (status, body) == unknown
    assert status == 404
    status, body = await _read_with_key(service, their_key, "/v1/sessions")
    assert status == 200 and body["sessions"] == []
    for query in (f"operator={ours.alice.operator_id}", f"agent={ours.web}"):
        status, body = await _read_with_key(service, their_key, f"/v1/sessions?{query}")
        assert status == 404, body


async def test_a_revoked_key_no_longer_reads_sessions(service: ServiceHarness) -> None:
    team = await _team(service)
    session = await _session(service, team.team_id, team.web, team.alice, 10)
    api_key = await _api_key(service, team.admin, "sessions:read")
    assert (await _read_with_key(service, api_key, f"/v1/sessions/{session.id}"))[0] == 200
    revoked = await service.call(team.admin, "DELETE", f"/v1/api-keys/{api_key['id']}")
    assert revoked.status_code == 200, revoked.text
    for target in ("/v1/sessions", f"/v1/sessions/{session.id}"):
        status, body = await _read_with_key(service, api_key, target)
        assert (status, body["error"]) == (401, "unauthorized"), body


async def test_one_session_names_its_agent_and_operator_for_its_operator(
    service: ServiceHarness,
) -> None:
    team = await _team(service)
    session = await _session(service, team.team_id, team.web, team.alice, 10)
    response = await service.call(team.alice, "GET", f"/v1/sessions/{session.id}")
    assert response.status_code == 200, response.text
    one = response.json()
    assert (one["agent_name"], one["operator_email"]) == ("web-1", f"operator@{team.team_id}.test")
    assert one["operator_id"] == team.alice.operator_id
    assert one["command"] == ["uname", "-a"]
    # Still only for its operator, admins and auditors (and keys with sessions:read).
    colleague = await service.call(team.bob, "GET", f"/v1/sessions/{session.id}")
    assert colleague.status_code == 403


async def test_the_api_documents_the_sessions_read_scope_and_the_session_view(
    service: ServiceHarness,
) -> None:
    admin = await service.operator(await service.team("ops"))
    unknown = await service.call(
        admin, "POST", "/v1/api-keys", {"name": "siem", "scopes": ["sessions:write"]}
    )
    assert unknown.status_code == 400 and "sessions:read" in unknown.json()["message"]
    document = (await service.http.get("/v1/openapi.json")).json()
    assert "sessions:read" in document["paths"]["/v1/api-keys"]["post"]["description"]
    one = document["paths"]["/v1/sessions/{session_id}"]["get"]["responses"]["200"]
    listed = document["components"]["schemas"]["SessionList"]["properties"]["sessions"]
    assert one["content"]["application/json"]["schema"] == listed["items"]
