"""An operator disabled while one of its sessions is being brokered never gets that session.

On SQLite and PostgreSQL, with a real control channel answered by the test. The disable is made
to land in the two gaps where it used to be missed: after the broker's first check of the
operator but before the session row exists (so the disable's look-up of open sessions cannot
find it), and after the row exists but before the offer goes down the channel. Either way the
request is refused with ``operator_disabled`` (audited, row refused) and no offer is sent.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

import rendezvous.session_broker as session_broker
from rendezvous.store import Session, SessionState, Store
from tests.rendezvous.sessions_support import agent_channel, enroll_agent, served_instance
from tests.rendezvous.test_operator_disable import _disable, _settled

pytestmark = pytest.mark.anyio

EXEC = {"target": "web-1", "mode": "exec", "command": ["sleep", "60"]}


async def _request_while_disabling(
    store: Store, tmp_path: Path, pause_in: Callable[[trio.Event, trio.Event], None]
) -> None:
    """Ask for a session, disable its operator at the gap ``pause_in`` opens, check the result."""
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        alice = await service.operator(team, "operator")
        agent = await enroll_agent(service, admin, "web-1")
        async with agent_channel(url, agent) as channel:
            entered, disabled = trio.Event(), trio.Event()
            pause_in(entered, disabled)
            answers: dict[str, Any] = {}

            async def ask() -> None:
                answers["session"] = await service.call(alice, "POST", "/v1/sessions", EXEC)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                with trio.fail_after(15):
                    await entered.wait()
                status, _ = await _disable(service, admin, alice.operator_id)
                assert status == 200
                disabled.set()
            response = answers["session"]
            assert response.status_code == 403, response.text
            assert "disabled" in response.json()["message"]
            sent = await _settled(channel)
            assert [m for m in sent if m["type"] == "session_offer"] == []
        [row] = (await store.session_listing(team)).sessions
        assert row.session.state is SessionState.REFUSED
        assert row.session.state_reason == "operator_disabled"
        refused = await service.audit_events(team, "session.refused")
        assert [(e["session_id"], e["context"]["reason"]) for e in refused] == [
            (row.session.id, "operator_disabled")
        ]


async def test_a_disable_before_the_session_row_exists_refuses_the_session(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_create = store.create_session

    def pause_in(entered: trio.Event, disabled: trio.Event) -> None:
        async def create_session(session: Session) -> Session:
            if session.state is SessionState.OFFERED:
                entered.set()
                await disabled.wait()  # the disable commits in this gap
            return await real_create(session)

        monkeypatch.setattr(store, "create_session", create_session)

    await _request_while_disabling(store, tmp_path, pause_in)


async def test_a_disable_before_the_offer_is_sent_refuses_the_session(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_deliver = session_broker.deliver_offer

    def pause_in(entered: trio.Event, disabled: trio.Event) -> None:
        async def deliver_offer(*args: Any) -> Any:
            entered.set()
            await disabled.wait()  # the disable commits in this gap
            return await real_deliver(*args)

        monkeypatch.setattr(session_broker, "deliver_offer", deliver_offer)

    await _request_while_disabling(store, tmp_path, pause_in)
