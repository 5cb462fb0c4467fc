"""The store's side of the periodic sweep of disabled operators' sessions: pages of their open
sessions on one instance's agents, in (team id, session id) order, read through the partial
index of open sessions (migration 11) rather than the operators' whole history."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rendezvous.store import SessionState, Store
from rendezvous.store.base import new_id
from tests.rendezvous.test_store_session_pages import NOW, _agent, _session, _team

pytestmark = pytest.mark.anyio

INSTANCE = "inst-here"


async def _operator(store: Store, team_id: str, *, disabled: bool) -> str:
    operator_id = new_id("op")
    await store._execute(  # type: ignore[attr-defined]
        """INSERT INTO operators (id, team_id, email, role, public_key, key_thumbprint,
                                  created_at, disabled_at, tokens_valid_after)
           VALUES ($1, $2, $3, 'operator', $4, $5, $6, $7, $6)""",
        operator_id, team_id, f"{operator_id}@example.com", operator_id.encode(), operator_id,
        NOW, NOW if disabled else None,
    )  # fmt: skip
    return operator_id


async def _connected_agent(store: Store, team_id: str, name: str, instance: str) -> str:
    agent_id = await _agent(store, team_id, name)
    await store.mark_agent_connected(team_id, agent_id, instance, new_id("conn"), "m", NOW)
    return agent_id


async def test_the_sweep_pages_open_sessions_of_disabled_operators_here_in_key_order(
    store: Store,
) -> None:
    team = await _team(store)
    here = await _connected_agent(store, team, "web-1", INSTANCE)
    elsewhere = await _connected_agent(store, team, "web-2", "inst-other")
    gone, active = (
        await _operator(store, team, disabled=True),
        await _operator(store, team, disabled=False),
    )
    wanted = []
    for state in (SessionState.OFFERED, SessionState.ACCEPTED) * 3:
        wanted.append((await _session(store, team, here, NOW, operator_id=gone, state=state)).id)
    await _session(store, team, here, NOW, operator_id=gone, state=SessionState.ENDED)
    await _session(store, team, here, NOW, operator_id=active, state=SessionState.ACCEPTED)
    await _session(store, team, elsewhere, NOW, operator_id=gone, state=SessionState.ACCEPTED)
    pages: list[list[str]] = []
    after: tuple[str, str] | None = None
    while True:
        page = await store.open_sessions_of_disabled_operators(INSTANCE, 4, after=after)
        pages.append([session.id for session in page])
        if len(page) < 4:
            break
        after = (page[-1].team_id, page[-1].id)
    assert pages == [sorted(wanted)[:4], sorted(wanted)[4:]]


# SQLite plans without statistics: the plan is the same however many rows there are.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_sweep_reads_open_sessions_through_the_partial_index_on_sqlite(
    store: Store,
) -> None:
    from rendezvous.store.sql_store import _OPEN_SESSIONS_OF_DISABLED_OPERATORS

    plan = await store._fetch(  # type: ignore[attr-defined]
        f"EXPLAIN QUERY PLAN {_OPEN_SESSIONS_OF_DISABLED_OPERATORS}", INSTANCE, "", "", 1000
    )
    details = " | ".join(str(row[3]) for row in plan)
    assert "SEARCH s USING INDEX sessions_open_team_operator" in details, details


def _reads_of(node: dict[str, Any], relation: str) -> list[dict[str, Any]]:
    found = [node] if node.get("Relation Name") == relation else []
    for child in node.get("Plans", []):
        found += _reads_of(child, relation)
    return found


# PostgreSQL, after ANALYZE with a disabled operator's long history (20,000 ended sessions) and
# a few open ones: only the open rows are read, from the partial index.
@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_the_sweep_reads_only_open_sessions_on_postgres(store: Store) -> None:
    from rendezvous.store.sql_store import _OPEN_SESSIONS_OF_DISABLED_OPERATORS

    team = await _team(store)
    agent = await _connected_agent(store, team, "web-1", INSTANCE)
    gone = await _operator(store, team, disabled=True)
    await store._execute(  # type: ignore[attr-defined]
        """INSERT INTO sessions (id, team_id, agent_id, operator_id, operator_key_thumbprint,
               mode, command, relay_id, relay_host, relay_port, policy_result, state,
               created_at, expires_at, updated_at)
           SELECT 'ses_old' || i, $1, $2, $3, 'jkt', 'exec', NULL, 'r', 'h', 1, 'allow',
               'ended', i, i, i
           FROM generate_series(1, 20000) i""",
        team, agent, gone,
    )  # fmt: skip
    for _ in range(5):
        await _session(store, team, agent, NOW, operator_id=gone, state=SessionState.ACCEPTED)
    await store._execute("ANALYZE")  # type: ignore[attr-defined]
    async with store._transaction() as session:  # type: ignore[attr-defined]
        rows = await session.fetch(
            f"EXPLAIN (ANALYZE, FORMAT JSON) {_OPEN_SESSIONS_OF_DISABLED_OPERATORS}",
            INSTANCE, "", "", 1000,
        )  # fmt: skip
    plan = json.loads(rows[0]["QUERY PLAN"])[0]["Plan"]
    [read] = _reads_of(plan, "sessions")
    assert read.get("Index Name") == "sessions_open_team_operator", plan
    assert read["Actual Rows"] == 5, plan
