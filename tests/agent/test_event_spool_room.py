"""The audit spool keeps its word: offers arriving back to back cannot overbook its slots (each
accepted session holds room for its own events from the moment it is accepted), a slot file that
cannot be used is tried again once fixed, with words that fit the reason, and an oversized slot
file is refused without being read."""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection

import agent.event_spool as event_spool
from agent.control_client import ControlClient
from agent.event_spool import (
    NEW_SESSION_SLOTS,
    RESERVE_RETRY_SECONDS,
    SLOT_BYTES,
    SLOT_COUNT,
    SLOT_FILE_NAME,
    EventSpool,
)
from agent.status import DaemonStatus
from audit.actions import Action, ActorKind
from audit.record import Actor, AuditEvent, sign_event
from protocol.identity import SigningIdentity
from tests.agent.session_helpers import trio_test
from tests.agent.test_control_answers import _receive, _state, scripted_rendezvous
from tests.agent.test_session_host_daemon import MACHINE

WAIT_SECONDS = 15
KEY = SigningIdentity.generate()


def _session_event(session_id: str, action: Action, command: str = "") -> dict[str, Any]:
    event = AuditEvent(
        occurred_at=datetime.now(UTC),
        team_id="tm_1",
        actor=Actor(ActorKind.AGENT, "agt_1", "web-1"),
        action=action,
        signer=KEY.public.key_id,
        session_id=session_id,
        context={"command": command} if command else {},
    )
    return sign_event(KEY, event).to_json()


def _fill(spool: EventSpool, leave_free: int) -> None:
    """Unacknowledged events until only ``leave_free`` slots are free."""
    number = 0
    while spool.free_slots > leave_free:
        assert spool.add(_session_event(f"ses_old{number}", Action.SESSION_STARTED)) is not None
        number += 1


def test_sessions_accepted_back_to_back_each_keep_room_for_their_own_events(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = EventSpool(tmp_path / "spool", slot_count=64, min_slot_count=64)
    spool.load()
    _fill(spool, leave_free=20)
    # Offers arrive faster than sessions write their first event: each is checked, accepted
    # (counted as running at once) and promised room before the next one is checked.
    running: set[str] = set()
    while spool.refusal_reason(len(running), running) is None:
        session_id = f"ses_{len(running)}"
        running.add(session_id)
        spool.promise(session_id)
    assert len(running) == 20 // NEW_SESSION_SLOTS
    # Then every accepted session writes its events, a long command line included: all are
    # made durable, none is left in memory only.
    long_command = "x" * (2 * SLOT_BYTES)
    for session_id in sorted(running):
        for action, command in (
            (Action.SESSION_STARTED, ""),
            (Action.SESSION_COMMAND, long_command),
            (Action.SESSION_ENDED, ""),
        ):
            assert spool.add(_session_event(session_id, action, command)) is not None
    assert "kept in memory only" not in caplog.text


def test_a_session_holds_room_for_its_end_once_its_first_events_are_written(
    tmp_path: Path,
) -> None:
    spool = EventSpool(tmp_path / "spool", slot_count=64, min_slot_count=64)
    spool.load()
    _fill(spool, leave_free=NEW_SESSION_SLOTS + 4)
    assert spool.refusal_reason(1, {"ses_a"}) is None
    spool.promise("ses_a")
    # Still owed its events: no room for another session.
    assert spool.refusal_reason(1, {"ses_a"}) is not None
    spool.add(_session_event("ses_a", Action.SESSION_STARTED))
    spool.add(_session_event("ses_a", Action.SESSION_COMMAND, "ls"))
    # Its started and command events are written (2 slots): what is left owed is its end.
    assert spool.refusal_reason(1, {"ses_a"}) is None
    # A promise to a session that is no longer running (refused after all) is dropped.
    spool.promise("ses_b")
    assert spool.refusal_reason(1, {"ses_b"}) is not None
    assert spool.refusal_reason(0, set()) is None


@trio_test
async def test_offers_arriving_back_to_back_do_not_overbook_the_spool(tmp_path: Path) -> None:
    spool = EventSpool(tmp_path / "spool", slot_count=64, min_slot_count=64)
    live: set[str] = set()
    refused: list[str] = []
    done = trio.Event()
    offers_sent = 7

    async def script(websocket: WebSocketConnection) -> None:
        for number in range(offers_sent):
            await websocket.send_message(
                json.dumps({"type": "session_offer", "session_id": f"ses_{number}"})
            )
        while True:
            message = await _receive(websocket)
            if message["type"] == "session_offer_refused":
                refused.append(message["session_id"])
                if len(refused) + len(live) == offers_sent:
                    done.set()

    def on_offer(message: dict[str, Any]) -> None:
        live.add(message["session_id"])  # the session host counts it as running at once
        if len(refused) + len(live) == offers_sent:
            done.set()

    async with scripted_rendezvous(script) as port:
        client = ControlClient(
            _state(port), MACHINE.fingerprint(), on_offer, event_spool=spool,
            live_sessions=lambda: set(live),
        )  # fmt: skip
        _fill(spool, leave_free=20)  # never acknowledged: the script sends no ack
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            with trio.fail_after(WAIT_SECONDS):
                await done.wait()
            nursery.cancel_scope.cancel()
    assert sorted(live) == ["ses_0", "ses_1"]
    assert len(refused) == offers_sent - 2
    # Each accepted session's started, command and ended events are all made durable.
    for session_id in sorted(live):
        for action in (Action.SESSION_STARTED, Action.SESSION_COMMAND, Action.SESSION_ENDED):
            assert spool.add(_session_event(session_id, action, "uptime")) is not None


def test_an_unusable_slot_file_is_tried_again_once_fixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o700)
    (directory / SLOT_FILE_NAME).symlink_to(tmp_path / "elsewhere")
    spool = EventSpool(directory)
    with caplog.at_level(logging.ERROR):
        spool.load()
    reason = spool.refusal_reason(0)
    assert reason is not None and "cannot open" in reason
    assert "tried again every" in caplog.text
    status = DaemonStatus(pid=1, server_url="x", connected=True, updated_at=0.0,
                          audit_spool_problem=reason)  # fmt: skip
    advice = status.problem_lines()[1]
    assert "until it is fixed" in advice and "acknowledges" not in advice
    # The admin removes the link; once the retry interval has passed the spool works again.
    (directory / SLOT_FILE_NAME).unlink()
    now = event_spool.time.monotonic()
    monkeypatch.setattr(event_spool.time, "monotonic", lambda: now + RESERVE_RETRY_SECONDS + 1)
    assert spool.refusal_reason(0) is None
    assert spool.add(_session_event("ses_1", Action.SESSION_STARTED)) is not None
    assert [content["event"]["session_id"] for _, content in EventSpool(directory).load()] == [
        "ses_1"
    ]


