"""The reads every authenticated request makes, and the cheap ways backends run them.

``token_holder`` and ``agent_listing`` each answer in one query what used to take two; SQLite
runs such reads on the event loop on a read-only connection, falling back to a worker thread
when the database is busy; PostgreSQL keeps idle connections on a trio-side shelf and must never
shelve one a failed or cancelled statement may have left unusable.
"""

from __future__ import annotations

import secrets
import sqlite3
from pathlib import Path

import pytest
import trio

from rendezvous.credentials import hash_secret
from rendezvous.store import Store, StoredPolicyBundle, StoreError, open_store
from rendezvous.store.base import new_id
from rendezvous.store.sqlite import _InlineReadSession, _LockedSession
from tests.pg_cluster import PostgresCluster

pytestmark = pytest.mark.anyio
NOW = 1_800_000_000.0


async def _team_with_operator(store: Store) -> tuple[str, str]:
    team = await store.create_team(f"ops-{new_id('t')}", NOW)
    code = hash_secret(new_id("inv"))
    await store.create_invite(team.id, "op@example.test", "operator", code, NOW + 60, "t", NOW)
    operator, _ = await store.enroll_operator(code, NOW, secrets.token_bytes(32), new_id("thumb"))
    return team.id, operator.id


async def _register(store: Store, team_id: str, name: str) -> str:
    secret = hash_secret(new_id("rk"))
    await store.create_registration_key(team_id, secret, ["prod"], NOW + 60, "t", NOW)
    public_key = secrets.token_bytes(32)
    agent, _ = await store.register_agent(
        secret, NOW, public_key, f"SHA256:{name}", "machine", name, name
    )
    return agent.id


def _bundle(team_id: str, version: int) -> StoredPolicyBundle:
    return StoredPolicyBundle(
        team_id=team_id, version=version, content_sha256=f"{version:064x}",
        policy_sha256="0" * 64, bundle=f'{{"v": {version}}}', admin_key_id="kid",
        created_by="op_1", created_at=NOW,
    )  # fmt: skip


async def test_token_holder_reports_the_operator_and_a_clean_token(store: Store) -> None:
    team, operator_id = await _team_with_operator(store)
    holder = await store.token_holder(team, operator_id, "jti-1")
    assert holder.operator == await store.get_operator(team, operator_id)
    assert holder.token_revoked is False


async def test_token_holder_reports_a_revoked_token(store: Store) -> None:
    team, operator_id = await _team_with_operator(store)
    await store.revoke_token(team, "jti-1", NOW + 60, NOW)
    holder = await store.token_holder(team, operator_id, "jti-1")
    assert holder.token_revoked is True
    assert holder.operator is not None
    assert (await store.token_holder(team, operator_id, "jti-2")).token_revoked is False


async def test_token_holder_does_not_find_an_operator_of_another_team(store: Store) -> None:
    _, operator_id = await _team_with_operator(store)
    other_team, _ = await _team_with_operator(store)
    holder = await store.token_holder(other_team, operator_id, "jti-1")
    assert holder.operator is None
    assert holder.token_revoked is False


async def test_token_holder_sees_a_disabled_operator(store: Store) -> None:
    team, operator_id = await _team_with_operator(store)
    await store.disable_operator(team, operator_id, NOW + 1)
    holder = await store.token_holder(team, operator_id, "jti-1")
    assert holder.operator is not None and not holder.operator.is_active()
    assert holder.operator.tokens_valid_after == NOW + 1


async def test_agent_listing_of_an_empty_team_without_policy(store: Store) -> None:
    team, _ = await _team_with_operator(store)
    listing = await store.agent_listing(team)
    assert listing.policy_version == 0
    assert listing.agents == []


async def test_agent_listing_matches_list_agents_and_the_newest_policy(store: Store) -> None:
    team, _ = await _team_with_operator(store)
    other_team, _ = await _team_with_operator(store)
    for name in ("web-2", "db-1", "web-1"):
        await _register(store, team, name)
    await _register(store, other_team, "elsewhere")
    await store.store_policy_bundle(_bundle(team, 1))
    await store.store_policy_bundle(_bundle(team, 2))
    listing = await store.agent_listing(team)
    assert listing.policy_version == 2
    assert listing.agents == await store.list_agents(team)
    assert [agent.name for agent in listing.agents] == ["db-1", "web-1", "web-2"]
    assert (await store.agent_listing(other_team)).policy_version == 0


async def test_token_holder_and_agent_listing_answer_as_the_two_reads_do(store: Store) -> None:
    team, operator_id = await _team_with_operator(store)
    other_team, other_operator = await _team_with_operator(store)
    for name in ("web-2", "db-1"):
        await _register(store, team, name)
    await _register(store, other_team, "elsewhere")
    for version in (1, 2, 3):
        await store.store_policy_bundle(_bundle(team, version))
    await store.revoke_token(team, "jti-revoked", NOW + 60, NOW)
    for jti in ("jti-1", "jti-revoked"):
        holder, listing = await store.token_holder_and_agent_listing(team, operator_id, jti)
        assert holder == await store.token_holder(team, operator_id, jti)
        assert listing == await store.agent_listing(team)
        assert [agent.name for agent in listing.agents] == ["db-1", "web-2"]
        assert listing.policy_version == 3
    # Another team's operator named with this team: no holder (the caller refuses the token).
    holder, _ = await store.token_holder_and_agent_listing(team, other_operator, "jti-1")
    assert holder.operator is None


