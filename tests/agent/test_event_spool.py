"""Agent-signed audit events not yet acknowledged survive the daemon: kept in STATE_DIR's spool
(slots reserved in one 0600 file, written in place, bounded) and sent again by the next run.
Full disks, torn writes and the old one-file-per-event spool: test_event_spool_full_disk.py."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio

import agent.control_client as control_client
from agent.audit_events import SessionAuditor
from agent.control_client import ControlClient
from agent.event_spool import (
    GARBLED_SUFFIX,
    MAX_EVENT_FILE_BYTES,
    SLOT_FILE_NAME,
    TEMPORARY_SLOT_FILE_NAME,
    EventSpool,
)
from agent.state_file import AgentState
from audit.actions import Action, ActorKind
from audit.record import Actor, AuditEvent, SignedEvent, sign_event
from protocol.identity import SigningIdentity
from rendezvous.store import Store
from tests.agent.session_helpers import trio_test
from tests.agent.test_session_host_daemon import MACHINE, enrolled_agent_stack

WAIT_SECONDS = 15


def _event(number: int, identity: SigningIdentity | None = None) -> SignedEvent:
    key = identity or SigningIdentity.generate()
    event = AuditEvent(
        occurred_at=datetime.now(UTC),
        team_id="tm_1",
        actor=Actor(ActorKind.AGENT, "agt_1", "web-1"),
        action=Action.SESSION_STARTED,
        signer=key.public.key_id,
        session_id=f"ses_{number}",
    )
    return sign_event(key, event)


def _files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def _session_ids(loaded: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [content["event"]["session_id"] for _, content in loaded]


def test_spooled_events_come_back_in_order_from_a_private_file(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    spool = EventSpool(directory)
    assert spool.load() == []
    keys = [spool.add(_event(number).to_json()) for number in range(3)]
    assert all(keys) and len(set(keys)) == 3
    assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
    assert _files(directory) == [SLOT_FILE_NAME]
    assert stat.S_IMODE(os.lstat(directory / SLOT_FILE_NAME).st_mode) == 0o600
    spool.remove(keys[1] or "")
    again = EventSpool(directory)
    loaded = again.load()
    assert [key for key, _ in loaded] == [keys[0], keys[2]]
    assert _session_ids(loaded) == ["ses_0", "ses_2"]
    # Numbering goes on after the last one left: a new event (in the freed slot, the first
    # free one after the last write) comes back after the old ones.
    assert again.add(_event(9).to_json()) is not None
    assert _session_ids(EventSpool(directory).load()) == ["ses_0", "ses_2", "ses_9"]


def test_a_garbled_old_style_spool_file_is_set_aside_with_a_warning_and_the_rest_is_sent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o700)
    good, cut = (_event(number).to_json() for number in (1, 2))
    (directory / "ev-000000000001.json").write_text(json.dumps(good))
    data = json.dumps(cut).encode()
    (directory / "ev-000000000002.json").write_bytes(data[: len(data) // 2])  # power loss
    (directory / "ev-000000000077.json").write_text(json.dumps({**good, "extra": 1}))
    (directory / ".ev-000000000003.json.tmp").write_bytes(b"{")  # never reached its rename
    caplog.set_level(logging.WARNING)
    loaded = EventSpool(directory).load()
    assert [content for _, content in loaded] == [good]
    assert "ignoring the spooled audit event" in caplog.text
    assert _files(directory) == [
        f"ev-000000000002.json{GARBLED_SUFFIX}", f"ev-000000000077.json{GARBLED_SUFFIX}",
        SLOT_FILE_NAME,
    ]  # fmt: skip


def test_a_full_spool_warns_once_and_keeps_new_events_in_memory_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    spool = EventSpool(tmp_path / "spool", slot_count=2, min_slot_count=1)
    spool.load()
    assert spool.add(_event(1).to_json()) and spool.add(_event(2).to_json())
    assert spool.add(_event(3).to_json()) is None
    assert spool.add(_event(4).to_json()) is None
    assert caplog.text.count("is full") == 1
    assert spool.count == 2 and spool.free_slots == 0
    # Larger than any event the agent signs: never spooled.
    huge = {**_event(5).to_json(), "padding": "x" * MAX_EVENT_FILE_BYTES}
    assert EventSpool(tmp_path / "other").add(huge) is None


def test_the_control_client_spools_each_event_and_forgets_what_it_drops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control_client, "MAX_AUDIT_BACKLOG", 3)
    state = AgentState(
        agent_id="agt_1", team_id="tm_1", server_url="http://127.0.0.1:1",
        identity_seed=bytes(32), service_keys={},
    )  # fmt: skip
    spool = EventSpool(tmp_path / "spool")
    client = ControlClient(state, MACHINE.fingerprint(), lambda o: None, event_spool=spool)
    for number in range(3):
        client.send_audit_event(_event(number))
    assert spool.count == 3
    # Past the backlog's bound the oldest are dropped, from memory and from the spool alike.
    for number in range(3, 5):
        client.send_audit_event(_event(number))
    assert client.dropped_audit_events == 2 and client.pending_audit_events == 3
    assert spool.count == 3
    restarted = ControlClient(
        state, MACHINE.fingerprint(), lambda o: None, event_spool=EventSpool(tmp_path / "spool")
    )
    assert restarted.pending_audit_events == 3
    sent_again = [message["event"]["event"]["session_id"] for message in restarted._audit_backlog]
    assert sent_again == ["ses_2", "ses_3", "ses_4"]


def _blocks(work: Callable[[], object]) -> bool:
    """Whether ``work`` is still running after a few seconds (blocked on a FIFO)."""
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(5)
    return worker.is_alive()


def test_a_fifo_in_the_spool_neither_hangs_loading_nor_adding(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o700)
    os.mkfifo(directory / "ev-000000000001.json", 0o600)
    # A FIFO (or link) where the temporary slot file goes is replaced, never written through.
    os.symlink(tmp_path / "elsewhere", directory / TEMPORARY_SLOT_FILE_NAME)
    spool = EventSpool(directory)
    loaded: list[object] = []
    assert not _blocks(lambda: loaded.append(spool.load()))
    assert loaded == [[]] and "not a regular file" in caplog.text
    added: list[str | None] = []
    assert not _blocks(lambda: added.append(spool.add(_event(2).to_json())))
    assert added[0] is not None and not (tmp_path / "elsewhere").exists()
    assert [key for key, _ in EventSpool(directory).load()] == added
    # A FIFO as the slot file: the spool is unusable (new sessions refused), nothing hangs.
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir(mode=0o700)
    os.mkfifo(fifo_dir / SLOT_FILE_NAME, 0o600)
    broken = EventSpool(fifo_dir)
    assert not _blocks(lambda: loaded.append(broken.load()))
    assert not _blocks(lambda: added.append(broken.add(_event(3).to_json())))
    assert added[-1] is None
    reason = broken.refusal_reason(running_sessions=0)
    assert reason is not None and "not a regular file" in reason


def test_each_spooled_event_is_made_durable_in_place_without_allocating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = EventSpool(tmp_path / "spool")
    spool.load()
    size = os.stat(tmp_path / "spool" / SLOT_FILE_NAME).st_size
    synced: list[int] = []
    real_fdatasync = os.fdatasync

    def recording_fdatasync(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    monkeypatch.setattr(os, "open", None)  # no file is created or opened to write an event
    assert spool.add(_event(1).to_json()) is not None
    # The slot file's data, at the size reserved at start: no block allocated, nothing renamed.
    assert synced == [size]


async def _accepted(store: Store, team_id: str, session_id: str) -> bool:
    session = await store.get_session(team_id, session_id)
    return session is not None and session.state.value == "accepted"


@trio_test
async def test_an_event_a_stopped_agent_never_delivered_is_sent_by_its_next_run(
    tmp_path: Path,
) -> None:
    async with enrolled_agent_stack(tmp_path) as stack:
        store, service, admin, state = stack.store, stack.service, stack.admin, stack.state
        spool_dir = tmp_path / "agent" / "audit-spool"
        offers: list[str] = []
        first = ControlClient(
            state, MACHINE.fingerprint(), lambda offer: offers.append(offer["session_id"]),
            event_spool=EventSpool(spool_dir),
        )  # fmt: skip
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first.run)
            with trio.fail_after(WAIT_SECONDS):
                await first.wait_connected()
            body = {"target": "web-1", "mode": "exec", "command": ["id"]}
            response = await service.call(admin, "POST", "/v1/sessions", body)
            assert response.status_code == 201, response.text
            session_id = response.json()["session_id"]
            with trio.fail_after(WAIT_SECONDS):
                while session_id not in offers:  # noqa: ASYNC110 - filled by the client
                    await trio.sleep(0.01)
            first.send_message({"type": "session_offer_ack", "session_id": session_id})
            with trio.fail_after(WAIT_SECONDS):
                while not await _accepted(store, state.team_id, session_id):  # noqa: ASYNC110 - a row
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
        # The session ends as the daemon goes down: the channel is gone, the event is queued.
        auditor = SessionAuditor(state.identity(), state.agent_id, state.team_id, state.name)
        first.send_audit_event(
            auditor.ended(session_id, duration_ms=5, exit_status=None, bytes_in=0, bytes_out=0,
                          reason="shutdown")
        )  # fmt: skip
        assert EventSpool(spool_dir).load() != []
        del first  # the process is gone; only the spool is left

        # The new process runs no session: its live_sessions report waits for the spooled
        # event, so the session ends with the agent's own account, not as lost.
        second = ControlClient(
            state, MACHINE.fingerprint(), lambda offer: None, event_spool=EventSpool(spool_dir),
            live_sessions=frozenset,
        )  # fmt: skip
        assert second.pending_audit_events == 1
        async with trio.open_nursery() as nursery:
            nursery.start_soon(second.run)
            with trio.fail_after(WAIT_SECONDS):
                while second.pending_audit_events:  # noqa: ASYNC110 - answered by the server
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
        assert second.acknowledged_audit_events == 1
        assert EventSpool(spool_dir).load() == []
        session = await store.get_session(state.team_id, session_id)
        assert session is not None
        # The agent's own account (its reason, once the row records it), not "agent_lost".
        assert session.state.value == "ended" and session.state_reason in (None, "shutdown")
        ended = await service.audit_events(state.team_id, Action.SESSION_ENDED.value)
        assert [event["session_id"] for event in ended] == [session_id]
        assert ended[0]["actor"]["kind"] == "agent"