def test_a_slot_file_fixed_while_running_keeps_the_events_it_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "spool"
    earlier = EventSpool(directory, slot_count=64, min_slot_count=64)
    earlier.load()
    kept = earlier.add(_session_event("ses_kept", Action.SESSION_ENDED))
    assert kept is not None
    earlier.close()
    # Moved away and a directory left in its place (cannot be opened, even by root).
    os.rename(directory / SLOT_FILE_NAME, tmp_path / "moved")
    (directory / SLOT_FILE_NAME).mkdir()
    spool = EventSpool(directory, slot_count=64, min_slot_count=64)
    spool.load()
    assert spool.refusal_reason(0) is not None
    (directory / SLOT_FILE_NAME).rmdir()
    os.rename(tmp_path / "moved", directory / SLOT_FILE_NAME)
    now = event_spool.time.monotonic()
    monkeypatch.setattr(event_spool.time, "monotonic", lambda: now + RESERVE_RETRY_SECONDS + 1)
    assert spool.refusal_reason(0) is None
    for number in range(10):
        spool.add(_session_event(f"ses_{number}", Action.SESSION_STARTED))
    spool.close()
    loaded = [content["event"]["session_id"] for _, content in EventSpool(directory).load()]
    assert loaded[0] == "ses_kept" and len(loaded) == 11


def test_a_full_spool_and_a_failed_reservation_say_what_ends_the_refusal() -> None:
    full = f"{event_spool.FULL_PREFIX} (3 audit events not yet acknowledged)"
    assert "acknowledges the queued audit events" in event_spool.remedy(full)
    reserve = f"{event_spool.UNUSABLE_PREFIX}: cannot reserve 256 KiB for it in /x (No space)"
    assert "room for it in the state dir" in event_spool.remedy(reserve)
    unwritable = f"{event_spool.UNWRITABLE_PREFIX}: writing an event failed (I/O error)"
    assert "writing to it succeeds again" in event_spool.remedy(unwritable)


def test_an_oversized_slot_file_is_refused_without_being_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o700)
    path = directory / SLOT_FILE_NAME
    with path.open("wb") as handle:
        handle.truncate(10 * 1024**3)  # sparse: 10 GiB that take no room
    os.chmod(path, 0o600)
    read: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        read.append(length)
        return real_pread(fd, length, offset)

    monkeypatch.setattr(event_spool.os, "pread", counting_pread)
    spool = EventSpool(directory)
    assert spool.load() == []
    reason = spool.refusal_reason(0)
    assert reason is not None and "larger than" in reason and str(path) in reason
    assert sum(read) == 0
    assert os.stat(path).st_size == 10 * 1024**3  # left as it was, for the admin to look at


def test_the_slot_file_is_read_in_bounded_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "spool"
    spool = EventSpool(directory)
    spool.load()
    long_command = "y" * (3 * SLOT_BYTES)
    added = [
        spool.add(_session_event(f"ses_{number}", Action.SESSION_COMMAND, long_command))
        for number in range(SLOT_COUNT // 5)
    ]
    assert None not in added
    spool.close()
    read: list[int] = []
    real_pread = os.pread

    def counting_pread(fd: int, length: int, offset: int) -> bytes:
        read.append(length)
        return real_pread(fd, length, offset)

    monkeypatch.setattr(event_spool.os, "pread", counting_pread)
    loaded = EventSpool(directory).load()
    assert [key for key, _ in loaded] == added  # events across chunk edges come back whole
    assert read and max(read) <= event_spool.READ_CHUNK_BYTES
