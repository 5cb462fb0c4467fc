"""Migration 3 on both backends: policy bundles by version, approval requests, applied versions."""

from __future__ import annotations

from dataclasses import replace

import pytest
import trio

from rendezvous.credentials import hash_secret
from rendezvous.store import (
    AlreadyExists,
    ApprovalRequest,
    ApprovalState,
    NotFound,
    Store,
    StoredPolicyBundle,
)
from rendezvous.store.base import TooManyPendingRequests, new_id

pytestmark = pytest.mark.anyio
NOW = 1_800_000_000.0


def _bundle(team_id: str, version: int) -> StoredPolicyBundle:
    return StoredPolicyBundle(
        team_id=team_id, version=version, content_sha256=f"{version:064x}",
        policy_sha256="0" * 64, bundle=f'{{"v": {version}}}', admin_key_id="kid",
        created_by="op_1", created_at=NOW,
    )  # fmt: skip


async def _agent(store: Store, team_id: str) -> str:
    await store.create_registration_key(team_id, hash_secret("rk"), ["prod"], NOW + 60, "t", NOW)
    agent, _ = await store.register_agent(
        hash_secret("rk"), NOW, b"\x01" * 32, "SHA256:x", "machine", "web-1", "web-1"
    )
    return agent.id


def _request(team_id: str, agent_id: str, expires_at: float = NOW + 600) -> ApprovalRequest:
    return ApprovalRequest(
        id=new_id("apr"), team_id=team_id, agent_id=agent_id, requester_id="op_1",
        requester_email="a@x.test", requester_thumbprint="thumb", mode="exec",
        command=("rm", "-rf", "/tmp/x"), command_sha256="ab" * 32, policy_version=3,
        rule_id="high_risk", reason="needs approval", state=ApprovalState.PENDING,
        created_at=NOW, expires_at=expires_at,
    )  # fmt: skip


async def test_policy_bundles_are_stored_only_as_the_next_version(store: Store) -> None:
    team = (await store.create_team("ops", NOW)).id
    assert await store.latest_policy_bundle(team) is None
    with pytest.raises(AlreadyExists):
        await store.store_policy_bundle(_bundle(team, 2))
    await store.store_policy_bundle(_bundle(team, 1))
    with pytest.raises(AlreadyExists):
        await store.store_policy_bundle(_bundle(team, 1))
    await store.store_policy_bundle(_bundle(team, 2))
    latest = await store.latest_policy_bundle(team)
    assert latest == _bundle(team, 2)
    other = (await store.create_team("other", NOW)).id
    assert await store.latest_policy_bundle(other) is None


async def test_agents_carry_the_policy_version_they_reported(store: Store) -> None:
    team = (await store.create_team("ops", NOW)).id
    agent_id = await _agent(store, team)
    agent = await store.get_agent(team, agent_id)
    assert agent is not None and agent.policy_version is None
    await store.set_agent_policy_version(team, agent_id, 4, "signed by an unpinned key")
    agent = await store.get_agent(team, agent_id)
    assert agent is not None
    assert (agent.policy_version, agent.policy_refusal) == (4, "signed by an unpinned key")
    [listed] = await store.list_agents(team)
    assert listed.policy_version == 4


async def test_an_approval_request_is_decided_once_and_executed_once(store: Store) -> None:
    team = (await store.create_team("ops", NOW)).id
    agent_id = await _agent(store, team)
    request = await store.create_approval_request(_request(team, agent_id))
    assert await store.get_approval_request(team, request.id) == request
    assert await store.get_approval_request("tm_other", request.id) is None
    assert await store.execute_approval_request(team, request.id, "ses_1", NOW) is None
    approved = await store.decide_approval_request(
        team, request.id, ApprovalState.APPROVED, decided_by="op_2",
        decided_by_email="b@x.test", reason="ok", approval='{"a": 1}', now=NOW + 1,
    )  # fmt: skip
    assert approved is not None and approved.state is ApprovalState.APPROVED
    assert approved.approval == '{"a": 1}' and approved.command == ("rm", "-rf", "/tmp/x")
    again = await store.decide_approval_request(
        team, request.id, ApprovalState.DENIED, decided_by="op_3",
        decided_by_email="c@x.test", reason="no", approval=None, now=NOW + 2,
    )  # fmt: skip
    assert again is None
    executed = await store.execute_approval_request(team, request.id, "ses_1", NOW + 3)
    assert executed is not None and executed.session_id == "ses_1"
    assert await store.execute_approval_request(team, request.id, "ses_2", NOW + 4) is None
    assert await store.list_approval_requests(team, [ApprovalState.PENDING]) == []


async def test_a_pending_request_past_its_time_expires_and_cannot_be_approved(
    store: Store,
) -> None:
    team = (await store.create_team("ops", NOW)).id
    agent_id = await _agent(store, team)
    request = await store.create_approval_request(_request(team, agent_id, NOW + 10))
    assert await store.expire_approval_request(team, request.id, NOW + 5) is None
    late = await store.decide_approval_request(
        team, request.id, ApprovalState.APPROVED, decided_by="op_2",
        decided_by_email="b@x.test", reason=None, approval="{}", now=NOW + 10,
    )  # fmt: skip
    assert late is None
    expired = await store.expire_approval_request(team, request.id, NOW + 10)
    assert expired is not None and expired.state is ApprovalState.EXPIRED
    assert [r.id for r in await store.list_approval_requests(team, [ApprovalState.EXPIRED])] == [
        request.id
    ]


async def test_an_approval_request_needs_an_agent_of_its_team(store: Store) -> None:
    team = (await store.create_team("ops", NOW)).id
    with pytest.raises(NotFound):
        await store.create_approval_request(_request(team, "agt_missing"))


async def test_concurrent_approval_requests_never_pass_the_pending_cap(store: Store) -> None:
    team = (await store.create_team("ops", NOW)).id
    agent_id = await _agent(store, team)
    await store.create_approval_request(_request(team, agent_id), max_pending=3)
    stored: list[str] = []
    refused: list[int] = []

    async def ask() -> None:
        request = _request(team, agent_id)
        try:
            await store.create_approval_request(request, max_pending=3)
        except TooManyPendingRequests as error:
            refused.append(error.pending)
        else:
            stored.append(request.id)

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(ask)
    assert len(stored) == 2 and refused == [3] * 8
    assert await store.count_pending_approval_requests(team, "op_1", NOW) == 3
    # Requests past their time no longer count.
    later = replace(_request(team, agent_id), created_at=NOW + 600, expires_at=NOW + 1200)
    await store.create_approval_request(later, max_pending=1)
