"""How a session ended, and whose sessions a list means, in the store on both backends: the exit
code or signal kept with an ended session; operators found by id or email, agents by id or
name, removed ones too."""

from __future__ import annotations

import time

import pytest

from rendezvous.credentials import hash_secret, new_invite_code, new_registration_key
from rendezvous.store import InvalidArgument, Session, SessionState, Store
from rendezvous.store.base import SessionQuery, new_id

pytestmark = pytest.mark.anyio
LIVE = (SessionState.OFFERED, SessionState.ACCEPTED)


async def _team_with_agent(store: Store, name: str = "ops") -> tuple[str, str]:
    now = time.time()
    team = await store.create_team(name, now)
    return team.id, await _agent(store, team.id, "web-1", len(name))


async def _agent(store: Store, team_id: str, hostname: str, seed: int) -> str:
    now = time.time()
    key = new_registration_key()
    await store.create_registration_key(team_id, hash_secret(key), [], now + 60, "test", now)
    agent, _ = await store.register_agent(
        hash_secret(key), now, bytes([seed]) * 32, "SHA256:x", f"m{seed}", hostname, hostname
    )
    return agent.id


async def _operator(store: Store, team_id: str, email: str, seed: int) -> str:
    now = time.time()
    code = hash_secret(new_invite_code())
    await store.create_invite(team_id, email, "operator", code, now + 60, "test", now)
    operator, _ = await store.enroll_operator(code, now, bytes([seed]) * 32, new_id("t"))
    return operator.id


def _session(team_id: str, agent_id: str, operator_id: str = "op_1", age: float = 0) -> Session:
    now = time.time() - age
    return Session(
        id=new_id("ses"), team_id=team_id, agent_id=agent_id, operator_id=operator_id,
        operator_key_thumbprint="jkt", mode="exec", command=("sleep", "100"),
        relay_id="relay-1", relay_host="127.0.0.1", relay_port=7000, relay_udp_port=None,
        policy_result="allow", policy_rule_id=None, state=SessionState.ACCEPTED,
        state_reason=None, created_at=now, expires_at=now + 60, updated_at=now,
    )  # fmt: skip


async def test_an_ended_session_keeps_its_reason_and_exit_code_or_signal(store: Store) -> None:
    team, agent = await _team_with_agent(store)
    killed = await store.create_session(_session(team, agent))
    exited = await store.create_session(_session(team, agent))
    moved = await store.update_session_state(
        team, agent, killed.id, SessionState.ENDED, "normal", time.time(),
        from_states=LIVE, exit_signal="TERM",
    )  # fmt: skip
    assert moved is not None and (moved.exit_code, moved.exit_signal) == (None, "TERM")
    await store.update_session_state(
        team, agent, exited.id, SessionState.ENDED, "normal", time.time(),
        from_states=LIVE, exit_code=3,
    )  # fmt: skip
    stored = await store.get_session(team, killed.id)
    assert stored is not None
    assert (stored.state, stored.state_reason, stored.exit_code, stored.exit_signal) == (
        SessionState.ENDED, "normal", None, "TERM",
    )  # fmt: skip
    listed = await store.listed_session(team, exited.id)
    assert listed is not None
    assert (listed.session.exit_code, listed.session.exit_signal) == (3, None)
    listing = await store.session_listing(team, SessionQuery(states=(SessionState.ENDED,)))
    assert {
        listed.session.id: (listed.session.exit_code, listed.session.exit_signal)
        for listed in listing.sessions
    } == {killed.id: (None, "TERM"), exited.id: (3, None)}


async def test_an_exit_status_out_of_shape_is_refused(store: Store) -> None:
    team, agent = await _team_with_agent(store)
    session = await store.create_session(_session(team, agent))
    for bad in ({"exit_code": 256}, {"exit_code": -1}, {"exit_code": True},
                {"exit_signal": ""}, {"exit_signal": "X" * 17}):  # fmt: skip
        with pytest.raises(InvalidArgument):
            await store.update_session_state(
                team, agent, session.id, SessionState.ENDED, "normal", time.time(),
                from_states=LIVE, **bad,  # type: ignore[arg-type]
            )  # fmt: skip
    still = await store.get_session(team, session.id)
    assert still is not None and still.state is SessionState.ACCEPTED


async def test_a_list_by_operator_email_covers_every_id_of_that_email_in_the_team(
    store: Store,
) -> None:
    team, agent = await _team_with_agent(store)
    other, other_agent = await _team_with_agent(store, "other-team")
    first = await _operator(store, team, "alice@example.com", 1)
    again = await _operator(store, team, "alice@example.com", 2)
    bob = await _operator(store, team, "bob@example.com", 3)
    stranger = await _operator(store, other, "alice@example.com", 4)
    mine = [
        (await store.create_session(_session(team, agent, operator, age))).id
        for operator, age in ((first, 30), (again, 20))
    ]
    await store.create_session(_session(team, agent, bob, 10))
    await store.create_session(_session(other, other_agent, stranger, 5))
    listing = await store.session_listing(team, SessionQuery(operator_email="ALICE@example.com"))
    assert [listed.session.id for listed in listing.sessions] == mine[::-1]
    nobody = await store.session_listing(team, SessionQuery(operator_email="carol@example.com"))
    assert nobody.sessions == []
    found = await store.operators_matching(team, "Alice@Example.com")
    assert [operator.id for operator in found] == [first, again]
    assert [operator.id for operator in await store.operators_matching(team, bob)] == [bob]
    assert await store.operators_matching(team, stranger) == []
    assert await store.operators_matching(other, "bob@example.com") == []


async def test_agents_are_matched_by_id_or_name_removed_ones_too_current_first(
    store: Store,
) -> None:
    team, removed = await _team_with_agent(store)
    other, _ = await _team_with_agent(store, "other-team")
    await store.remove_agent(team, removed, time.time())
    current = await _agent(store, team, "web-1", 9)
    by_name = await store.agents_matching(team, "web-1")
    assert [agent.id for agent in by_name] == [current, removed]
    assert [agent.is_removed() for agent in by_name] == [False, True]
    assert [agent.id for agent in await store.agents_matching(team, removed)] == [removed]
    assert await store.agents_matching(other, removed) == []
    assert await store.agents_matching(team, "db-1") == []