async def test_token_holder_and_agent_listing_of_a_team_without_agents(store: Store) -> None:
    team, operator_id = await _team_with_operator(store)
    await store.disable_operator(team, operator_id, NOW + 1)
    holder, listing = await store.token_holder_and_agent_listing(team, operator_id, "jti-1")
    assert holder.operator is not None and not holder.operator.is_active()
    assert listing.agents == [] and listing.policy_version == 0


async def test_sqlite_inline_read_sees_a_write_committed_a_moment_before(tmp_path: Path) -> None:
    async with open_store(tmp_path / "r.db") as store:
        team, operator_id = await _team_with_operator(store)
        assert (await store.token_holder(team, operator_id, "jti-1")).token_revoked is False
        await store.revoke_token(team, "jti-1", NOW + 60, NOW)
        assert (await store.token_holder(team, operator_id, "jti-1")).token_revoked is True


async def test_sqlite_inline_read_sees_a_write_committed_by_another_process(
    tmp_path: Path,
) -> None:
    path = tmp_path / "r.db"
    async with open_store(path) as store:
        team, operator_id = await _team_with_operator(store)
        assert (await store.token_holder(team, operator_id, "jti-1")).token_revoked is False
        # Another process's connection, as a second instance on the same file would have.
        other = sqlite3.connect(path, isolation_level=None)
        other.execute(
            "INSERT INTO revoked_tokens (jti, team_id, expires_at, revoked_at) "
            "VALUES ('jti-1', ?, ?, ?)",
            (team, NOW + 60, NOW),
        )
        other.close()
        assert (await store.token_holder(team, operator_id, "jti-1")).token_revoked is True


async def test_sqlite_inline_read_that_finds_the_database_busy_is_run_in_a_thread(
    tmp_path: Path,
) -> None:
    """A busy answer to an inline read sends the statement to the shared connection instead.

    While the store is open, SQLite's WAL mode never lets another connection lock readers out,
    so the busy reader here is a connection to a second file that another connection holds
    exclusively (a rollback-journal database), as a reader would see during WAL recovery.
    """
    async with open_store(tmp_path / "r.db") as store:
        team, operator_id = await _team_with_operator(store)
        locked = tmp_path / "locked.db"
        locker = sqlite3.connect(locked, isolation_level=None)
        locker.execute("CREATE TABLE x (y)")
        locker.execute("BEGIN EXCLUSIVE")
        busy_reader = sqlite3.connect(locked, isolation_level=None, timeout=0)
        busy_reader.execute("PRAGMA busy_timeout = 0")
        session = _InlineReadSession(busy_reader, _LockedSession(store))  # type: ignore[arg-type]
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            busy_reader.execute("SELECT 1 FROM x").fetchall()
        with trio.fail_after(5):
            rows = await session.fetch("SELECT email FROM operators WHERE id = $1", operator_id)
        assert [row["email"] for row in rows] == ["op@example.test"]
        locker.execute("ROLLBACK")
        locker.close()
        busy_reader.close()
        assert team


async def test_sqlite_inline_read_session_refuses_to_write(tmp_path: Path) -> None:
    async with open_store(tmp_path / "r.db") as store:
        async with store._read() as session:  # type: ignore[attr-defined]
            with pytest.raises(StoreError):
                await session.execute("DELETE FROM teams")
            with pytest.raises(StoreError):
                await session.fetch("DELETE FROM teams RETURNING id")


@pytest.mark.postgres
async def test_postgres_statement_cancelled_midway_does_not_break_later_statements(
    postgres_cluster: PostgresCluster,
) -> None:
    database_url = postgres_cluster.create_database(f"shelf_{new_id('db')[3:]}")
    async with open_store(database_url) as store:
        team, operator_id = await _team_with_operator(store)
        for _ in range(3):
            with trio.move_on_after(0.05):
                await store._fetch("SELECT pg_sleep(5)")  # type: ignore[attr-defined]
            with trio.fail_after(10):
                holder = await store.token_holder(team, operator_id, "jti-1")
            assert holder.operator is not None
        for connection in store._shelf:  # type: ignore[attr-defined]
            assert not connection.is_closed() and not connection.is_in_transaction()


async def test_refused_statement_leaves_its_connection_usable(store: Store) -> None:
    team, _ = await _team_with_operator(store)
    for _ in range(8):
        with pytest.raises(StoreError):
            await store.create_team((await store.get_team(team)).name, NOW)  # type: ignore[union-attr]
        assert (await store.get_team(team)) is not None
