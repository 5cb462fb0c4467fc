"""Store behaviour for registration keys, agent registration, the registry and control channels.

Every test runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import os

import pytest
import trio

from rendezvous.store import (
    AlreadyExists,
    AmbiguousName,
    InvalidArgument,
    NotFound,
    RegistrationKeyUnusable,
    Session,
    SessionState,
    Store,
    Team,
    UnusableReason,
    open_store,
)
from rendezvous.store.base import CONNECTION_STALE_AFTER_SECONDS, Agent

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000.0
HOUR = 3600.0


def key_hash(secret: str) -> bytes:
    """How the service hashes a registration key before the store sees it."""
    return hashlib.sha256(secret.encode()).digest()


async def register(
    store: Store,
    secret: str,
    name: str = "web-1",
    now: float = NOW,
    machine: str = "machine-1",
    expected_team_id: str | None = None,
) -> Agent:
    public_key = os.urandom(32)
    agent, _ = await store.register_agent(
        key_hash(secret), now, public_key, "SHA256:" + public_key.hex()[:16], machine,
        name + ".example.com", name, expected_team_id=expected_team_id,
    )  # fmt: skip
    return agent


async def team_with_key(store: Store, secret: str, name: str = "ops",
                        tags: tuple[str, ...] = ("prod",), ttl: float = HOUR) -> Team:
    team = await store.get_team_by_name(name) or await store.create_team(name, NOW)
    await store.create_registration_key(team.id, key_hash(secret), tags, NOW + ttl, "op_admin",
                                        NOW)
    return team


# ---- registration keys ---------------------------------------------------------------------


async def test_registration_key_is_stored_hashed_with_a_public_id(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    created = await store.create_registration_key(team.id, key_hash("rk_live_secret"),
                                                  ["db", "prod"], NOW + HOUR, "op_admin", NOW)
    assert created.id.startswith("rk_") and not created.id.startswith("rk_live_")
    assert created.tags == ("db", "prod") and created.is_usable(NOW)
    assert "rk_live_secret" not in repr(created)
    assert await store.get_registration_key(team.id, created.id) == created
    assert await store.list_registration_keys(team.id) == [created]


async def test_registration_key_for_unknown_team_is_refused(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.create_registration_key("tm_nope", key_hash("k"), [], NOW + 1, "op", NOW)


async def test_registration_key_hashes_are_unique(store: Store) -> None:
    await team_with_key(store, "k")
    with pytest.raises(AlreadyExists):
        await team_with_key(store, "k")


async def test_tags_must_be_a_list_of_short_strings(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    with pytest.raises(InvalidArgument):
        await store.create_registration_key(team.id, key_hash("k"), "prod", NOW + 1, "op", NOW)
    with pytest.raises(InvalidArgument):
        await store.create_registration_key(team.id, key_hash("k"), [""], NOW + 1, "op", NOW)
    with pytest.raises(InvalidArgument):
        await store.create_registration_key(team.id, key_hash("k"), ["t"] * 1000, NOW + 1, "op",
                                            NOW)


async def test_revoking_a_registration_key_is_idempotent(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    key = await store.create_registration_key(team.id, key_hash("k"), [], NOW + HOUR, "op", NOW)
    revoked = await store.revoke_registration_key(team.id, key.id, NOW + 5)
    assert revoked.revoked_at == NOW + 5 and revoked.unusable_reason(NOW) is UnusableReason.REVOKED
    again = await store.revoke_registration_key(team.id, key.id, NOW + 9)
    assert again.revoked_at == NOW + 5


# ---- registration --------------------------------------------------------------------------


async def test_registration_creates_the_agent_and_uses_up_the_key(store: Store) -> None:
    team = await team_with_key(store, "rk_live_1", tags=("db", "prod"))
    public_key = os.urandom(32)
    agent, key = await store.register_agent(
        key_hash("rk_live_1"), NOW + 1, public_key, "SHA256:abc", "machine-1", "db1.example.com",
        "db1",
    )  # fmt: skip
    assert agent.id.startswith("agt_")
    assert (agent.team_id, agent.name, agent.hostname) == (team.id, "db1", "db1.example.com")
    assert agent.tags == ("db", "prod")  # from the key, set by the admin
    assert (agent.public_key, agent.key_fingerprint, agent.machine_fingerprint) == (
        public_key, "SHA256:abc", "machine-1")
    assert agent.registration_key_id == key.id and agent.registered_at == NOW + 1
    assert not agent.online and agent.last_seen_at is None
    assert key.used_at == NOW + 1 and key.used_by_agent == agent.id
    assert await store.get_agent(team.id, agent.id) == agent
    assert await store.get_agent_by_public_key(public_key) == agent
    assert (await store.get_registration_key(team.id, key.id)) == key


async def test_reused_registration_key_is_refused(store: Store) -> None:
    team = await team_with_key(store, "k")
    await register(store, "k")
    with pytest.raises(RegistrationKeyUnusable) as refused:
        await register(store, "k", name="web-2")
    assert refused.value.reason is UnusableReason.USED
    assert len(await store.list_agents(team.id)) == 1


async def test_expired_registration_key_is_refused(store: Store) -> None:
    team = await team_with_key(store, "k", ttl=60)
    with pytest.raises(RegistrationKeyUnusable) as refused:
        await register(store, "k", now=NOW + 60)
    assert refused.value.reason is UnusableReason.EXPIRED
    assert await store.list_agents(team.id) == []


async def test_revoked_registration_key_is_refused(store: Store) -> None:
    team = await team_with_key(store, "k")
    [key] = await store.list_registration_keys(team.id)
    await store.revoke_registration_key(team.id, key.id, NOW)
    with pytest.raises(RegistrationKeyUnusable) as refused:
        await register(store, "k")
    assert refused.value.reason is UnusableReason.REVOKED
    assert await store.list_agents(team.id) == []


async def test_unknown_registration_key_is_refused(store: Store) -> None:
    with pytest.raises(RegistrationKeyUnusable) as refused:
        await register(store, "never issued")
    assert refused.value.reason is UnusableReason.UNKNOWN


async def test_other_teams_registration_key_is_refused_as_unknown(store: Store) -> None:
    await team_with_key(store, "key-of-a", name="a")
    team_b = await store.create_team("b", NOW)
    with pytest.raises(RegistrationKeyUnusable) as refused:
        await register(store, "key-of-a", expected_team_id=team_b.id)
    assert refused.value.reason is UnusableReason.UNKNOWN
    team_a = await store.get_team_by_name("a")
    assert team_a is not None
    [key] = await store.list_registration_keys(team_a.id)
    assert key.is_usable(NOW)  # the refused attempt did not burn it


async def test_registering_a_known_public_key_again_leaves_the_key_unused(store: Store) -> None:
    team = await team_with_key(store, "k1")
    await store.create_registration_key(team.id, key_hash("k2"), [], NOW + HOUR, "op", NOW)
    public_key = os.urandom(32)
    await store.register_agent(key_hash("k1"), NOW, public_key, "fp", "m", "h", "n")
    with pytest.raises(AlreadyExists):
        await store.register_agent(key_hash("k2"), NOW, public_key, "fp", "m", "h", "n")
    agent = await register(store, "k2", name="other")
    assert agent.name == "other"


async def test_concurrent_registrations_with_one_key_register_exactly_one_agent(
    database_url: str,
) -> None:
    outcomes: list[str] = []
    async with open_store(database_url) as first, open_store(database_url) as second:
        team = await team_with_key(first, "rk_live_race")

        async def attempt(instance: Store, index: int) -> None:
            try:
                await register(instance, "rk_live_race", name=f"racer-{index}")
                outcomes.append("registered")
            except RegistrationKeyUnusable as refused:
                outcomes.append(refused.reason.value)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for index in range(10):
                    nursery.start_soon(attempt, (first, second)[index % 2], index)
        assert sorted(outcomes) == ["registered"] + ["used"] * 9
        [agent] = await second.list_agents(team.id)
        [key] = await second.list_registration_keys(team.id)
        assert key.used_by_agent == agent.id


# ---- the registry --------------------------------------------------------------------------


async def test_agents_are_listed_by_name_within_their_team(store: Store) -> None:
    team = await store.create_team("ops", NOW)
    for index, name in enumerate(["web-2", "db-1", "web-1"]):
        await store.create_registration_key(team.id, key_hash(f"k{index}"), [], NOW + HOUR, "op",
                                            NOW)
        await register(store, f"k{index}", name=name)
    assert [agent.name for agent in await store.list_agents(team.id)] == ["db-1", "web-1",
                                                                          "web-2"]


async def test_agent_is_found_by_id_or_unique_name(store: Store) -> None:
    team = await team_with_key(store, "k1")
    await store.create_registration_key(team.id, key_hash("k2"), [], NOW + HOUR, "op", NOW)
    await store.create_registration_key(team.id, key_hash("k3"), [], NOW + HOUR, "op", NOW)
    first = await register(store, "k1", name="web")
    assert await store.find_agent(team.id, "web") == first
    assert await store.find_agent(team.id, first.id) == first
    assert await store.find_agent(team.id, "nobody") is None
    second = await register(store, "k2", name="web")
    with pytest.raises(AmbiguousName):
        await store.find_agent(team.id, "web")
    assert await store.find_agent(team.id, second.id) == second


async def test_team_a_agents_are_invisible_through_team_b(store: Store) -> None:
    team_a = await team_with_key(store, "ka", name="a")
    team_b = await team_with_key(store, "kb", name="b")
    agent_a = await register(store, "ka", name="secret-host")
    agent_b = await register(store, "kb", name="b-host")
    assert [agent.id for agent in await store.list_agents(team_b.id)] == [agent_b.id]
    assert await store.get_agent(team_b.id, agent_a.id) is None
    assert await store.find_agent(team_b.id, agent_a.id) is None
    assert await store.find_agent(team_b.id, "secret-host") is None
    assert await store.list_agent_connections(team_b.id, agent_a.id) == []
    with pytest.raises(NotFound):
        await store.mark_agent_connected(team_b.id, agent_a.id, "i", "c", "machine-1", NOW)
    await store.touch_agent(team_b.id, agent_a.id, NOW + 50)
    await store.mark_agent_disconnected(team_b.id, agent_a.id, "c", NOW + 50)
    assert (await store.get_agent(team_a.id, agent_a.id)) == agent_a  # untouched
    [key_a] = await store.list_registration_keys(team_a.id)
    assert await store.get_registration_key(team_b.id, key_a.id) is None
    with pytest.raises(NotFound):
        await store.revoke_registration_key(team_b.id, key_a.id, NOW)


# ---- control channel -----------------------------------------------------------------------


async def test_connected_agent_is_online_until_it_disconnects(store: Store) -> None:
    team = await team_with_key(store, "k")
    agent = await register(store, "k", machine="machine-1")
    report = await store.mark_agent_connected(team.id, agent.id, "inst-1", "conn-1", "machine-1",
                                              NOW + 10)
    assert not report.clone_suspected
    online = await store.get_agent(team.id, agent.id)
    assert online is not None and online.online and online.last_seen_at == NOW + 10
    [connection] = await store.list_agent_connections(team.id, agent.id)
    assert (connection.instance_id, connection.connection_id) == ("inst-1", "conn-1")
    await store.touch_agent(team.id, agent.id, NOW + 20)
    await store.mark_agent_disconnected(team.id, agent.id, "conn-1", NOW + 30)
    await store.mark_agent_disconnected(team.id, agent.id, "conn-1", NOW + 30)  # idempotent
    offline = await store.get_agent(team.id, agent.id)
    assert offline is not None and not offline.online and offline.last_seen_at == NOW + 30


async def test_last_seen_never_moves_backwards(store: Store) -> None:
    team = await team_with_key(store, "k")
    agent = await register(store, "k")
    await store.touch_agent(team.id, agent.id, NOW + 20)
    await store.touch_agent(team.id, agent.id, NOW + 5)
    seen = await store.get_agent(team.id, agent.id)
    assert seen is not None and seen.last_seen_at == NOW + 20


async def test_second_live_connection_is_reported_as_a_clone(store: Store) -> None:
    team = await team_with_key(store, "k")
    agent = await register(store, "k", machine="machine-1")
    await store.mark_agent_connected(team.id, agent.id, "inst-1", "conn-1", "machine-1", NOW)
    report = await store.mark_agent_connected(team.id, agent.id, "inst-2", "conn-2", "machine-1",
                                              NOW + 1)
    assert report.clone_suspected and not report.fingerprint_mismatch
    assert [c.connection_id for c in report.other_connections] == ["conn-1"]
    assert len(await store.list_agent_connections(team.id, agent.id)) == 2


async def test_other_machine_fingerprint_is_reported_as_a_clone(store: Store) -> None:
    team = await team_with_key(store, "k")
    agent = await register(store, "k", machine="machine-1")
    report = await store.mark_agent_connected(team.id, agent.id, "inst-1", "conn-1", "machine-2",
                                              NOW)
    assert report.clone_suspected and report.fingerprint_mismatch
    assert (report.registered_fingerprint, report.presented_fingerprint) == ("machine-1",
                                                                             "machine-2")
    assert report.other_connections == ()


@pytest.mark.parametrize(
    ("clear", "instance"),
    [
        ("clear_instance_connections", "inst-1"),  # forget this instance's connections
        ("clear_other_instances_connections", "inst-2"),  # forget all but this instance's
    ],
)
async def test_clearing_forgets_exactly_the_named_connections(
    store: Store, clear: str, instance: str
) -> None:
    team = await team_with_key(store, "k1")
    await store.create_registration_key(team.id, key_hash("k2"), [], NOW + HOUR, "op", NOW)
    one = await register(store, "k1", name="one")
    two = await register(store, "k2", name="two")
    await store.mark_agent_connected(team.id, one.id, "inst-1", "c1", "machine-1", NOW)
    await store.mark_agent_connected(team.id, two.id, "inst-2", "c2", "machine-1", NOW)
    assert await getattr(store, clear)(instance, NOW + 40) == 1
    agents = {agent.name: agent for agent in await store.list_agents(team.id)}
    assert not agents["one"].online and agents["one"].last_seen_at == NOW + 40
    assert agents["two"].online


async def test_registrations_survive_a_restart(database_url: str) -> None:
    async with open_store(database_url) as first:
        team = await team_with_key(first, "k")
        agent = await register(first, "k")
    async with open_store(database_url) as reopened:
        assert await reopened.get_agent(team.id, agent.id) == agent
        with pytest.raises(RegistrationKeyUnusable):
            await register(reopened, "k")


async def test_connection_of_a_crashed_instance_goes_stale_instead_of_flagging_a_clone(
    store: Store,
) -> None:
    team = await team_with_key(store, "k")
    agent = await register(store, "k", machine="machine-1")
    await store.mark_agent_connected(team.id, agent.id, "crashed", "c-old", "machine-1", NOW)
    later = NOW + CONNECTION_STALE_AFTER_SECONDS + 1
    report = await store.mark_agent_connected(team.id, agent.id, "inst-2", "c-new", "machine-1",
                                              later)
    assert not report.clone_suspected
    [live] = await store.list_agent_connections(team.id, agent.id)
    assert live.connection_id == "c-new"


async def test_heartbeats_keep_a_connection_from_going_stale(store: Store) -> None:
    team = await team_with_key(store, "k")
    agent = await register(store, "k", machine="machine-1")
    await store.mark_agent_connected(team.id, agent.id, "inst-1", "c1", "machine-1", NOW)
    await store.touch_agent(team.id, agent.id, NOW + 100, connection_id="c1")
    report = await store.mark_agent_connected(team.id, agent.id, "inst-2", "c2", "machine-1",
                                              NOW + CONNECTION_STALE_AFTER_SECONDS + 1)
    assert [c.connection_id for c in report.other_connections] == ["c1"]
    assert report.other_connections[0].heartbeat_at == NOW + 100


async def test_pruning_forgets_stale_connections_so_the_agent_shows_offline(store: Store) -> None:
    team = await team_with_key(store, "k")
    agent = await register(store, "k")
    await store.mark_agent_connected(team.id, agent.id, "crashed", "c1", "machine-1", NOW)
    assert await store.prune_expired(NOW + CONNECTION_STALE_AFTER_SECONDS - 1) == 0
    assert await store.prune_expired(NOW + CONNECTION_STALE_AFTER_SECONDS) == 1
    seen = await store.get_agent(team.id, agent.id)
    assert seen is not None and not seen.online and seen.last_seen_at == NOW


# ---- a reconnect naming the connection it replaces -----------------------------------------


async def test_reconnect_naming_its_earlier_connection_supersedes_it_instead_of_a_clone(
    store: Store,
) -> None:
    team = await team_with_key(store, "k")
    agent = await register(store, "k", machine="machine-1")
    await store.mark_agent_connected(team.id, agent.id, "inst-1", "c-old", "machine-1", NOW)
    report = await store.mark_agent_connected(
        team.id, agent.id, "inst-2", "c-new", "machine-1", NOW + 5, replaces="c-old"
    )
    assert not report.clone_suspected and report.other_connections == ()
    assert report.superseded is not None
    assert (report.superseded.connection_id, report.superseded.instance_id) == ("c-old", "inst-1")
    [live] = await store.list_agent_connections(team.id, agent.id)
    assert live.connection_id == "c-new"
    # The old holder's heartbeat finds its row gone and does not bring it back.
    assert not await store.touch_agent(team.id, agent.id, NOW + 6, connection_id="c-old")
    assert await store.touch_agent(team.id, agent.id, NOW + 6, connection_id="c-new")
    await store.mark_agent_disconnected(team.id, agent.id, "c-old", NOW + 7)
    [still] = await store.list_agent_connections(team.id, agent.id)
    assert still.connection_id == "c-new"
    seen = await store.get_agent(team.id, agent.id)
    assert seen is not None and seen.online


async def test_naming_a_connection_that_is_gone_records_the_new_one_quietly(store: Store) -> None:
    team = await team_with_key(store, "k")
    agent = await register(store, "k", machine="machine-1")
    report = await store.mark_agent_connected(
        team.id, agent.id, "inst-1", "c-new", "machine-1", NOW, replaces="c-cleaned-up"
    )
    assert not report.clone_suspected and report.superseded is None
    assert [c.connection_id for c in await store.list_agent_connections(team.id, agent.id)] == [
        "c-new"
    ]


async def test_a_live_connection_not_named_is_still_reported_as_a_clone(store: Store) -> None:
    team = await team_with_key(store, "k")
    agent = await register(store, "k", machine="machine-1")
    await store.mark_agent_connected(team.id, agent.id, "inst-1", "c-0", "machine-1", NOW)
    # Two processes resumed from one memory snapshot both name c-0: the first supersedes it,
    # the second finds the first's connection, which it did not name.
    first = await store.mark_agent_connected(
        team.id, agent.id, "inst-1", "c-1", "machine-1", NOW + 1, replaces="c-0"
    )
    second = await store.mark_agent_connected(
        team.id, agent.id, "inst-2", "c-2", "machine-1", NOW + 2, replaces="c-0"
    )
    assert not first.clone_suspected
    assert second.clone_suspected and second.superseded is None
    assert [c.connection_id for c in second.other_connections] == ["c-1"]


async def test_naming_another_agents_or_teams_connection_removes_nothing(store: Store) -> None:
    team = await team_with_key(store, "k1")
    await store.create_registration_key(team.id, key_hash("k2"), [], NOW + HOUR, "op", NOW)
    other_team = await team_with_key(store, "k3", name="other")
    agent = await register(store, "k1", name="web", machine="machine-1")
    neighbour = await register(store, "k2", name="db", machine="machine-1")
    stranger = await register(store, "k3", name="far", machine="machine-1")
    await store.mark_agent_connected(team.id, agent.id, "inst-1", "c-mine", "machine-1", NOW)
    await store.mark_agent_connected(team.id, neighbour.id, "inst-1", "c-nb", "machine-1", NOW)
    await store.mark_agent_connected(other_team.id, stranger.id, "inst-1", "c-far", "machine-1",
                                     NOW)  # fmt: skip
    for named in ("c-nb", "c-far"):
        report = await store.mark_agent_connected(
            team.id, agent.id, "inst-2", f"c-via-{named}", "machine-1", NOW + 1, replaces=named
        )
        assert report.superseded is None
        assert report.clone_suspected and "c-mine" in [
            c.connection_id for c in report.other_connections
        ]
    assert len(await store.list_agent_connections(team.id, neighbour.id)) == 1
    assert len(await store.list_agent_connections(other_team.id, stranger.id)) == 1


async def test_named_connection_from_another_machine_is_not_superseded(store: Store) -> None:
    team = await team_with_key(store, "k")
    agent = await register(store, "k", machine="machine-1")
    await store.mark_agent_connected(team.id, agent.id, "inst-1", "c-old", "machine-1", NOW)
    report = await store.mark_agent_connected(
        team.id, agent.id, "inst-1", "c-new", "machine-2", NOW + 1, replaces="c-old"
    )
    assert report.superseded is None and report.fingerprint_mismatch
    assert [c.connection_id for c in report.other_connections] == ["c-old"]


async def test_a_heartbeat_says_whether_its_connection_is_still_recorded(store: Store) -> None:
    team = await team_with_key(store, "k")
    agent = await register(store, "k", machine="machine-1")
    assert not await store.touch_agent(team.id, agent.id, NOW)
    await store.mark_agent_connected(team.id, agent.id, "inst-1", "c1", "machine-1", NOW)
    assert await store.touch_agent(team.id, agent.id, NOW, connection_id="c1")  # same instant
    assert await store.touch_agent(team.id, agent.id, NOW + 1, connection_id="c1")
    assert await store.touch_agent(team.id, agent.id, NOW + 2)
    assert not await store.touch_agent(team.id, agent.id, NOW + 3, connection_id="c2")
    await store.clear_instance_connections("inst-1", NOW + 4)
    assert not await store.touch_agent(team.id, agent.id, NOW + 5, connection_id="c1")
    assert await store.list_agent_connections(team.id, agent.id) == []


# ---- removal (a tombstone) -----------------------------------------------------------------


async def test_a_removed_agent_is_gone_from_every_read_but_its_key_stays_taken(
    store: Store,
) -> None:
    team = await team_with_key(store, "k1")
    await store.create_registration_key(team.id, key_hash("k2"), [], NOW + HOUR, "op", NOW)
    await store.create_registration_key(team.id, key_hash("k3"), [], NOW + HOUR, "op", NOW)
    public_key = os.urandom(32)
    old, _ = await store.register_agent(
        key_hash("k1"), NOW, public_key, "SHA256:old", "machine-1", "web.example.com", "web"
    )
    removed, forgotten = await store.remove_agent(team.id, old.id, NOW + 5)
    assert forgotten == [] and removed.id == old.id and removed.removed_at == NOW + 5
    assert removed.is_removed() and not old.is_removed()
    assert await store.get_agent(team.id, old.id) is None
    assert await store.get_agent(team.id, old.id, include_removed=True) == removed
    assert await store.find_agent(team.id, old.id) is None
    assert await store.find_agent(team.id, "web") is None
    assert await store.list_agents(team.id) == []
    assert (await store.agent_listing(team.id)).agents == []
    # Control-channel auth still finds the key, to refuse it with the reason.
    by_key = await store.get_agent_by_public_key(public_key)
    assert by_key is not None and by_key.removed_at == NOW + 5
    # The key can never register again; the name is free for a new agent.
    with pytest.raises(AlreadyExists):
        await store.register_agent(
            key_hash("k2"), NOW + 6, public_key, "SHA256:old", "machine-1", "web.example.com",
            "web",
        )  # fmt: skip
    new = await register(store, "k3", name="web", now=NOW + 7)
    assert await store.find_agent(team.id, "web") == new
    assert [agent.id for agent in await store.list_agents(team.id)] == [new.id]


async def test_removing_an_agent_forgets_its_connections_and_refuses_new_ones(
    store: Store,
) -> None:
    team = await team_with_key(store, "k")
    agent = await register(store, "k", machine="machine-1")
    await store.mark_agent_connected(team.id, agent.id, "inst-1", "c1", "machine-1", NOW)
    await store.mark_agent_connected(team.id, agent.id, "inst-2", "c2", "machine-1", NOW + 1)
    _, forgotten = await store.remove_agent(team.id, agent.id, NOW + 2)
    assert [(c.instance_id, c.connection_id) for c in forgotten] == [
        ("inst-1", "c1"), ("inst-2", "c2"),
    ]  # fmt: skip
    assert await store.list_agent_connections(team.id, agent.id) == []
    assert not await store.touch_agent(team.id, agent.id, NOW + 3, connection_id="c1")
    with pytest.raises(NotFound):
        await store.mark_agent_connected(team.id, agent.id, "inst-1", "c3", "machine-1", NOW + 4)
    assert await store.list_agent_connections(team.id, agent.id) == []


async def test_removing_twice_keeps_the_first_time_and_other_teams_cannot_remove(
    store: Store,
) -> None:
    team = await team_with_key(store, "ka", name="a")
    other = await team_with_key(store, "kb", name="b")
    agent = await register(store, "ka")
    with pytest.raises(NotFound):
        await store.remove_agent(other.id, agent.id, NOW)
    with pytest.raises(NotFound):
        await store.remove_agent(team.id, "agt_unknown", NOW)
    assert await store.get_agent(team.id, agent.id) == agent  # untouched
    first, _ = await store.remove_agent(team.id, agent.id, NOW + 1)
    again, forgotten = await store.remove_agent(team.id, agent.id, NOW + 2)
    assert again == first and again.removed_at == NOW + 1 and forgotten == []


async def test_a_removed_agents_sessions_keep_their_history_and_no_new_one_starts(
    store: Store,
) -> None:
    team = await team_with_key(store, "k")
    agent = await register(store, "k")

    def session(session_id: str) -> Session:
        return Session(
            id=session_id, team_id=team.id, agent_id=agent.id, operator_id="op_1",
            operator_key_thumbprint="jkt", mode="exec", command=("uname",), relay_id="relay-1",
            relay_host="127.0.0.1", relay_port=7000, relay_udp_port=None, policy_result="allow",
            policy_rule_id=None, state=SessionState.OFFERED, state_reason=None, created_at=NOW,
            expires_at=NOW + 60, updated_at=NOW,
        )  # fmt: skip

    kept = await store.create_session(session("ses_kept"))
    await store.remove_agent(team.id, agent.id, NOW + 1)
    with pytest.raises(NotFound):
        await store.create_session(session("ses_after"))
    assert await store.get_session(team.id, "ses_kept") == kept
    [listed] = (await store.session_listing(team.id)).sessions
    # Listed under the name it ran with, even once another agent takes that name.
    assert listed.session == kept and listed.agent_name == agent.name
