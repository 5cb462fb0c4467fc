"""Why a session ended, on its row: the agent's signed ``session.ended`` (as agent/audit_events.py
signs it) moves the row to ended with its reason and the command's exit code or signal, which
``GET /v1/sessions/{id}`` and the list show; on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.audit_events import SessionAuditor
from agent.process_group import ExitStatus
from audit.actions import Action
from rendezvous.store import Store
from tests.rendezvous.sessions_support import (
    AgentChannel,
    EnrolledAgent,
    agent_channel,
    enroll_agent,
    served_instance,
    wait_for_session_state,
)

pytestmark = pytest.mark.anyio


async def _accepted_session(service: Any, admin: Any, channel: AgentChannel) -> str:
    body = {"target": channel.agent.name, "mode": "exec", "command": ["sleep", "100"]}
    response = await service.call(admin, "POST", "/v1/sessions", body)
    assert response.status_code == 201, response.text
    session_id: str = response.json()["session_id"]
    offer = await channel.receive("session_offer")
    assert offer["session_id"] == session_id
    await channel.send({"type": "session_offer_ack", "session_id": session_id})
    return session_id


async def _send_ended(
    channel: AgentChannel, agent: EnrolledAgent, session_id: str, exit_status: ExitStatus
) -> None:
    """The agent's own session.ended, signed as its session host signs it."""
    auditor = SessionAuditor(agent.identity, agent.agent_id, agent.team_id, agent.name)
    signed = auditor.ended(
        session_id, duration_ms=1200, exit_status=exit_status, bytes_in=5, bytes_out=7,
        reason="normal",
    )  # fmt: skip
    await channel.send({"type": "audit_event", "event": signed.to_json(), "id": session_id})
    answer = await channel.receive("audit_event_ack")
    assert answer["id"] == session_id


async def test_a_command_killed_by_a_signal_shows_why_and_how_it_ended(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            killed = await _accepted_session(service, admin, channel)
            exited = await _accepted_session(service, admin, channel)
            await _send_ended(channel, agent, killed, ExitStatus(signal=15))
            await _send_ended(channel, agent, exited, ExitStatus(code=2))
        view = await wait_for_session_state(service, admin, killed, "ended")
        assert (view["reason"], view["exit_code"], view["exit_signal"]) == ("normal", None, "TERM")
        view = await wait_for_session_state(service, admin, exited, "ended")
        assert (view["reason"], view["exit_code"], view["exit_signal"]) == ("normal", 2, None)
        listed = (await service.call(admin, "GET", "/v1/sessions?state=ended")).json()
        ended = {s["session_id"]: (s["exit_code"], s["exit_signal"]) for s in listed["sessions"]}
        assert ended == {killed: (None, "TERM"), exited: (2, None)}


async def test_an_exit_status_out_of_shape_ends_the_session_without_keeping_it(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            session_id = await _accepted_session(service, admin, channel)
            answer = await channel.send_event(
                Action.SESSION_ENDED, session_id=session_id,
                context={"reason": "normal", "exit_code": 10**12, "signal": "TERM; \x1b[2J"},
            )  # fmt: skip
            assert answer["type"] == "audit_event_ack", answer
        view = await wait_for_session_state(service, admin, session_id, "ended")
        assert (view["reason"], view["exit_code"], view["exit_signal"]) == ("normal", None, None)
        # The signed event in the log still holds what the agent said.
        (record,) = await service.audit_events(team, Action.SESSION_ENDED.value)
        assert json.dumps(record["context"]["signal"]) == json.dumps("TERM; \x1b[2J")
