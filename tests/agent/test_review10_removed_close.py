"""A control channel the rendezvous closes because an admin removed this agent (4403) ends
every session the agent process runs, with the reason ``agent_removed``, as an
``end_sessions`` would: an offer that raced the removal must not outlive it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.control_client import ControlClient
from rendezvous.store import open_store
from tests.agent.test_control_client import (
    MACHINE,
    WAIT_SECONDS,
    enrolled_agent,
    fast_backoff,
    free_port,
    rendezvous_on,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


async def test_a_removed_close_ends_every_running_session_as_agent_removed(
    tmp_path: Path,
) -> None:
    store_url = f"sqlite:///{tmp_path / 'rendezvous.db'}"
    running = {f"ses_running{i:03d}" for i in range(70)}  # more than one message holds
    messages: list[dict[str, Any]] = []
    ended = trio.Event()

    def on_offer(message: dict[str, Any]) -> None:
        messages.append(message)
        if message.get("type") == "end_sessions":
            named = {i for m in messages if m["type"] == "end_sessions" for i in m["ids"]}
            if named >= running:
                ended.set()

    async with rendezvous_on(tmp_path / "data", store_url, free_port()) as url:
        state = await enrolled_agent(url, store_url, tmp_path / "state")
        client = ControlClient(
            state, MACHINE.fingerprint(), on_offer, backoff=fast_backoff(),
            live_sessions=lambda: frozenset(running),
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            with trio.fail_after(WAIT_SECONDS):
                await client.wait_connected()
            assert messages == []
            async with open_store(store_url) as store:
                await store.remove_agent(state.team_id, state.agent_id, time.time())
            # The channel's next heartbeat finds the agent removed and closes it with 4403.
            with trio.fail_after(WAIT_SECONDS):
                await ended.wait()
            nursery.cancel_scope.cancel()
    ends = [m for m in messages if m["type"] == "end_sessions"]
    assert {m["reason"] for m in ends} == {"agent_removed"}
    assert sorted(i for m in ends for i in m["ids"]) == sorted(running)
    assert all(0 < len(m["ids"]) <= 64 for m in ends)
    assert "removed" in (client.last_error or "")


async def test_another_close_ends_no_session(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'rendezvous.db'}"
    messages: list[dict[str, Any]] = []
    port = free_port()
    async with rendezvous_on(tmp_path / "data", store_url, port) as url:
        state = await enrolled_agent(url, store_url, tmp_path / "state")
    client = ControlClient(
        state, MACHINE.fingerprint(), messages.append, backoff=fast_backoff(),
        live_sessions=lambda: frozenset({"ses_running"}),
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        async with rendezvous_on(tmp_path / "data", store_url, port):
            with trio.fail_after(WAIT_SECONDS):
                await client.wait_connected()
        # The rendezvous stopped (1001 going away, then refused connections): not a removal.
        with trio.fail_after(WAIT_SECONDS):
            await client.wait_disconnected()
        await trio.sleep(0.5)
        nursery.cancel_scope.cancel()
    assert [m for m in messages if m["type"] == "end_sessions"] == []
