"""Store guarantees the review-10 fixes rest on, on SQLite and PostgreSQL (the ``store``
fixture): a session row is ordered against its agent's removal; an end of a session is claimed
by one writer at a time; revoking an invite beats any clock; a live_sessions report's ended ids
are one query."""

from __future__ import annotations

import time

import asyncpg
import pytest
import trio
import trio_asyncio

from rendezvous.credentials import hash_secret, new_registration_key
from rendezvous.store import InviteUnusable, NotFound, Session, SessionState, Store, UnusableReason
from rendezvous.store.base import INVITE_REVOKED_EXPIRES_AT, new_id

pytestmark = pytest.mark.anyio

NOW = 1_800_000_000.0


async def _agent(store: Store, team_name: str = "ops") -> tuple[str, str]:
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


@pytest.mark.postgres
async def test_a_session_row_waits_for_a_removal_in_flight_and_is_then_refused(
    database_url: str, store: Store
) -> None:
    """READ COMMITTED: a plain SELECT of the agent would see it not removed while the removal's
    transaction is open, and store the row after the removal's listing (which then misses it)."""
    if not database_url.startswith("postgresql"):
        pytest.skip("the row lock is PostgreSQL's; SQLite's BEGIN IMMEDIATE queues every writer")
    team_id, agent_id = await _agent(store)
    async with trio_asyncio.open_loop() as loop:
        raw = await trio_asyncio.aio_as_trio(asyncpg.connect, loop=loop)(database_url)
        run = trio_asyncio.aio_as_trio(raw.execute, loop=loop)
        try:
            await run("BEGIN")
            await run(f"UPDATE agents SET removed_at = {NOW} WHERE id = '{agent_id}'")
            outcome: list[object] = []
            done = trio.Event()

            async def create() -> None:
                try:
                    outcome.append(await store.create_session(_session(team_id, agent_id)))
                except NotFound as error:
                    outcome.append(error)
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(create)
                with trio.move_on_after(0.5):
                    await done.wait()
                assert outcome == [], "the row was stored while the removal was uncommitted"
                await run("COMMIT")
            assert len(outcome) == 1 and isinstance(outcome[0], NotFound)
        finally:
            await trio_asyncio.aio_as_trio(raw.close, loop=loop)()


async def test_one_end_claims_a_session_at_a_time_and_an_accept_keeps_the_claim(
    store: Store,
) -> None:
    team_id, agent_id = await _agent(store)
    session = await store.create_session(_session(team_id, agent_id))
    now = time.time()
    claimed = await store.claim_session_end(team_id, agent_id, session.id, now + 5, now + 30)
    assert claimed is not None and claimed.state is SessionState.OFFERED
    assert claimed.updated_at == now + 30
    # The agent accepts the offer meanwhile: the row moves on, the claim stays.
    accepted = await store.update_session_state(
        team_id, agent_id, session.id, SessionState.ACCEPTED, None, now + 1,
        from_states=(SessionState.OFFERED,),
    )  # fmt: skip
    assert accepted is not None and accepted.updated_at == now + 30
    assert await store.claim_session_end(team_id, agent_id, session.id, now + 6, now + 31) is None
    # Released (its record failed): the next end claims it at once.
    await store.release_session_end(team_id, agent_id, session.id, now + 30, now + 2)
    again = await store.claim_session_end(team_id, agent_id, session.id, now + 7, now + 32)
    assert again is not None and again.state is SessionState.ACCEPTED
    # A claim left behind lapses: a later end takes it over.
    assert await store.claim_session_end(team_id, agent_id, session.id, now + 40, now + 70)
    ended = await store.update_session_state(
        team_id, agent_id, session.id, SessionState.ENDED, "ended_by_admin", now + 41,
        from_states=(SessionState.OFFERED, SessionState.ACCEPTED),
    )  # fmt: skip
    assert ended is not None and ended.updated_at == now + 41
    assert await store.claim_session_end(team_id, agent_id, session.id, now + 99, now + 99) is None


async def test_ended_sessions_among_reported_ids_is_the_agents_own_with_those_reasons(
    store: Store,
) -> None:
    team_id, agent_id = await _agent(store)
    other_team, other_agent = await _agent(store, "development")
    now = time.time()
    mine = [await store.create_session(_session(team_id, agent_id)) for _ in range(3)]
    theirs = await store.create_session(_session(other_team, other_agent))
    for session, reason in zip(mine, ["ended_by_admin", "normal", "agent_removed"], strict=True):
        await store.update_session_state(
            team_id, agent_id, session.id, SessionState.ENDED, reason, now,
            from_states=(SessionState.OFFERED,),
        )  # fmt: skip
    await store.update_session_state(
        other_team, other_agent, theirs.id, SessionState.ENDED, "ended_by_admin", now,
        from_states=(SessionState.OFFERED,),
    )  # fmt: skip
    asked = [s.id for s in mine] + [theirs.id] + [f"ses_unknown{i}" for i in range(256)]
    found = await store.ended_sessions_among(
        team_id, agent_id, asked, ["agent_removed", "ended_by_admin"]
    )
    assert sorted(s.id for s in found) == sorted([mine[0].id, mine[2].id])
    assert await store.ended_sessions_among(team_id, agent_id, [], ["ended_by_admin"]) == []


async def _team_with_invite(store: Store, code: bytes) -> tuple[str, str]:
    team = await store.create_team("ops", NOW)
    invite = await store.create_invite(
        team.id, "ada@example.com", "operator", code, NOW + 3600, "admin", NOW
    )
    return team.id, invite.id


async def test_a_revoked_invite_refuses_a_login_whose_clock_was_read_before_the_revoke(
    store: Store,
) -> None:
    code = hash_secret("inv_review10")
    team_id, invite_id = await _team_with_invite(store, code)
    # The revoke runs on a host whose clock is an hour ahead; the login read its clock before.
    revoked = await store.revoke_invite(team_id, invite_id, NOW + 1000)
    assert revoked.expires_at == INVITE_REVOKED_EXPIRES_AT
    with pytest.raises(InviteUnusable) as refused:
        await store.enroll_operator(code, NOW + 1, b"\x01" * 32, "jkt-1")
    assert refused.value.reason is UnusableReason.REVOKED
    [listed] = await store.list_invites(team_id)
    assert listed.unusable_reason(NOW) is UnusableReason.REVOKED
    assert await store.list_operators(team_id) == []


async def test_an_operator_disable_revokes_its_emails_invites_for_every_clock(
    store: Store,
) -> None:
    team = await store.create_team("ops", NOW)
    first = await store.create_invite(
        team.id, "ada@example.com", "operator", hash_secret("inv_first"), NOW + 3600, "admin", NOW
    )
    operator, _ = await store.enroll_operator(
        hash_secret("inv_first"), NOW + 1, b"\x02" * 32, "jkt-2"
    )
    assert first.id
    await store.create_invite(
        team.id, "ada@example.com", "operator", hash_secret("inv_again"), NOW + 3600, "admin",
        NOW + 2,
    )  # fmt: skip
    disabled = await store.disable_operator_and_holdings(team.id, operator.id, NOW + 10)
    assert len(disabled.revoked_invites) == 1
    with pytest.raises(InviteUnusable) as refused:
        await store.enroll_operator(hash_secret("inv_again"), NOW + 3, b"\x03" * 32, "jkt-3")
    assert refused.value.reason is UnusableReason.REVOKED
