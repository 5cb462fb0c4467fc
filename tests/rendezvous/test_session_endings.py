"""Every session ends in the list: refused by the agent after it took the offer, or lost with an
agent process that restarted (kill -9, crash, reboot), on SQLite and PostgreSQL.

The agent reports on each connection which sessions it runs (``live_sessions``); the
rendezvous ends that agent's other open sessions as ``agent_lost`` and audits it, except those
that may still be on their way to it: offers sent down the reporting channel itself, offers not
yet expired, and sessions created after the report.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from audit.actions import Action
from rendezvous.control_channel import (
    AGENT_LOST,
    MAX_LIVE_SESSION_IDS,
    REJECTED_CHANNEL_MESSAGE,
)
from rendezvous.offer_bus import OFFER_UNDELIVERED
from rendezvous.store import SessionState, Store
from tests.rendezvous.sessions_support import (
    AgentChannel,
    agent_channel,
    enroll_agent,
    served_instance,
    wait_for_session_state,
)

pytestmark = pytest.mark.anyio

WAIT_SECONDS = 15
# Past any offer's expiry (the grant lifetime), within the auth clock-skew window.
PAST_OFFER_EXPIRY_SECONDS = 61


async def _request(service: Any, admin: Any, target: str = "web-1") -> str:
    body = {"target": target, "mode": "exec", "command": ["id"]}
    response = await service.call(admin, "POST", "/v1/sessions", body)
    assert response.status_code == 201, response.text
    session_id: str = response.json()["session_id"]
    return session_id


async def _take_offer(channel: AgentChannel, session_id: str) -> None:
    offer = await channel.receive("session_offer")
    assert offer["session_id"] == session_id
    await channel.send({"type": "session_offer_ack", "session_id": session_id})


async def _settled(channel: AgentChannel) -> None:
    """Return once the rendezvous has handled everything sent before: it answers a heartbeat
    only after the messages ahead of it (one receive loop per channel). Skips what comes
    before the answer."""
    await channel.send({"type": "heartbeat"})
    with trio.fail_after(WAIT_SECONDS):
        while json.loads(await channel.ws.get_message()).get("type") != "heartbeat_ack":
            pass


async def _report(channel: AgentChannel, ids: list[str]) -> None:
    await channel.send({"type": "live_sessions", "ids": ids})
    await _settled(channel)


async def _state(store: Store, team_id: str, session_id: str) -> tuple[str, str | None]:
    session = await store.get_session(team_id, session_id)
    assert session is not None
    return session.state.value, session.state_reason


async def test_sessions_an_agent_process_lost_end_as_agent_lost_and_are_audited_by_the_rendezvous(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        other = await enroll_agent(service, admin, hostname="db-1")
        async with agent_channel(url, agent) as old, agent_channel(url, other) as other_channel:
            lost = await _request(service, admin)
            await _take_offer(old, lost)
            kept = await _request(service, admin)
            await _take_offer(old, kept)
            others = await _request(service, admin, "db-1")
            await _take_offer(other_channel, others)
            await _settled(old)
            await _settled(other_channel)
        # The old process is gone without a word (kill -9); its successor runs only ``kept``.
        async with agent_channel(url, agent) as new:
            await _report(new, [kept])
        assert await _state(store, team, lost) == ("ended", AGENT_LOST)
        assert await _state(store, team, kept) == ("accepted", None)
        assert await _state(store, team, others) == ("accepted", None)
        view = await wait_for_session_state(service, admin, lost, "ended")
        assert view["reason"] == AGENT_LOST
        ended = await service.audit_events(team, Action.SESSION_ENDED.value)
        assert len(ended) == 1
        record = ended[0]
        assert record["session_id"] == lost and record["target"] == agent.agent_id
        assert record["actor"]["kind"] == "service"
        assert record["context"]["reason"] == AGENT_LOST
        assert record["context"]["state"] == "accepted"
        # A second report changes nothing more, and audits nothing more.
        async with agent_channel(url, agent) as again:
            await _report(again, [kept])
        assert len(await service.audit_events(team, Action.SESSION_ENDED.value)) == 1


async def test_an_offer_crossing_the_report_on_the_wire_is_not_ended(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            # Offered down this channel; the agent's report was written before it read the offer.
            crossing = await _request(service, admin)
            offer = await channel.receive("session_offer")
            # Even once the offer expired: it went down this channel, after the agent's welcome.
            service.clock.now += PAST_OFFER_EXPIRY_SECONDS
            await _report(channel, [])
            assert await _state(store, team, crossing) == ("offered", None)
            service.clock.now -= PAST_OFFER_EXPIRY_SECONDS
            await channel.send({"type": "session_offer_ack", "session_id": offer["session_id"]})
            await _settled(channel)
            assert await _state(store, team, crossing) == ("accepted", None)


async def test_an_unanswered_offer_is_ended_by_a_report_only_once_it_has_expired(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as old:
            unanswered = await _request(service, admin)
            await old.receive("session_offer")
        async with agent_channel(url, agent) as new:
            # Maybe still on its way to the agent by another path: it expires on its own.
            await _report(new, [])
            assert await _state(store, team, unanswered) == ("offered", None)
            service.clock.now += PAST_OFFER_EXPIRY_SECONDS
            await _report(new, [])
            # Never answered, it never ran: not the agent's loss of a running session.
            assert await _state(store, team, unanswered) == ("ended", OFFER_UNDELIVERED)


async def test_a_report_ends_only_its_own_agents_sessions_in_its_own_team(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        other_team = await service.team("dev")
        other_admin = await service.operator(other_team, "admin")
        # Same host name in another team: resolving by name stays inside each team.
        stranger = await enroll_agent(service, other_admin)
        async with agent_channel(url, stranger) as channel:
            theirs = await _request(service, other_admin)
            await _take_offer(channel, theirs)
            await _settled(channel)
        async with agent_channel(url, agent) as channel:
            await _report(channel, [])
        assert await _state(store, other_team, theirs) == ("accepted", None)
        assert await service.audit_events(team, Action.SESSION_ENDED.value) == []


async def test_a_malformed_live_sessions_report_closes_the_channel_and_ends_nothing(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as old:
            session_id = await _request(service, admin)
            await _take_offer(old, session_id)
            await _settled(old)
        too_many = [f"ses_{number}" for number in range(MAX_LIVE_SESSION_IDS + 1)]
        reports = (too_many, "ses_1", [7], [""])
        for ids in reports:
            async with agent_channel(url, agent) as channel:
                await channel.send({"type": "live_sessions", "ids": ids})
                with pytest.raises(ConnectionClosed), trio.fail_after(WAIT_SECONDS):
                    while True:
                        await channel.ws.get_message()
        assert await _state(store, team, session_id) == ("accepted", None)
        registry = service.ctx.metrics.registry
        counted = registry.get_sample_value(
            "tucdesk_rejected_inputs_total", {"reason": REJECTED_CHANNEL_MESSAGE}
        )
        assert counted == len(reports)


@pytest.mark.parametrize("taken", [True, False], ids=["accepted", "offered"])
async def test_a_session_the_agent_refuses_in_a_signed_event_is_refused_with_its_reason(
    store: Store, tmp_path: Path, taken: bool
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            session_id = await _request(service, admin)
            if taken:
                await _take_offer(channel, session_id)
            answer = await channel.send_event(
                Action.SESSION_REFUSED, session_id=session_id,
                context={"code": "relay-unreachable"},
            )  # fmt: skip
            assert answer["type"] == "audit_event_ack"
            state, reason = await _state(store, team, session_id)
            assert state == SessionState.REFUSED.value
            assert reason == "relay-unreachable"
            # A resend is acknowledged again and changes nothing.
            again = await channel.send_event(
                Action.SESSION_REFUSED, session_id=session_id,
                context={"code": "relay-unreachable"}, event_id="e2",
            )  # fmt: skip
            assert again["type"] == "audit_event_ack"
        view = await wait_for_session_state(service, admin, session_id, "refused")
        assert view["reason"] == "relay-unreachable"


async def test_an_ended_session_is_not_refused_by_a_late_refusal(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            session_id = await _request(service, admin)
            await _take_offer(channel, session_id)
            await channel.send_event(Action.SESSION_ENDED, session_id=session_id)
            await channel.send_event(
                Action.SESSION_REFUSED, session_id=session_id, context={"code": "late"},
                event_id="e2",
            )  # fmt: skip
        assert await _state(store, team, session_id) == ("ended", None)
