"""The sessions table on both backends: team-scoped reads and conditional state changes."""

from __future__ import annotations

import time

import pytest

from rendezvous.credentials import hash_secret, new_registration_key
from rendezvous.store import NotFound, Session, SessionState, Store
from rendezvous.store.base import new_id

pytestmark = pytest.mark.anyio


async def _agent(store: Store, team_name: str) -> tuple[str, str]:
    now = time.time()
    team = await store.create_team(team_name, now)
    key = new_registration_key()
    await store.create_registration_key(team.id, hash_secret(key), [], now + 60, "test", now)
    agent, _ = await store.register_agent(
        hash_secret(key), now, bytes([len(team_name)]) * 32, "SHA256:x", "m", "web-1", "web-1"
    )
    return team.id, agent.id


def _session(team_id: str, agent_id: str, **changes: object) -> Session:
    now = time.time()
    fields: dict[str, object] = dict(
        id=new_id("ses"), team_id=team_id, agent_id=agent_id, operator_id="op_1",
        operator_key_thumbprint="jkt", mode="exec", command=("uname", "-a"),
        relay_id="relay-1", relay_host="127.0.0.1", relay_port=7000, relay_udp_port=None,
        policy_result="allow", policy_rule_id="rule", state=SessionState.OFFERED,
        state_reason=None, created_at=now, expires_at=now + 60, updated_at=now,
    )  # fmt: skip
    fields.update(changes)
    return Session(**fields)  # type: ignore[arg-type]


async def test_session_round_trips_and_is_invisible_to_other_teams(store: Store) -> None:
    team, agent = await _agent(store, "ops")
    other, _ = await _agent(store, "other-team")
    session = await store.create_session(_session(team, agent, relay_udp_port=7001))
    assert await store.get_session(team, session.id) == session
    assert await store.get_session(other, session.id) is None
    shell = await store.create_session(_session(team, agent, mode="shell", command=None))
    assert (await store.get_session(team, shell.id)) == shell


async def test_session_for_an_agent_of_another_team_cannot_be_created(store: Store) -> None:
    _, agent = await _agent(store, "ops")
    other, _ = await _agent(store, "other-team")
    with pytest.raises(NotFound):
        await store.create_session(_session(other, agent))


async def test_state_moves_only_from_the_allowed_states_and_only_for_its_agent(
    store: Store,
) -> None:
    team, agent = await _agent(store, "ops")
    other_team, other_agent = await _agent(store, "other-team")
    session = await store.create_session(_session(team, agent))
    offered = (SessionState.OFFERED,)
    now = time.time()
    assert await store.update_session_state(
        team, other_agent, session.id, SessionState.ACCEPTED, None, now, from_states=offered
    ) is None
    assert await store.update_session_state(
        other_team, agent, session.id, SessionState.ACCEPTED, None, now, from_states=offered
    ) is None
    accepted = await store.update_session_state(
        team, agent, session.id, SessionState.ACCEPTED, None, now, from_states=offered
    )
    assert accepted is not None and accepted.state is SessionState.ACCEPTED
    # A second answer to the same offer changes nothing.
    assert await store.update_session_state(
        team, agent, session.id, SessionState.REFUSED, "late", now, from_states=offered
    ) is None
    ended = await store.update_session_state(
        team, agent, session.id, SessionState.ENDED, None, now,
        from_states=(SessionState.OFFERED, SessionState.ACCEPTED),
    )  # fmt: skip
    assert ended is not None and ended.state is SessionState.ENDED
    assert await store.update_session_state(
        team, agent, session.id, SessionState.ENDED, None, now, from_states=()
    ) is None
