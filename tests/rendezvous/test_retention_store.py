"""Pruning old history on both backends: only sessions that are over and settled approval
requests from before the cutoff go, in batches; nothing the service still reads."""

from __future__ import annotations

import time
from typing import Any

import pytest

from rendezvous.credentials import hash_secret, new_registration_key
from rendezvous.store import ApprovalState, Session, SessionState, Store
from rendezvous.store.base import ApprovalRequest, PrunedHistory, new_id

pytestmark = pytest.mark.anyio

DAY = 86400.0
NOW = time.time()
OLD = NOW - 100 * DAY  # history from long before the cutoff
CUTOFF = NOW - 30 * DAY


async def _agent(store: Store, team_name: str) -> tuple[str, str]:
    team = await store.create_team(team_name, OLD)
    key = new_registration_key()
    await store.create_registration_key(team.id, hash_secret(key), [], NOW + 60, "test", OLD)
    agent, _ = await store.register_agent(
        hash_secret(key), OLD, bytes([len(team_name)]) * 32, "SHA256:x", "m", "web-1", "web-1"
    )
    return team.id, agent.id


async def _session(
    store: Store, team_id: str, agent_id: str, state: SessionState, at: float = OLD, **more: Any
) -> str:
    fields: dict[str, Any] = dict(
        id=new_id("ses"), team_id=team_id, agent_id=agent_id, operator_id="op_1",
        operator_key_thumbprint="jkt", mode="exec", command=("uname", "-a"),
        relay_id="relay-1", relay_host="127.0.0.1", relay_port=7000, relay_udp_port=None,
        policy_result="allow", policy_rule_id="rule", state=state, state_reason=None,
        created_at=at, expires_at=at + 60, updated_at=at,
    )  # fmt: skip
    fields.update(more)
    session = await store.create_session(Session(**fields))
    return session.id


async def _request(
    store: Store, team_id: str, agent_id: str, state: ApprovalState, at: float = OLD
) -> str:
    request = await store.create_approval_request(ApprovalRequest(
        id=new_id("apr"), team_id=team_id, agent_id=agent_id, requester_id="op_1",
        requester_email="a@x.test", requester_thumbprint="thumb", mode="exec",
        command=("rm", "-rf", "/tmp/x"), command_sha256="ab" * 32, policy_version=3,
        rule_id="high_risk", reason="needs approval", state=state,
        created_at=at, expires_at=at + 600,
    ))  # fmt: skip
    return request.id


async def _prune_all(store: Store, team_id: str, before: float, batch: int) -> PrunedHistory:
    total = PrunedHistory()
    while pruned := await store.prune_history(team_id, before, batch):
        assert pruned.sessions <= batch and pruned.approval_requests <= batch
        total += pruned
    return total


async def test_prune_deletes_only_old_finished_sessions_and_settled_requests(
    store: Store,
) -> None:
    team, agent = await _agent(store, "ops")
    other_team, other_agent = await _agent(store, "other")
    old_ended = [await _session(store, team, agent, SessionState.ENDED) for _ in range(3)]
    old_refused = await _session(store, team, agent, SessionState.REFUSED)
    # Open sessions are never history, however old (the sweeps and live_sessions read them).
    old_offered = await _session(store, team, agent, SessionState.OFFERED)
    old_accepted = await _session(store, team, agent, SessionState.ACCEPTED)
    # Started long ago but ended recently: its last change is after the cutoff.
    ended_lately = await _session(store, team, agent, SessionState.ENDED, updated_at=NOW)
    recent = await _session(store, team, agent, SessionState.ENDED, at=NOW)
    other_old = await _session(store, other_team, other_agent, SessionState.ENDED)

    settled = [
        await _request(store, team, agent, state)
        for state in (ApprovalState.DENIED, ApprovalState.EXPIRED, ApprovalState.WITHDRAWN)
    ]
    # Pending, recording and approved (still redeemable) requests wait for someone: kept.
    waiting = [
        await _request(store, team, agent, state)
        for state in (ApprovalState.PENDING, ApprovalState.RECORDING, ApprovalState.APPROVED)
    ]
    recent_denied = await _request(store, team, agent, ApprovalState.DENIED, at=NOW)
    # An executed request (old) and the session it ran (old): both history, both go.
    executed = await _request(store, team, agent, ApprovalState.APPROVED)
    executed_session = await _session(store, team, agent, SessionState.ENDED)
    assert await store.execute_approval_request(team, executed, executed_session, OLD + 1)
    # A request executed after the cutoff names an old ended session: that session stays
    # while the request does.
    kept_executed = await _request(store, team, agent, ApprovalState.APPROVED)
    named_session = await _session(store, team, agent, SessionState.ENDED)
    assert await store.execute_approval_request(team, kept_executed, named_session, NOW)

    # An old executed request whose session is still open stays with it.
    running_request = await _request(store, team, agent, ApprovalState.APPROVED)
    running = await _session(store, team, agent, SessionState.ACCEPTED)
    assert await store.execute_approval_request(team, running_request, running, OLD + 1)

    # The agents were seen since (they hold no spooled events of these sessions any more).
    await store.touch_agent(team, agent, NOW)
    await store.touch_agent(other_team, other_agent, NOW)
    expected = PrunedHistory(sessions=len(old_ended) + 2, approval_requests=len(settled) + 1)
    assert await store.prunable_history(team, CUTOFF) == expected
    assert await _prune_all(store, team, CUTOFF, batch=2) == expected
    assert await store.prunable_history(team, CUTOFF) == PrunedHistory()

    for gone in [*old_ended, old_refused, executed_session]:
        assert await store.get_session(team, gone) is None
    for kept in [old_offered, old_accepted, ended_lately, recent, named_session, running]:
        assert await store.get_session(team, kept) is not None
    assert await store.get_session(other_team, other_old) is not None
    for gone in [*settled, executed]:
        assert await store.get_approval_request(team, gone) is None
    for kept in [*waiting, recent_denied, kept_executed, running_request]:
        assert await store.get_approval_request(team, kept) is not None
    # The kept open sessions are still found by the readers that need them.
    listing = await store.session_listing(team)
    assert {listed.session.id for listed in listing.sessions} == {
        old_offered, old_accepted, ended_lately, recent, named_session, running
    }


async def test_prune_of_nothing_prunable_deletes_nothing(store: Store) -> None:
    team, agent = await _agent(store, "ops")
    await _session(store, team, agent, SessionState.ENDED, at=NOW)
    await _request(store, team, agent, ApprovalState.PENDING)
    assert await store.prunable_history(team, CUTOFF) == PrunedHistory()
    assert await store.prune_history(team, CUTOFF, 100) == PrunedHistory()
