"""Pruning keeps the sessions an agent away since still has spooled events for (both backends),
and each prune batch deletes by primary key (SQLite's plan does not walk the team's index)."""

from __future__ import annotations

import sqlite3

import pytest

from rendezvous.store import SessionState, Store, sql_store
from rendezvous.store.base import PrunedHistory
from tests.rendezvous.test_retention_store import CUTOFF, NOW, OLD, _agent, _session

pytestmark = pytest.mark.anyio


async def test_session_of_an_agent_away_since_it_ended_is_kept_until_the_agent_returns(
    store: Store,
) -> None:
    team, agent = await _agent(store, "ops")
    # Seen before the session ended (ended by an admin while the agent was away): its spool
    # still holds the session's signed events, which need the row.
    await store.touch_agent(team, agent, OLD - 10)
    waiting = await _session(store, team, agent, SessionState.ENDED)
    assert await store.prunable_history(team, CUTOFF) == PrunedHistory()
    assert await store.prune_history(team, CUTOFF, 100) == PrunedHistory()
    assert await store.get_session(team, waiting) is not None

    # Back: it connected after the session's last change, so its spool has been offered.
    await store.mark_agent_connected(team, agent, "inst", "conn-1", "m", NOW)
    assert await store.prunable_history(team, CUTOFF) == PrunedHistory(sessions=1)
    assert await store.prune_history(team, CUTOFF, 100) == PrunedHistory(sessions=1)
    assert await store.get_session(team, waiting) is None


async def test_session_of_a_removed_agent_is_pruned_even_if_it_never_returned(
    store: Store,
) -> None:
    team, agent = await _agent(store, "ops")
    never_back = await _session(store, team, agent, SessionState.REFUSED)
    assert await store.prunable_history(team, CUTOFF) == PrunedHistory()
    await store.remove_agent(team, agent, NOW)
    assert await store.prune_history(team, CUTOFF, 100) == PrunedHistory(sessions=1)
    assert await store.get_session(team, never_back) is None


def test_sqlite_prune_batches_delete_by_primary_key() -> None:
    from rendezvous.store.migrations import sqlite as migrations

    connection = sqlite3.connect(":memory:")
    for migration in migrations.MIGRATIONS:
        for statement in migration.statements:
            connection.execute(statement)
    for delete in (sql_store._PRUNE_APPROVALS_BATCH, sql_store._PRUNE_SESSIONS_BATCH):
        query = delete.replace("$1", "?1").replace("$2", "?2").replace("$3", "?3")
        plan = [row[3] for row in connection.execute("EXPLAIN QUERY PLAN " + query, ("t", 1.0, 5))]
        outer = plan[0]
        assert (
            "USING INTEGER PRIMARY KEY" in outer
            or "USING PRIMARY KEY" in outer
            or ("sqlite_autoindex" in outer)
        ), plan
