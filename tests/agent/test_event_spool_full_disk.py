"""The audit spool on a full disk, after a kill -9 and a torn write, and the spool of earlier
versions: an agent-signed event is made durable without allocating a block (slots reserved at
start), a write cut short is never taken for an event, and when the slots run short new sessions
are refused with the reason (no audit, no action) while running ones go on.

Full disks are real: a small tmpfs (root only, as in test_recording_durability.py; skipped with
the reason otherwise), filled to the last byte; the writer is a real process, killed with
SIGKILL.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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
    SLOT_BYTES,
    SLOT_FILE_NAME,
    TEMPORARY_SLOT_FILE_NAME,
    EventSpool,
)
from agent.status import read_status
from audit.actions import Action, ActorKind
from audit.record import Actor, AuditEvent, sign_event
from protocol.identity import SigningIdentity
from tests.agent.session_helpers import trio_test
from tests.agent.test_control_answers import _receive, _state, scripted_rendezvous
from tests.agent.test_event_spool import _event
from tests.agent.test_session_host_daemon import MACHINE

REPOSITORY = Path(__file__).resolve().parents[2]
WAIT_SECONDS = 20

# Loads (reserving its slots), says so, waits for a line, spools every event of the JSON file
# named by argv[2] and prints their keys, then waits to be killed.
WRITER = """
import json, sys, time
from pathlib import Path
from agent.event_spool import EventSpool
spool = EventSpool(Path(sys.argv[1]))
spool.load()
print("loaded", flush=True)
sys.stdin.readline()
events = json.loads(Path(sys.argv[2]).read_text())
print(json.dumps([spool.add(event) for event in events]), flush=True)
time.sleep(600)
"""


@contextmanager
def small_tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``directory`` (root only: skipped with the reason otherwise)."""
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(directory)],
        capture_output=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {mounted.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def fill(path: Path) -> None:
    """Write ``path`` until the file system has not one byte left."""
    with path.open("ab", buffering=0) as handle:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1):
            try:
                while True:
                    handle.write(b"\0" * chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC
    with pytest.raises(OSError, match="No space left"):
        (path.parent / "one-more").write_bytes(b"x")


def _large_event(number: int) -> dict[str, Any]:
    """An event whose record spans several disk sectors of its slot."""
    key = SigningIdentity.generate()
    event = AuditEvent(
        occurred_at=datetime.now(UTC), team_id="tm_1",
        actor=Actor(ActorKind.AGENT, "agt_1", "web-1"), action=Action.SESSION_COMMAND,
        signer=key.public.key_id, session_id=f"ses_{number}",
        context={"command": f"{number} " * 1200},
    )  # fmt: skip
    return sign_event(key, event).to_json()


def _contents(loaded: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    return [content for _, content in loaded]


def test_events_spooled_on_a_full_disk_survive_a_kill_and_come_back_intact(
    tmp_path: Path,
) -> None:
    events = [_event(number).to_json() for number in range(20)]
    events_file = tmp_path / "events.json"
    events_file.write_text(json.dumps(events))
    with small_tmpfs(tmp_path / "state", "8m") as state:
        spool_dir = state / "audit-spool"
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(spool_dir), str(events_file)],
            cwd=REPOSITORY, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert writer.stdout is not None and writer.stdin is not None
            assert writer.stdout.readline().split()[0] == "loaded"
            fill(state / "filler")  # the agent runs; then the disk fills up
            writer.stdin.write("go\n")
            writer.stdin.flush()
            keys = json.loads(writer.stdout.readline())
        finally:
            writer.send_signal(signal.SIGKILL)
            writer.wait()
        assert None not in keys  # durable on a full disk: before, each write failed (ENOSPC)
        assert sorted(os.listdir(spool_dir)) == [SLOT_FILE_NAME]  # no temporary file left
        (state / "filler").unlink()
        restarted = EventSpool(spool_dir)
        loaded = restarted.load()
        restarted.close()
        assert [key for key, _ in loaded] == keys
        assert _contents(loaded) == events


def test_on_a_nearly_full_disk_fewer_slots_are_reserved_and_on_a_full_one_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with small_tmpfs(tmp_path / "state", "1m") as state:
        # Room for about half the minimum reservation's worth of the default one.
        (state / "filler").write_bytes(bytes(1024 * 1024 - 300 * 1024))
        spool = EventSpool(state / "small")
        spool.load()
        assert 64 <= spool.reserved_slots < 128 and "room for only" in caplog.text
        assert spool.add(_event(1).to_json()) is not None
        assert spool.refusal_reason(running_sessions=0) is None
        assert os.listdir(state / "small") == [SLOT_FILE_NAME]
        spool.close()
        fill(state / "filler")
        # No room for even the minimum: unusable, said so, and nothing left behind.
        none = EventSpool(state / "none")
        caplog.clear()
        assert none.load() == []
        assert os.listdir(state / "none") == []  # the temporary slot file is removed
        reason = none.refusal_reason(running_sessions=0)
        assert reason is not None and "cannot reserve" in reason
        assert "No space left on device" in reason and "unusable" in caplog.text
        assert none.add(_event(2).to_json()) is None
        assert os.listdir(state / "none") == []


def test_leftover_temporary_files_are_removed_at_start(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o700)
    for name in (TEMPORARY_SLOT_FILE_NAME, ".ev-000000000001.json.tmp",
                 ".ev-000000000002.json.tmp", ".ev-000000000003.json.tmp"):  # fmt: skip
        (directory / name).write_bytes(b"")  # 0-byte, as writes on a full disk left them
    EventSpool(directory).load()
    assert os.listdir(directory) == [SLOT_FILE_NAME]


def _slot_file_bytes(directory: Path, offset: int, data: bytes) -> None:
    fd = os.open(directory / SLOT_FILE_NAME, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def test_a_torn_write_is_dropped_with_a_warning_and_never_taken_for_an_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    kept, old, new = (_large_event(number) for number in range(3))
    # The record a write of ``new`` into a slot puts there (written by a spool of its own).
    scratch = EventSpool(tmp_path / "scratch")
    scratch.load()
    assert scratch.add(new) == "slot-0-1"
    scratch.close()
    record = (tmp_path / "scratch" / SLOT_FILE_NAME).read_bytes()[:SLOT_BYTES]
    directory = tmp_path / "spool"
    for freed, torn in (
        # The old event's clearing was lost (power loss); the new one's tail landed, not its
        # header. Taken for the old event, it would be resent with the new one's bytes.
        (False, (512, record[512:])),
        # The old event was cleared; the new one's header landed, not the rest.
        (True, (0, record[:512])),
    ):
        spool = EventSpool(directory)
        assert spool.load() == []
        assert spool.add(kept) is not None
        old_key = spool.add(old)
        assert old_key is not None
        spool.close()
        slot = int(old_key.split("-")[1])
        if freed:
            _slot_file_bytes(directory, slot * SLOT_BYTES, bytes(SLOT_BYTES))
        _slot_file_bytes(directory, slot * SLOT_BYTES + torn[0], torn[1])
        caplog.clear()
        again = EventSpool(directory)
        assert _contents(again.load()) == [kept]  # neither the old event nor a new one
        assert "checksum does not match (a write cut short)" in caplog.text
        # The torn slot is free again, and what is written there next is read back whole.
        assert again.free_slots == again.reserved_slots - 1
        assert again.add(new) is not None
        again.close()
        assert _contents(EventSpool(directory).load()) == [kept, new]
        (directory / SLOT_FILE_NAME).unlink()


def test_the_spool_of_earlier_versions_is_moved_into_slots(tmp_path: Path) -> None:
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o700)
    events = [_event(number).to_json() for number in range(5)]
    for number, event in enumerate(events):
        (directory / f"ev-{number + 7:012d}.json").write_text(json.dumps(event))
    (directory / ".ev-000000000012.json.tmp").write_bytes(b"")
    loaded = EventSpool(directory).load()
    assert _contents(loaded) == events
    assert all(key.startswith("slot-") for key, _ in loaded)
    assert os.listdir(directory) == [SLOT_FILE_NAME]
    again = EventSpool(directory)
    assert _contents(again.load()) == events
    # Too many for the slots: the rest stay files, sent and removed as before.
    crowded = tmp_path / "crowded"
    crowded.mkdir(mode=0o700)
    for number, event in enumerate(events):
        (crowded / f"ev-{number + 1:012d}.json").write_text(json.dumps(event))
    small = EventSpool(crowded, slot_count=3, min_slot_count=1)
    loaded = small.load()
    assert _contents(loaded) == events
    assert [key for key, _ in loaded][3:] == ["ev-000000000004.json", "ev-000000000005.json"]
    for key, _ in loaded:
        small.remove(key)
    assert os.listdir(crowded) == [SLOT_FILE_NAME] and EventSpool(crowded).load() == []


def test_a_write_that_fails_leaves_nothing_behind_and_keeps_the_event_in_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = EventSpool(tmp_path / "spool")
    spool.load()

    def failing(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fdatasync", failing)
    assert spool.add(_event(1).to_json()) is None
    assert spool.problem is not None and "Input/output error" in spool.problem
    reason = spool.refusal_reason(running_sessions=0)
    assert reason is not None and "cannot be written" in reason  # no new session meanwhile
    monkeypatch.undo()
    monkeypatch.setattr(event_spool, "RESERVE_RETRY_SECONDS", 0.0)
    assert spool.refusal_reason(running_sessions=0) is None  # it can be written again
    assert os.listdir(tmp_path / "spool") == [SLOT_FILE_NAME]
    # Its header was cleared: the slot is not taken for an event at the next start.
    assert EventSpool(tmp_path / "spool").load() == []


@trio_test
async def test_new_sessions_are_refused_while_the_spool_is_full_and_running_ones_go_on(
    tmp_path: Path,
) -> None:
    slots = NEW_SESSION_SLOTS + 6
    spool = EventSpool(tmp_path / "spool", slot_count=slots, min_slot_count=1)
    offers: list[dict[str, Any]] = []
    refused: list[dict[str, Any]] = []
    answered = trio.Event()
    acknowledge = trio.Event()
    live = {"ses_running"}

    async def script(websocket: WebSocketConnection) -> None:
        in_flight: list[str] = []
        offered_again: list[bool] = []
        await websocket.send_message(json.dumps({"type": "session_offer", "session_id": "ses_1"}))
        while True:
            with trio.move_on_after(0.1):
                message = await _receive(websocket)
                if message["type"] == "audit_event":
                    in_flight.append(message["id"])
                elif message["type"] == "session_offer_refused":
                    refused.append(message)
                    answered.set()
            if acknowledge.is_set() and in_flight:
                for event_id in in_flight:
                    await websocket.send_message(
                        json.dumps({"type": "audit_event_ack", "id": event_id})
                    )
                in_flight.clear()
                if not offered_again:
                    offered_again.append(True)
                    await websocket.send_message(
                        json.dumps({"type": "session_offer", "session_id": "ses_2"})
                    )

    status_file = tmp_path / "status.json"
    async with scripted_rendezvous(script) as port:
        client = ControlClient(
            _state(port), MACHINE.fingerprint(), offers.append, event_spool=spool,
            live_sessions=lambda: set(live), status_file=status_file,
        )  # fmt: skip
        # Unacknowledged events leave room for the running session's end, none for a new
        # session's events.
        for number in range(slots - NEW_SESSION_SLOTS - 1):
            client.send_audit_event(_event(number))
        assert client.audit_spool_problem is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            with trio.fail_after(WAIT_SECONDS):
                await answered.wait()
                status = read_status(status_file)
                assert status is not None and status.audit_spool_problem is not None
                assert "audit spool is full" in status.problem_lines()[0]
                # The running session ends: its event is still spooled, its audit kept.
                client.send_audit_event(_event(99))
                live.clear()
                assert spool.count == slots - NEW_SESSION_SLOTS
                acknowledge.set()
                while not offers:  # noqa: ASYNC110 - filled by the client
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    [refusal] = refused
    assert refusal["session_id"] == "ses_1"
    assert "audit spool is full" in refusal["reason"]
    assert "not yet acknowledged" in refusal["reason"]
    # Once acknowledged the slots are free again: the next offer goes to the session host.
    assert [offer["session_id"] for offer in offers] == ["ses_2"]
    assert client.audit_spool_problem is None and spool.count == 0
    status = read_status(status_file)
    assert status is not None and status.problem_lines() == []
