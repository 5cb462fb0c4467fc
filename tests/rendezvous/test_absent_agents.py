"""Sessions whose agent never comes back end as agent_lost after an hour (the periodic sweep),
so `tucdesk sessions --state accepted` does not list them open for ever; an agent that is
online, or gone only a little while, keeps its sessions.

On SQLite and PostgreSQL, with a real control channel answered by the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from rendezvous.control_channel import (
    ABSENT_AGENT_SECONDS,
    AGENT_LOST,
    end_sessions_of_absent_agents,
)
from rendezvous.store import SessionState, Store
from tests.rendezvous.sessions_support import agent_channel, enroll_agent, served_instance
from tests.rendezvous.test_operator_disable import _request, _settled, _take_offer

pytestmark = pytest.mark.anyio

WAIT_SECONDS = 10


async def test_a_session_whose_agent_stays_gone_ends_as_agent_lost_and_is_audited(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            session_id = await _request(service, admin)
            await _take_offer(channel, session_id)
            await _settled(channel)
            # Online: nothing to end, however old the session.
            service.clock.now += 2 * ABSENT_AGENT_SECONDS
            assert await end_sessions_of_absent_agents(service.ctx) == 0
        await _until_offline(store, team, agent.agent_id)  # the server took the channel's close
        # Gone a little while: the session may still come back with its agent.
        service.clock.now += ABSENT_AGENT_SECONDS / 2
        assert await end_sessions_of_absent_agents(service.ctx) == 0
        row = await store.get_session(team, session_id)
        assert row is not None and row.state is SessionState.ACCEPTED
        # Gone for longer than ABSENT_AGENT_SECONDS: ended, once, with a record.
        service.clock.now += ABSENT_AGENT_SECONDS
        assert await end_sessions_of_absent_agents(service.ctx) == 1
        assert await end_sessions_of_absent_agents(service.ctx) == 0
        row = await store.get_session(team, session_id)
        assert row is not None and row.state is SessionState.ENDED
        assert row.state_reason == AGENT_LOST
        [ended] = [
            event for event in await service.audit_events(team)
            if event["action"] == "session.ended" and event["session_id"] == session_id
        ]  # fmt: skip
        assert ended["actor"]["kind"] == "service"
        assert ended["context"]["reason"] == AGENT_LOST


async def _until_offline(store: Store, team: str, agent_id: str) -> None:
    with trio.fail_after(WAIT_SECONDS):
        while True:
            agent = await store.get_agent(team, agent_id)
            if agent is not None and not agent.online:
                return
            await trio.sleep(0.02)
