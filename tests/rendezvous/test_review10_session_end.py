"""Ending a session twice at once records it once, and a live_sessions report costs a bounded
number of store queries whatever ids it lists. On SQLite and PostgreSQL (the ``store`` fixture).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import trio

from protocol.identity import SigningIdentity
from rendezvous.audit_trail import Action
from rendezvous.control_channel import MAX_LIVE_SESSION_IDS
from rendezvous.errors import ServiceUnavailable
from rendezvous.store import Store
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness
from tests.rendezvous.sessions_support import agent_channel, enroll_agent, served_instance
from tests.rendezvous.test_session_end_api import _open_session, _settled

pytestmark = pytest.mark.anyio

WAIT_SECONDS = 15
REPORTS = 20
# A report's own work: the agent's open sessions (one listing) and the ended ones among its
# ids (one query); a channel may also look its agent up (the removal check).
MAX_STORE_CALLS_PER_REPORT = 3


async def _second_admin(service: ServiceHarness, team_id: str) -> OperatorSession:
    identity = SigningIdentity.generate()
    code = await service.invite(team_id, "admin", "admin2@x.test")
    response = await service.http.post(
        "/v1/operators/enroll", json=service.enrollment(identity, code)
    )
    assert response.status_code == 200, response.text
    token = await service.login(identity)
    return OperatorSession(
        identity, token["operator_id"], team_id, "admin", token["access_token"]
    )


async def test_two_admins_ending_one_session_at_once_leave_one_record(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        admin2 = await _second_admin(service, team)
        alice = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            session_id = await _open_session(service, alice, channel)
            audit = service.ctx.audit
            original = audit.record
            second_answered, first_recording = trio.Event(), trio.Event()
            held = {"first": True}

            async def record_slowly(team_id: str, **fields: Any) -> None:
                if fields["action"] == Action.SESSION_ENDED and held["first"]:
                    # The first end records while the second one runs to its answer.
                    held["first"] = False
                    first_recording.set()
                    with trio.fail_after(WAIT_SECONDS):
                        await second_answered.wait()
                await original(team_id, **fields)

            audit.record = record_slowly  # type: ignore[method-assign]
            answers: list[tuple[str, int, Any]] = []

            async def end(who: OperatorSession, first: bool) -> None:
                if not first:
                    with trio.fail_after(WAIT_SECONDS):
                        await first_recording.wait()
                response = await service.call(who, "POST", f"/v1/sessions/{session_id}/end")
                answers.append((who.operator_id, response.status_code, response.json()))
                if not first:
                    second_answered.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(end, admin, True)
                nursery.start_soon(end, admin2, False)
            records = await service.audit_events(team, "session.ended")
            assert [(r["actor"]["id"], r["context"]["reason"]) for r in records] == [
                (admin.operator_id, "ended_by_admin")
            ]
            by_admin = {operator: (status, body) for operator, status, body in answers}
            status, body = by_admin[admin.operator_id]
            assert status == 200 and body["already_ended"] is False
            status, body = by_admin[admin2.operator_id]
            assert status == 409 and body["error"] == "session_being_ended", body
            assert session_id in body["message"]
            # Once the first has finished, a repeat is answered as it is.
            again = await service.call(admin2, "POST", f"/v1/sessions/{session_id}/end")
            assert again.status_code == 200 and again.json()["already_ended"] is True
            assert len(await service.audit_events(team, "session.ended")) == 1


async def test_an_end_whose_record_failed_does_not_block_the_next_one(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        alice = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            session_id = await _open_session(service, alice, channel)
            audit = service.ctx.audit
            original = audit.record
            failing = {"once": True}

            async def record_failing_once(team_id: str, **fields: Any) -> None:
                if fields["action"] == Action.SESSION_ENDED and failing["once"]:
                    failing["once"] = False
                    raise ServiceUnavailable("the audit log is unavailable (test)")
                await original(team_id, **fields)

            audit.record = record_failing_once  # type: ignore[method-assign]
            failed = await service.call(admin, "POST", f"/v1/sessions/{session_id}/end")
            assert failed.status_code == 503, failed.text
            ended = await service.call(admin, "POST", f"/v1/sessions/{session_id}/end")
            assert ended.status_code == 200, ended.text
            assert ended.json()["already_ended"] is False
            assert ended.json()["session"]["state"] == "ended"


async def test_a_live_sessions_report_costs_a_bounded_number_of_store_calls(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            calls: dict[str, int] = {}

            def counted(name: str, method: Any) -> Any:
                async def call(*args: Any, **kwargs: Any) -> Any:
                    calls[name] = calls.get(name, 0) + 1
                    return await method(*args, **kwargs)

                return call

            for name in dir(store):
                method = getattr(store, name)
                if not name.startswith("_") and inspect.iscoroutinefunction(method):
                    setattr(store, name, counted(name, method))
            for report in range(REPORTS):
                ids = [f"ses_{report:04d}{i:04d}{'x' * 40}" for i in range(MAX_LIVE_SESSION_IDS)]
                await channel.send({"type": "live_sessions", "ids": ids})
            await _settled(channel)
        total = sum(count for name, count in calls.items() if name != "touch_agent")
        assert total <= REPORTS * MAX_STORE_CALLS_PER_REPORT, calls
        assert calls.get("get_session", 0) == 0, calls
