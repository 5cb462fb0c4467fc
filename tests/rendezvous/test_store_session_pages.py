"""The session listing a page at a time (``SessionQuery``): keyset pages newest first in
(created_at, id) order, the state, agent, operator and since filters, agent names and operator
emails beside each session, and the team boundary; on SQLite and PostgreSQL.
"""

from __future__ import annotations

import pytest

from rendezvous.credentials import hash_secret, new_registration_key
from rendezvous.store import InvalidArgument, Session, SessionState, Store
from rendezvous.store.base import ListedSession, SessionQuery, new_id

pytestmark = pytest.mark.anyio
NOW = 1_800_000_000.0


async def _team(store: Store, name: str = "ops") -> str:
    return (await store.create_team(f"{name}-{new_id('t')}", NOW)).id


async def _agent(store: Store, team_id: str, name: str) -> str:
    key = new_registration_key()
    await store.create_registration_key(team_id, hash_secret(key), [], NOW + 60, "t", NOW)
    agent, _ = await store.register_agent(
        hash_secret(key), NOW, new_id("pk").encode().ljust(32, b"x")[:32], "SHA256:x", "m",
        name, name,
    )  # fmt: skip
    return agent.id


async def _session(
    store: Store, team_id: str, agent_id: str, created_at: float, **changes: object
) -> Session:
    fields: dict[str, object] = dict(
        id=new_id("ses"), team_id=team_id, agent_id=agent_id, operator_id="op_1",
        operator_key_thumbprint="jkt", mode="exec", command=("uname", "-a"),
        relay_id="relay-1", relay_host="127.0.0.1", relay_port=7000, relay_udp_port=None,
        policy_result="allow", policy_rule_id="rule", state=SessionState.OFFERED,
        state_reason=None, created_at=created_at, expires_at=created_at + 60,
        updated_at=created_at,
    )  # fmt: skip
    fields.update(changes)
    return await store.create_session(Session(**fields))  # type: ignore[arg-type]


async def _all_pages(store: Store, team_id: str, query: SessionQuery) -> list[Session]:
    listed: list[Session] = []
    while True:
        listing = await store.session_listing(team_id, query)
        assert len(listing.sessions) <= (query.limit or len(listing.sessions))
        listed += [entry.session for entry in listing.sessions]
        if not listing.more:
            return listed
        last = listing.sessions[-1].session
        query = SessionQuery(
            limit=query.limit, after=(last.created_at, last.id), states=query.states,
            agent_id=query.agent_id, operator_id=query.operator_id, since=query.since,
        )  # fmt: skip


def _newest_first(sessions: list[Session]) -> list[Session]:
    return sorted(sessions, key=lambda session: (session.created_at, session.id), reverse=True)


async def test_pages_list_every_session_once_newest_first(store: Store) -> None:
    team = await _team(store)
    agent = await _agent(store, team, "web-1")
    # Repeated creation times: the id decides their order, also across a page boundary.
    times = [NOW + 5, NOW + 1, NOW + 3, NOW + 3, NOW + 3, NOW + 0.25, NOW + 3, NOW + 1]
    created = [await _session(store, team, agent, at) for at in times]
    expected = _newest_first(created)
    for limit in (1, 2, 3, 7, 8, 1000):
        assert await _all_pages(store, team, SessionQuery(limit=limit)) == expected, limit
    whole = await store.session_listing(team, SessionQuery(limit=8))
    assert [entry.session for entry in whole.sessions] == expected and not whole.more
    unlimited = await store.session_listing(team)
    assert [entry.session for entry in unlimited.sessions] == expected


async def test_each_filter_selects_only_its_sessions(store: Store) -> None:
    team = await _team(store)
    web, db = await _agent(store, team, "web-1"), await _agent(store, team, "db-1")
    a = await _session(store, team, web, NOW + 1, operator_id="op_a")
    b = await _session(store, team, db, NOW + 2, operator_id="op_b", state=SessionState.ENDED)
    c = await _session(store, team, web, NOW + 3, operator_id="op_b",
                       state=SessionState.REFUSED, state_reason="policy")  # fmt: skip
    d = await _session(store, team, db, NOW + 4, operator_id="op_a", state=SessionState.ENDED)

    async def listed(**query: object) -> list[Session]:
        return await _all_pages(store, team, SessionQuery(limit=1, **query))  # type: ignore[arg-type]

    assert await listed(states=(SessionState.ENDED,)) == [d, b]
    assert await listed(states=(SessionState.ENDED, SessionState.REFUSED)) == [d, c, b]
    assert await listed(states=(SessionState.ACCEPTED,)) == []
    assert await listed(agent_id=web) == [c, a]
    assert await listed(operator_id="op_a") == [d, a]
    assert await listed(since=NOW + 2) == [d, c, b]  # at or after
    assert await listed(since=NOW + 2.5, operator_id="op_b", agent_id=web) == [c]
    assert await listed(agent_id="agt_nobody") == []


async def test_each_session_carries_its_agent_name_and_operator_email(store: Store) -> None:
    team = await _team(store)
    agent = await _agent(store, team, "web-1")
    code = hash_secret(new_id("inv"))
    await store.create_invite(team, "alice@example.com", "operator", code, NOW + 60, "t", NOW)
    operator, _ = await store.enroll_operator(code, NOW, bytes(32), new_id("thumb"))
    mine = await _session(store, team, agent, NOW + 1, operator_id=operator.id)
    unknown = await _session(store, team, agent, NOW + 2, operator_id="op_gone")
    listing = await store.session_listing(team)
    assert listing.sessions == [
        ListedSession(unknown, "web-1", None),
        ListedSession(mine, "web-1", "alice@example.com"),
    ]


async def test_another_teams_sessions_never_appear_even_from_its_cursor(store: Store) -> None:
    team, other = await _team(store), await _team(store, "other")
    ours = [await _session(store, team, await _agent(store, team, "a"), NOW + i) for i in (1, 3)]
    theirs_agent = await _agent(store, other, "a")
    theirs = [await _session(store, other, theirs_agent, NOW + i) for i in (2, 4)]
    assert await _all_pages(store, team, SessionQuery(limit=1)) == _newest_first(ours)
    assert await _all_pages(store, other, SessionQuery(limit=1)) == _newest_first(theirs)
    # A position taken from the other team only positions the listing inside this team.
    position = (theirs[1].created_at, theirs[1].id)
    after = await _all_pages(store, team, SessionQuery(limit=1, after=position))
    assert after == _newest_first(ours)
    assert await _all_pages(store, team, SessionQuery(agent_id=theirs_agent)) == []


async def test_out_of_bounds_queries_are_refused(store: Store) -> None:
    team = await _team(store)
    for query in (
        SessionQuery(limit=0),
        SessionQuery(after=(float("nan"), "ses_x")),
        SessionQuery(after=(NOW, "")),
        SessionQuery(agent_id="x" * 256),
        SessionQuery(operator_id=""),
        SessionQuery(since=float("inf")),
    ):
        with pytest.raises(InvalidArgument):
            await store.session_listing(team, query)
