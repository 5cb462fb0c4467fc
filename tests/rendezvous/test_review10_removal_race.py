"""A session brokered while its agent is being removed never outlives the removal.

The removal lists the agent's open sessions, ends them, removes the agent, then closes its
channels. A ``POST /v1/sessions`` that passed ``find_agent`` before the removal committed may
store its session in between: the removal lists open sessions again once it has committed (the
store orders ``create_session`` against ``remove_agent``, and refuses a removed agent), the
broker re-checks the agent once its row exists, and ``deliver_here`` refuses an offer to a
removed agent. On SQLite and PostgreSQL (the ``store`` fixture).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed

from rendezvous.control_channel import CLOSE_AGENT_REMOVED
from rendezvous.offer_bus import AGENT_REMOVED_REASON, OfferDelivery, deliver_here
from rendezvous.store import Session, SessionState, Store
from tests.rendezvous.sessions_support import agent_channel, enroll_agent, served_instance

pytestmark = pytest.mark.anyio

WAIT_SECONDS = 15


async def _until_closed(channel: Any) -> tuple[list[dict[str, Any]], int | None]:
    """Every message the agent gets until its channel closes, and the close code."""
    got: list[dict[str, Any]] = []
    with trio.fail_after(WAIT_SECONDS):
        try:
            while True:
                got.append(json.loads(await channel.ws.get_message()))
        except ConnectionClosed as closed:
            return got, closed.reason.code if closed.reason is not None else None


async def test_a_session_brokered_during_a_removal_is_ended_and_the_agent_told_before_the_close(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        alice = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            original = service.ctx.store.remove_agent
            listed, brokered = trio.Event(), trio.Event()
            new: dict[str, Any] = {}

            async def remove_after_a_broker(*args: Any, **kwargs: Any) -> Any:
                listed.set()  # the removal has listed (and ended) the open sessions: none
                await brokered.wait()  # a POST /v1/sessions runs to the end here
                return await original(*args, **kwargs)

            service.ctx.store.remove_agent = remove_after_a_broker  # type: ignore[method-assign]

            async def broker() -> None:
                await listed.wait()
                body = {"target": agent.name, "mode": "exec", "command": ["id"]}
                new["answer"] = await service.call(alice, "POST", "/v1/sessions", body)
                brokered.set()

            async def remove() -> None:
                new["removal"] = await service.call(
                    admin, "DELETE", f"/v1/agents/{agent.agent_id}"
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(broker)
                nursery.start_soon(remove)
            assert new["answer"].status_code == 201, new["answer"].text
            session_id = new["answer"].json()["session_id"]
            removal = new["removal"].json()
            assert removal["ended_sessions"] == [session_id]
            assert removal["ending_sessions_failed"] is False
            got, code = await _until_closed(channel)
        kinds = [(m["type"], m.get("session_id") or m.get("ids")) for m in got]
        # The offer went out before the removal committed; end_sessions follows it, then 4403.
        assert ("session_offer", session_id) in kinds
        ends = [m for m in got if m["type"] == "end_sessions"]
        assert [(m["ids"], m["reason"]) for m in ends] == [([session_id], AGENT_REMOVED_REASON)]
        assert kinds.index(("session_offer", session_id)) < got.index(ends[0])
        assert code == CLOSE_AGENT_REMOVED
        row = await store.get_session(agent.team_id, session_id)
        assert row is not None
        assert (row.state, row.state_reason) == (SessionState.ENDED, AGENT_REMOVED_REASON)
        ended = await service.audit_events(agent.team_id, "session.ended")
        assert [(e["session_id"], e["actor"]["id"]) for e in ended] == [
            (session_id, admin.operator_id)
        ]


async def test_a_broker_whose_agent_is_removed_before_its_row_is_stored_is_refused_on_record(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        alice = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            original = service.ctx.store.create_session

            async def removed_first(session: Session) -> Session:
                await store.remove_agent(session.team_id, session.agent_id, service.ctx.now())
                return await original(session)

            service.ctx.store.create_session = removed_first  # type: ignore[method-assign]
            body = {"target": agent.name, "mode": "exec", "command": ["id"]}
            answer = await service.call(alice, "POST", "/v1/sessions", body)
            assert answer.status_code == 404, answer.text
            assert "was removed" in answer.json()["message"]
            refused = await service.audit_events(agent.team_id, "session.refused")
            assert [e["context"]["reason"] for e in refused] == [AGENT_REMOVED_REASON]
            with trio.move_on_after(0.3):
                message = await channel.receive("session_offer")
                raise AssertionError(f"offered to a removed agent: {message}")


async def test_a_broker_whose_agent_is_removed_once_its_row_exists_refuses_it_on_record(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        alice = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            original = service.ctx.store.create_session
            stored: list[str] = []

            async def removed_after(session: Session) -> Session:
                created = await original(session)
                stored.append(created.id)
                # The removal commits right after the row: it is an offer nobody may send.
                await store.remove_agent(session.team_id, session.agent_id, service.ctx.now())
                return created

            service.ctx.store.create_session = removed_after  # type: ignore[method-assign]
            body = {"target": agent.name, "mode": "exec", "command": ["id"]}
            answer = await service.call(alice, "POST", "/v1/sessions", body)
            assert answer.status_code == 404, answer.text
            row = await store.get_session(agent.team_id, stored[0])
            assert row is not None
            assert (row.state, row.state_reason) == (SessionState.REFUSED, AGENT_REMOVED_REASON)
            refused = await service.audit_events(agent.team_id, "session.refused")
            assert [(e["session_id"], e["context"]["reason"]) for e in refused] == [
                (stored[0], AGENT_REMOVED_REASON)
            ]
            with trio.move_on_after(0.3):
                message = await channel.receive("session_offer")
                raise AssertionError(f"offered to a removed agent: {message}")


async def test_deliver_here_does_not_send_an_offer_to_a_removed_agent(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        alice = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            ctx = service.ctx
            now = ctx.now()
            session = await store.create_session(
                Session(
                    id="ses_review10deliver", team_id=agent.team_id, agent_id=agent.agent_id,
                    operator_id=alice.operator_id, operator_key_thumbprint="jkt", mode="exec",
                    command=("id",), relay_id="relay-1", relay_host="127.0.0.1", relay_port=7000,
                    relay_udp_port=None, policy_result="allow", policy_rule_id=None,
                    state=SessionState.OFFERED, state_reason=None, created_at=now,
                    expires_at=now + 60, updated_at=now,
                )
            )  # fmt: skip
            # Removed in the store; this instance's channel is not closed yet (the removal's
            # close comes after its commit).
            await store.remove_agent(agent.team_id, agent.agent_id, now)
            delivered = await deliver_here(ctx, agent.team_id, session.id)
            assert delivered is OfferDelivery.AGENT_REMOVED
            with trio.move_on_after(0.3):
                message = await channel.receive("session_offer")
                raise AssertionError(f"offered to a removed agent: {message}")

