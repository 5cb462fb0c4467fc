"""An offer goes to its agent once from an instance, whichever of the agent's channels it went
down: the agent refused a repeat, and the rendezvous then marked refused a session it ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from rendezvous import session_broker
from rendezvous.offer_bus import OfferDelivery, catch_up_offers, deliver_here, offer_message
from rendezvous.store import Store
from tests.rendezvous.sessions_support import (
    WAIT_SECONDS,
    AgentChannel,
    agent_channel,
    enroll_agent,
    served_instance,
)

pytestmark = pytest.mark.anyio


async def _no_offer(channel: AgentChannel) -> None:
    """A heartbeat's answer comes back with no session offer before it."""
    await channel.send({"type": "heartbeat"})
    with trio.fail_after(WAIT_SECONDS):
        while True:
            message = json.loads(await channel.ws.get_message())
            assert message.get("type") != "session_offer", message
            if message.get("type") == "heartbeat_ack":
                return


async def test_an_offer_whose_channel_closed_unanswered_is_not_offered_again_on_the_next(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as first:
            response = await service.call(admin, "POST", "/v1/sessions",
                                          {"target": "web-1", "mode": "shell"})  # fmt: skip
            assert response.status_code == 201, response.text
            session_id = response.json()["session_id"]
            assert (await first.receive("session_offer"))["session_id"] == session_id
        # Its ack lost with the channel (the store failed): the agent holds it, still offered.
        connections = service.ctx.connections
        assert connections is not None
        with trio.fail_after(WAIT_SECONDS):
            while len(connections):  # noqa: ASYNC110 - the server drops the closed channel
                await trio.sleep(0.02)
        async with agent_channel(url, agent) as second:
            assert await catch_up_offers(service.ctx) == (0, 0)
            assert await deliver_here(service.ctx, team, session_id) is OfferDelivery.SENT
            await _no_offer(second)
        row = await store.get_session(team, session_id)
        assert row is not None and row.state.value == "offered"


async def test_two_deliveries_of_one_new_offer_at_once_send_it_once(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def published(*_: object) -> OfferDelivery:
        return OfferDelivery.SENT  # as if the notice went to another instance

    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            with monkeypatch.context() as patch:
                patch.setattr(session_broker, "deliver_offer", published)
                response = await service.call(admin, "POST", "/v1/sessions",
                                              {"target": "web-1", "mode": "shell"})  # fmt: skip
            assert response.status_code == 201, response.text
            session_id = response.json()["session_id"]
            # The broker's (its notice) and a catch-up's, both past the first look before either
            # sends.
            results: list[OfferDelivery] = []

            async def deliver() -> None:
                results.append(await deliver_here(service.ctx, team, session_id))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(deliver)
                nursery.start_soon(deliver)
            assert results == [OfferDelivery.SENT, OfferDelivery.SENT]
            assert (await channel.receive("session_offer"))["session_id"] == session_id
            await _no_offer(channel)


async def test_an_offer_no_channel_could_queue_is_not_taken_for_sent(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def published(*_: object) -> OfferDelivery:
        return OfferDelivery.SENT  # as if the notice went to another instance

    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            with monkeypatch.context() as patch:
                patch.setattr(session_broker, "deliver_offer", published)
                response = await service.call(admin, "POST", "/v1/sessions",
                                              {"target": "web-1", "mode": "shell"})  # fmt: skip
            assert response.status_code == 201, response.text
            session_id = response.json()["session_id"]
            session = await store.get_session(team, session_id)
            assert session is not None
            connections = service.ctx.connections
            assert connections is not None
            # A slow agent: its channel's queue is full, so the offer cannot be queued now
            # (nothing awaits from here to the check, so the send loop drains none of it).
            live = connections.channels(team, agent.agent_id)[-1]
            while True:
                try:
                    live.outgoing.send_nowait({"type": "heartbeat_ack"})
                except trio.WouldBlock:
                    break
            offer = offer_message(service.ctx, session, service.ctx.now())
            assert not connections.send_now(team, agent.agent_id, offer)
            assert not connections.was_offered(team, agent.agent_id, session_id)
            # Once the queue drains, the next delivery sends it.
            assert await deliver_here(service.ctx, team, session_id) is OfferDelivery.SENT
            assert (await channel.receive("session_offer"))["session_id"] == session_id
