"""The agent listing a page at a time (``AgentQuery``): keyset pages in (name, id) order, tag,
online and name-prefix filters, and the team boundary; on SQLite and PostgreSQL.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from rendezvous.credentials import hash_secret
from rendezvous.store import AgentQuery, InvalidArgument, Store, StoredPolicyBundle
from rendezvous.store.base import Agent, new_id

pytestmark = pytest.mark.anyio
NOW = 1_800_000_000.0


async def _team(store: Store) -> str:
    return (await store.create_team(f"ops-{new_id('t')}", NOW)).id


async def _register(store: Store, team_id: str, name: str, tags: tuple[str, ...] = ()) -> Agent:
    secret = hash_secret(new_id("rk"))
    await store.create_registration_key(team_id, secret, list(tags), NOW + 60, "t", NOW)
    public_key = secrets.token_bytes(32)
    agent, _ = await store.register_agent(
        secret, NOW, public_key, f"SHA256:{public_key.hex()[:8]}", "machine", name, name
    )
    return agent


async def _all_pages(store: Store, team_id: str, query: AgentQuery) -> list[Agent]:
    listed: list[Agent] = []
    while True:
        listing = await store.agent_listing(team_id, query)
        assert len(listing.agents) <= (query.limit or len(listing.agents))
        listed += listing.agents
        if not listing.more:
            return listed
        last = listing.agents[-1]
        query = AgentQuery(
            limit=query.limit, after=(last.name, last.id), tags=query.tags,
            online=query.online, name_prefix=query.name_prefix,
        )  # fmt: skip


def _key(agent: Agent) -> tuple[str, str]:
    return agent.name, agent.id


async def test_pages_list_every_agent_once_in_name_then_id_order(store: Store) -> None:
    team = await _team(store)
    # Repeated names: the id decides their order, also across a page boundary.
    for name in ["web-2", "db-1", "web-1", "web-1", "web-1", "cache", "web-1", "db-1"]:
        await _register(store, team, name)
    everyone = await store.list_agents(team)
    for limit in (1, 2, 3, 7, 8, 1000):
        listed = await _all_pages(store, team, AgentQuery(limit=limit))
        assert listed == everyone, limit
    assert [_key(agent) for agent in everyone] == sorted(_key(agent) for agent in everyone)
    whole = await store.agent_listing(team, AgentQuery(limit=8))
    assert whole.agents == everyone and not whole.more


async def test_agents_added_between_pages_appear_once_when_they_sort_after_the_cursor(
    store: Store,
) -> None:
    team = await _team(store)
    for index in range(6):
        await _register(store, team, f"m-{index}")
    first = await store.agent_listing(team, AgentQuery(limit=3))
    assert [agent.name for agent in first.agents] == ["m-0", "m-1", "m-2"] and first.more
    await _register(store, team, "a-early")  # sorts before the cursor: not on later pages
    late = await _register(store, team, "z-late")
    last = first.agents[-1]
    rest = await _all_pages(store, team, AgentQuery(limit=3, after=(last.name, last.id)))
    assert [agent.name for agent in rest] == ["m-3", "m-4", "m-5", "z-late"]
    assert rest[-1] == late
    seen = [agent.id for agent in first.agents + rest]
    assert len(seen) == len(set(seen))


async def test_a_position_from_another_team_lists_only_the_callers_agents(store: Store) -> None:
    team_a, team_b = await _team(store), await _team(store)
    secret_a = await _register(store, team_a, "a-secret")
    b_agents = [await _register(store, team_b, name) for name in ("b-1", "b-2")]
    for after in ((secret_a.name, secret_a.id), ("0", "0")):
        listing = await store.agent_listing(team_b, AgentQuery(limit=10, after=after))
        assert listing.agents == b_agents
    # A position past the team's last agent is an empty last page, not another team's agents.
    empty = await store.agent_listing(team_b, AgentQuery(limit=10, after=("zzz", "zzz")))
    assert empty.agents == [] and not empty.more


async def test_filters_by_tags_online_state_and_name_prefix(store: Store) -> None:
    team = await _team(store)
    web_prod = await _register(store, team, "web-1", ("web", "prod"))
    web_dev = await _register(store, team, "web-2", ("web", "dev"))
    db_prod = await _register(store, team, "db-1", ("db", "prod"))
    underscore = await _register(store, team, "web_x", ("web",))
    await store.mark_agent_connected(
        team_id=team, agent_id=web_dev.id, instance_id="i-1", connection_id="c-1",
        machine_fingerprint="machine", now=NOW,
    )  # fmt: skip
    web_dev = await store.get_agent(team, web_dev.id)
    assert web_dev is not None and web_dev.online

    async def names(**filters: object) -> list[str]:
        query = AgentQuery(limit=2, **filters)  # type: ignore[arg-type]
        return [agent.name for agent in await _all_pages(store, team, query)]

    assert await names(tags=("web",)) == ["web-1", "web-2", "web_x"]
    assert await names(tags=("web", "prod")) == ["web-1"]
    assert await names(tags=("prod", "web", "prod")) == ["web-1"]
    assert await names(tags=("prod",)) == ["db-1", "web-1"]
    assert await names(tags=("nope",)) == []
    assert await names(online=True) == ["web-2"]
    assert await names(online=False) == ["db-1", "web-1", "web_x"]
    assert await names(name_prefix="web") == ["web-1", "web-2", "web_x"]
    assert await names(name_prefix="web_") == ["web_x"]  # "_" is a character, not a wildcard
    assert await names(name_prefix="web-1") == ["web-1"]
    assert await names(name_prefix="WEB") == []
    assert await names(name_prefix="web", tags=("web",), online=False) == ["web-1", "web_x"]
    listing = await store.agent_listing(team, AgentQuery(tags=("web", "prod")))
    assert listing.agents == [web_prod] and not listing.more
    assert (await store.agent_listing(team, AgentQuery(tags=("db",)))).agents == [db_prod]
    assert underscore.name == "web_x"


async def test_a_page_with_no_agents_still_reports_the_policy_version(store: Store) -> None:
    team = await _team(store)
    await _register(store, team, "web-1")
    await store.store_policy_bundle(
        StoredPolicyBundle(
            team_id=team, version=1, content_sha256="1" * 64, policy_sha256="0" * 64,
            bundle='{"v": 1}', admin_key_id="kid", created_by="op_1", created_at=NOW,
        )
    )  # fmt: skip
    listing = await store.agent_listing(team, AgentQuery(limit=5, name_prefix="nothing"))
    assert listing.agents == [] and listing.policy_version == 1 and not listing.more


async def test_the_token_holder_query_pages_as_the_listing_does(store: Store) -> None:
    team = await _team(store)
    code = hash_secret(new_id("inv"))
    await store.create_invite(team, "op@example.test", "operator", code, NOW + 60, "t", NOW)
    operator, _ = await store.enroll_operator(code, NOW, secrets.token_bytes(32), new_id("th"))
    for name in ("c", "a", "b", "a"):
        await _register(store, team, name, ("web",))
    first = await store.agent_listing(team, AgentQuery(limit=2))
    last = first.agents[-1]
    for query in (
        AgentQuery(limit=2),
        AgentQuery(limit=2, after=(last.name, last.id)),
        AgentQuery(limit=10, tags=("web",), online=False, name_prefix="a"),
    ):
        holder, listing = await store.token_holder_and_agent_listing(
            team, operator.id, "jti-1", query
        )
        assert holder.operator == operator and not holder.token_revoked
        assert listing == await store.agent_listing(team, query)


@pytest.mark.parametrize(
    "query",
    [
        AgentQuery(limit=0),
        AgentQuery(limit=-1),
        AgentQuery(after=("", "agt_1")),
        AgentQuery(after=("web", "x" * 300)),
        AgentQuery(name_prefix=""),
        AgentQuery(tags=("",)),
        AgentQuery(tags=tuple(f"t{index}" for index in range(65))),
    ],
)
async def test_a_query_out_of_bounds_is_an_invalid_argument(
    store: Store, query: AgentQuery
) -> None:
    team = await _team(store)
    with pytest.raises(InvalidArgument):
        await store.agent_listing(team, query)


# SQLite only: PostgreSQL picks its plan by table statistics, so a plan check would be flaky there.
@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_page_after_a_cursor_is_read_from_the_list_order_index(store: Store) -> None:
    from rendezvous.store.sql_store import _agent_listing_statement

    query = AgentQuery(limit=500, after=("web-1", "agt_1"))
    sql, values = _agent_listing_statement(
        query, with_holder=True, carries_tags=store._agent_carries_tags  # type: ignore[attr-defined]
    )
    plan = await store._fetch(f"EXPLAIN QUERY PLAN {sql}", "tm_1", "op_1", "jti", *values)  # type: ignore[attr-defined]
    details = " | ".join(str(row[3]) for row in plan)
    assert "agents_team_name_id (team_id=? AND name>?)" in details, details


PlanNode = dict[str, Any]


def _plan_nodes(
    node: PlanNode, ancestors: tuple[str, ...] = ()
) -> list[tuple[tuple[str, ...], PlanNode]]:
    """Every node of a JSON EXPLAIN plan with the node types above it, outermost first."""
    found = [(ancestors, node)]
    for child in node.get("Plans", []):
        found += _plan_nodes(child, (*ancestors, str(node["Node Type"])))
    return found


# PostgreSQL only, after ANALYZE with one team holding nearly every agent (the self-hosted
# case): the planner has the statistics it would have in production, and a team this size
# makes a full read and sort cost far more than reading one page from the index.
@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
@pytest.mark.parametrize("plan_cache_mode", ["force_custom_plan", "force_generic_plan"])
async def test_a_page_of_a_big_team_reads_only_that_page_from_the_index_on_postgres(
    store: Store, plan_cache_mode: str
) -> None:
    import json as json_module

    from rendezvous.store.sql_store import _agent_listing_statement

    team, small_team = await _team(store), await _team(store)
    for team_id, count in ((team, 3000), (small_team, 10)):
        key_hash = hash_secret(new_id("rk"))
        key = await store.create_registration_key(team_id, key_hash, [], NOW + 60, "t", NOW)
        await store._execute(  # type: ignore[attr-defined]
            """INSERT INTO agents (id, team_id, name, hostname, tags, public_key,
                   key_fingerprint, machine_fingerprint, registration_key_id, registered_at)
               SELECT 'agt_' || md5($1 || i), $1, 'host-' || lpad(i::text, 5, '0'), 'h', '[]',
                   decode(md5($1 || i), 'hex'), 'fp', 'machine', $2, $3
               FROM generate_series(1, $4) i""",
            team_id, key.id, NOW, count,
        )  # fmt: skip
    await store._execute("ANALYZE agents")  # type: ignore[attr-defined]
    limit = 100
    for query in (AgentQuery(limit=limit), AgentQuery(limit=limit, after=("host-01500", "agt"))):
        for with_holder in (True, False):
            sql, values = _agent_listing_statement(
                query, with_holder=with_holder,
                carries_tags=store._agent_carries_tags,  # type: ignore[attr-defined]
                page_apart=store._agent_page_apart,  # type: ignore[attr-defined]
            )  # fmt: skip
            holder = ["op_1", "jti"] if with_holder else []
            arguments = ", ".join(
                str(value) if isinstance(value, int) else "'" + value.replace("'", "''") + "'"
                for value in (team, *holder, *values)
            )
            # A prepared statement, as asyncpg runs it: planned for the values given the first
            # times, then (force_generic_plan) once for any values.
            async with store._transaction() as session:  # type: ignore[attr-defined]
                await session.execute(f"SET LOCAL plan_cache_mode = {plan_cache_mode}")
                await session.execute(f"PREPARE listing AS {sql}")
                try:
                    rows = await session.fetch(
                        f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE listing({arguments})"
                    )
                finally:
                    await session.execute("DEALLOCATE listing")
            plan = json_module.loads(rows[0]["QUERY PLAN"])[0]["Plan"]
            agent_reads = [
                (ancestors, node)
                for ancestors, node in _plan_nodes(plan)
                if node.get("Relation Name") == "agents"
            ]
            assert len(agent_reads) == 1, plan
            ancestors, read = agent_reads[0]
            assert read.get("Index Name") == "agents_team_name_id", plan
            # Read in order until the page is full: no sort between the index and the limit,
            # and one row more than the page read, not the 3,000 of the team.
            assert ancestors[-1] == "Limit", plan
            assert read["Actual Rows"] == limit + 1, plan
