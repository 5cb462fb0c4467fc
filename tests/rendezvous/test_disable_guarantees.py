"""Disabling an operator: the log never records a revocation that did not happen, and the
operator's sessions end on every instance within a sweep even when the disable's own ending
(or its notice to the other instances) failed.

On SQLite and PostgreSQL, with a real control channel answered by the test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from audit.actions import Action
from rendezvous.offer_bus import end_disabled_operators_sessions_here
from rendezvous.store import Store, StoreUnavailable
from tests.rendezvous.sessions_support import agent_channel, enroll_agent, served_instance
from tests.rendezvous.test_operator_disable import _disable, _request, _settled, _take_offer

pytestmark = pytest.mark.anyio


async def test_two_admins_disabling_each_other_leave_one_revocation_on_record(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, _):
        team = await service.team("ops")
        first = await service.operator(team, "admin")
        second = await service.operator(team, "admin")
        record = service.ctx.audit.record
        recorded, other_done = trio.Event(), trio.Event()

        async def pause_after_first_revocation(*args: Any, **kwargs: Any) -> Any:
            await record(*args, **kwargs)
            if kwargs.get("action") is Action.OPERATOR_REVOKED and not recorded.is_set():
                recorded.set()
                await other_done.wait()  # the other admin's disable commits in this gap

        monkeypatch.setattr(service.ctx.audit, "record", pause_after_first_revocation)
        answers: dict[str, int] = {}

        async def first_disables_second() -> None:
            answers["first"] = (await _disable(service, first, second.operator_id))[0]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first_disables_second)
            with trio.fail_after(15):
                await recorded.wait()
            answers["second"] = (await _disable(service, second, first.operator_id))[0]
            other_done.set()
        assert answers == {"first": 409, "second": 200}
        events = await service.audit_events(team)
        revocations = [
            (event["action"], event["target"], event["context"].get("reason"))
            for event in events
            if event["action"] in ("operator.revoked", "operator.revoke_failed")
        ]
        assert revocations == [
            ("operator.revoked", f"operator:{second.operator_id}", None),
            ("operator.revoked", f"operator:{first.operator_id}", None),
            ("operator.revoke_failed", f"operator:{second.operator_id}", "last_active_admin"),
        ]
        stored = await store.get_operator(team, second.operator_id)
        assert stored is not None and stored.is_active()


async def test_a_disable_whose_ending_of_sessions_fails_says_so_and_the_sweep_ends_them(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        alice = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            running = await _request(service, alice)
            await _take_offer(channel, running)
            await _settled(channel)

            async def listing_fails(*args: Any, **kwargs: Any) -> Any:
                raise StoreUnavailable("the database went away")

            monkeypatch.setattr(store, "session_listing", listing_fails)
            status, body = await _disable(service, admin, alice.operator_id)
            monkeypatch.undo()
            assert status == 503
            assert "is disabled" in body["message"] and "retries" in body["message"]
            stored = await store.get_operator(team, alice.operator_id)
            assert stored is not None and not stored.is_active()
            assert not [m for m in await _settled(channel) if m["type"] == "end_sessions"]
            # The instance's periodic sweep (rendezvous/server.py) catches it.
            assert await end_disabled_operators_sessions_here(service.ctx) == 1
            message = await channel.receive("end_sessions")
            assert message == {
                "type": "end_sessions", "ids": [running], "reason": "operator_disabled"
            }  # fmt: skip


async def test_the_sweep_ends_sessions_of_an_operator_whose_notice_was_lost(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        alice = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            hers = await _request(service, alice)
            await _take_offer(channel, hers)
            mine = await _request(service, admin)
            await _take_offer(channel, mine)
            await _settled(channel)
            assert await end_disabled_operators_sessions_here(service.ctx) == 0
            # Disabled with no word to this instance (a notice lost while it reconnected).
            await store.disable_operator(team, alice.operator_id, service.clock.now)
            assert await end_disabled_operators_sessions_here(service.ctx) == 1
            message = await channel.receive("end_sessions")
            assert message["ids"] == [hers] and message["reason"] == "operator_disabled"
        # An instance that holds no channel of the agent tells nobody.
        assert await end_disabled_operators_sessions_here(service.ctx) == 0
