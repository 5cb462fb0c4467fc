"""The periodic sweep of disabled operators' sessions (rendezvous/offer_bus.py): it refuses their
offers past expiry instead of messaging the agent, tells each channel of each open session once
however often it runs, and reaches every such session however many stay open.

On SQLite and PostgreSQL, with a real control channel answered by the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rendezvous import offer_bus
from rendezvous.offer_bus import end_disabled_operators_sessions_here
from rendezvous.store import SessionState, Store
from tests.rendezvous.sessions_support import agent_channel, enroll_agent, served_instance
from tests.rendezvous.test_operator_disable import (
    _no_end_sessions,
    _request,
    _settled,
    _take_offer,
)

pytestmark = pytest.mark.anyio

AN_HOUR = 3600.0


async def test_an_expired_offer_of_a_disabled_operator_is_refused_not_sent_again_and_again(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        alice = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            lost = await _request(service, alice)
            await channel.receive("session_offer")  # never answered: as if it were lost
            await _settled(channel)
            await store.disable_operator(team, alice.operator_id, service.clock.now)
            for _ in range(3):
                service.clock.now += AN_HOUR
                assert await end_disabled_operators_sessions_here(service.ctx) == 0
                await _no_end_sessions(channel)
            row = await store.get_session(team, lost)
            assert row is not None and row.state is SessionState.REFUSED
            assert row.state_reason == "operator_disabled"
        refusals = [
            (event["session_id"], event["context"])
            for event in await service.audit_events(team)
            if event["action"] == "session.refused"
        ]
        assert refusals == [(lost, {"reason": "operator_disabled"})]


async def test_the_sweep_tells_each_channel_of_a_session_that_stays_open_once(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        alice = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            stuck = await _request(service, alice)
            await _take_offer(channel, stuck)
            await _settled(channel)
            await store.disable_operator(team, alice.operator_id, service.clock.now)
            assert await end_disabled_operators_sessions_here(service.ctx) == 1
            assert (await channel.receive("end_sessions"))["ids"] == [stuck]
            # The agent never acknowledges the ending: the row stays accepted.
            for _ in range(3):
                assert await end_disabled_operators_sessions_here(service.ctx) == 0
                await _no_end_sessions(channel)
        # A new channel of the agent may not have heard of it: told once more, there.
        async with agent_channel(url, agent) as channel:
            await _settled(channel)
            assert await end_disabled_operators_sessions_here(service.ctx) == 1
            assert (await channel.receive("end_sessions"))["ids"] == [stuck]
            assert await end_disabled_operators_sessions_here(service.ctx) == 0


async def test_the_sweep_reaches_every_open_session_however_many_stay_open(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pages in (team, session id) order, at most so many rows a sweep, going on from there
    the next time: sessions beyond the first page are reached, not starved by stuck ones."""
    monkeypatch.setattr(offer_bus, "SWEEP_PAGE_SESSIONS", 2)
    monkeypatch.setattr(offer_bus, "MAX_SESSIONS_SWEPT_PER_SWEEP", 4)
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        alice = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            sessions = []
            for _ in range(5):
                sessions.append(await _request(service, alice))
                await _take_offer(channel, sessions[-1])
            await _settled(channel)
            await store.disable_operator(team, alice.operator_id, service.clock.now)
            told = []
            for _ in range(3):
                await end_disabled_operators_sessions_here(service.ctx)
                told.extend(
                    session_id
                    for message in await _settled(channel)
                    if message["type"] == "end_sessions"
                    for session_id in message["ids"]
                )
            assert sorted(told) == sorted(sessions)
            assert len(told) == len(set(told))
