"""Recordings that outlive a killed agent and a full disk, and say how they ended.

A killed agent's recording holds what the operator saw up to the last second and is marked
interrupted, with a signed session.ended, at the next start; with recording on a full disk
refuses the session, or ends it, with the reason; every recording is listed with its state,
and a damaged one plays up to the damage. Full disks are real: a 64 KiB tmpfs (root only; the
tests skip without it) or /dev/full.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.main import main as agent_main
from agent.recording import (
    END_MARKER,
    FLUSH_INTERVAL_SECONDS,
    INTERRUPTED_MARKER,
    MARKER_RESERVE_BYTES,
    TRUNCATED_MARKER,
    RecordingState,
    SessionRecorder,
    list_recordings,
    recover_interrupted_recordings,
)
from audit.actions import Action
from audit.main import main as audit_main
from protocol.control import Close
from tests.agent.session_helpers import trio_test
from tests.agent.test_recording import _exported_with, read_cast, replayed_output
from tests.agent.test_session_host import (
    exec_start,
    operator_session,
    session_stack,
    wait_for_sessions_to_end,
)
from tests.audit.builders import AUDIT_KEY

REPOSITORY = Path(__file__).resolve().parents[2]
HEADER_FIELDS = {"version": 2, "width": 80, "height": 24, "timestamp": 1700000000}


def write_cast(path: Path, lines: list[Any], *, mode: int = 0o400, legacy: bool = False) -> None:
    """A recording as an agent leaves it: header (with the end-marker key unless ``legacy``),
    then one JSON line per event (a bytes item is written as it is)."""
    header = dict(HEADER_FIELDS) if legacy else {**HEADER_FIELDS, "tucdesk": {"end_marker": True}}
    body = json.dumps(header).encode() + b"\n"
    for line in lines:
        body += line if isinstance(line, bytes) else json.dumps(line).encode() + b"\n"
    path.write_bytes(body)
    path.chmod(mode)


# ---- a killed agent --------------------------------------------------------------------------

RECORDING_CHILD = """
import sys, trio
from pathlib import Path
from agent.recording import SessionRecorder

async def main():
    recorder = await SessionRecorder.create(Path(sys.argv[1]), "ses_killed")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(recorder.flush_periodically)
        await recorder.output(1, b"start\\r\\n")
        print("recorded", flush=True)
        await trio.sleep(60)

trio.run(main)
"""


def test_a_killed_agent_leaves_what_was_seen_and_it_is_marked_interrupted_at_start(
    tmp_path: Path,
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", RECORDING_CHILD, str(tmp_path)],
        cwd=REPOSITORY, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None and child.stdout.readline() == "recorded\n"
        path = tmp_path / "ses_killed.cast"
        # The header is on disk at once, the output within FLUSH_INTERVAL_SECONDS: a kill -9
        # (root erasing a session's evidence) loses nothing the operator saw before it.
        assert json.loads(path.read_bytes().split(b"\n")[0])["version"] == 2
        deadline = time.monotonic() + FLUSH_INTERVAL_SECONDS + 2
        while b"start" not in path.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    _, events = read_cast(path)
    assert replayed_output(events) == b"start\r\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # never finished by its agent
    [listed] = list_recordings(tmp_path)
    assert listed.state is RecordingState.INTERRUPTED

    [recovered] = recover_interrupted_recordings(tmp_path)
    data = path.read_bytes()
    assert recovered.session_id == "ses_killed"
    assert recovered.summary.sha256 == hashlib.sha256(data).hexdigest()
    assert recovered.summary.bytes == len(data)
    _, events = read_cast(path)
    assert events[-1][1:] == ["m", INTERRUPTED_MARKER]
    assert stat.S_IMODE(path.stat().st_mode) == 0o400
    [listed] = list_recordings(tmp_path)
    assert listed.state is RecordingState.INTERRUPTED and not listed.detail
    assert recover_interrupted_recordings(tmp_path) == []  # once only


@trio_test
async def test_at_start_the_agent_warns_and_audits_each_interrupted_recording(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recordings = tmp_path / "recordings"
    recordings.mkdir(mode=0o700)
    # Left by a killed agent: 0600, no end marker; one cut off after its size limit.
    write_cast(recordings / "ses_cut.cast", [[0.5, "o", "top secret output"]], mode=0o600)
    write_cast(
        recordings / "ses_big.cast",
        [[1.25, "o", "aaaa"], [1.25, "m", TRUNCATED_MARKER]],
        mode=0o600,
    )
    # Not to be touched: finished ones, one written before end markers, one cut mid-line by a
    # full disk but finished (its session.ended was sent then).
    write_cast(recordings / "ses_done.cast", [[0.1, "o", "x"], [0.2, "m", END_MARKER]])
    write_cast(recordings / "ses_old.cast", [[0.1, "o", "x"]], mode=0o600, legacy=True)
    write_cast(recordings / "ses_full.cast", [[0.1, "o", "x"], b'[0.2, "o", "y'])
    untouched = {
        name: (recordings / name).read_bytes()
        for name in ("ses_done.cast", "ses_old.cast", "ses_full.cast")
    }
    caplog.set_level(logging.INFO)
    async with session_stack(tmp_path, record_sessions=True) as stack:
        await stack.host.recover_interrupted_recordings()
    for name, data in untouched.items():
        assert (recordings / name).read_bytes() == data
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert any("ses_cut.cast" in w and "left unfinished" in w for w in warnings)
    assert not any("top secret" in r.getMessage() for r in caplog.records)
    ended = {event.event.session_id: event for event in stack.audit}
    assert set(ended) == {"ses_cut", "ses_big"}
    for session_id, event in ended.items():
        event.verify(stack.agent.public)
        assert event.event.action is Action.SESSION_ENDED
        context = event.event.context
        assert str(context["reason"]).startswith("interrupted")
        data = (recordings / f"{session_id}.cast").read_bytes()
        assert context["recording"] == {
            "file": f"{session_id}.cast",
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "truncated": session_id == "ses_big",
            "failed": False,
        }
    assert ended["ses_cut"].event.context["duration_ms"] == 500
    states = {info.session_id: info.state for info in list_recordings(recordings)}
    assert states["ses_cut"] is RecordingState.INTERRUPTED
    assert states["ses_big"] is RecordingState.INTERRUPTED
    # The marked file checks out against the signed event, as any recording does.
    bundle = await _exported_with(tmp_path, stack.agent, ended["ses_cut"])
    key = tmp_path / "audit.pub"
    key.write_bytes(AUDIT_KEY.public.to_pem())
    argv = ["recording", str(recordings / "ses_cut.cast"), "--export", str(bundle),
            "--key", str(key)]  # fmt: skip
    assert await trio.to_thread.run_sync(audit_main, argv) == 0


# ---- a full disk -----------------------------------------------------------------------------


@contextmanager
def small_tmpfs(directory: Path, free_bytes: int) -> Iterator[Path]:
    """A 64 KiB tmpfs at ``directory`` with about ``free_bytes`` left (root only)."""
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(directory)],
        capture_output=True, check=False,
    )  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {mounted.stderr.decode().strip()}")
    try:
        (directory / "filler").write_bytes(b"\0" * (64 * 1024 - free_bytes))
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


@trio_test
async def test_with_recording_on_a_full_disk_refuses_the_session_and_says_why(
    tmp_path: Path,
) -> None:
    with small_tmpfs(tmp_path / "recordings", free_bytes=0) as recordings:
        async with (
            session_stack(tmp_path, record_sessions=True) as stack,
            trio.open_nursery() as nursery,
        ):
            async with operator_session(stack, nursery, command=("echo", "ran")) as operator:
                await operator.start(exec_start("echo", "ran"))
                await operator.until_closed()
            await wait_for_sessions_to_end(stack)
        assert b"ran" not in operator.stdout
        assert operator.exit_status() is None
        [close] = [control for control in operator.controls if isinstance(control, Close)]
        assert close.reason == "internal-error"
        assert "No space left on device" in close.message
        assert stack.actions() == [Action.SESSION_REFUSED]
        assert not list(recordings.glob("*.cast"))  # no empty file left behind


@trio_test
async def test_a_disk_that_fills_mid_session_ends_the_session_with_the_reason(
    tmp_path: Path,
) -> None:
    # Lots of output, then a long pause: the session must end at the next flush, not later.
    command = ("sh", "-c", "head -c 100000 /dev/zero | tr '\\0' a; echo; sleep 20")
    with small_tmpfs(tmp_path / "recordings", free_bytes=8192) as recordings:
        began = time.monotonic()
        async with (
            session_stack(tmp_path, record_sessions=True) as stack,
            trio.open_nursery() as nursery,
        ):
            async with operator_session(stack, nursery, command=command) as operator:
                await operator.start(exec_start(*command))
                await operator.until_closed()
            await wait_for_sessions_to_end(stack)
        assert time.monotonic() - began < 10
        assert operator.exit_status() is None
        [close] = [control for control in operator.controls if isinstance(control, Close)]
        assert close.reason == "internal-error"
        assert "must record" in close.message and "No space left on device" in close.message
        ended = [e for e in stack.audit if e.event.action is Action.SESSION_ENDED]
        assert ended[0].event.context["reason"] == "recording-failed"
        recording = ended[0].event.context["recording"]
        assert isinstance(recording, dict) and recording["failed"] is True
        [listed] = list_recordings(recordings)
        assert listed.state is RecordingState.DAMAGED


# ---- the size limit --------------------------------------------------------------------------


@trio_test
async def test_a_chunk_larger_than_the_room_left_is_recorded_up_to_the_limit(
    tmp_path: Path,
) -> None:
    limit = 4096
    recorder = await SessionRecorder.create(tmp_path, "ses_big", max_bytes=limit)
    chunk = ("é\x1b[0m" * 2000).encode()  # 14 KB, with escapes that grow in JSON
    await recorder.output(1, chunk)
    await recorder.output(1, b"after")
    summary = await recorder.close()
    path = tmp_path / "ses_big.cast"
    assert summary.truncated and summary.bytes == path.stat().st_size <= limit
    _, events = read_cast(path)
    assert [event[1:] for event in events[-2:]] == [["m", TRUNCATED_MARKER], ["m", END_MARKER]]
    recorded = replayed_output(events).decode()
    assert chunk.decode().startswith(recorded)
    assert len(path.read_bytes()) > limit - MARKER_RESERVE_BYTES - 64


# ---- listing and playing ---------------------------------------------------------------------


def test_every_recording_is_listed_with_how_it_ended(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    write_cast(recordings / "ses_a.cast", [[0.1, "o", "x"], [0.2, "m", END_MARKER]])
    write_cast(
        recordings / "ses_b.cast",
        [[0.1, "o", "x"], [0.1, "m", TRUNCATED_MARKER], [0.3, "m", END_MARKER]],
    )
    write_cast(recordings / "ses_c.cast", [[0.1, "o", "x"], [0.1, "m", INTERRUPTED_MARKER]])
    write_cast(recordings / "ses_d.cast", [[0.1, "o", "x"], b'[0.2, "o", "cut by ENOS'])
    (recordings / "ses_e.cast").write_bytes(b"")
    write_cast(recordings / "ses_f.cast", [[0.1, "o", "x"]], legacy=True)
    states = {info.session_id: info.state for info in list_recordings(recordings)}
    assert states == {
        "ses_a": RecordingState.COMPLETE,
        "ses_b": RecordingState.TRUNCATED,
        "ses_c": RecordingState.INTERRUPTED,
        "ses_d": RecordingState.DAMAGED,
        "ses_e": RecordingState.DAMAGED,
        "ses_f": RecordingState.COMPLETE,
    }
    assert agent_main(["recordings", "list", "--state-dir", str(tmp_path)], {}) == 0
    listing = capsys.readouterr().out
    assert "STATE" in listing and "TRUNCATED" not in listing
    assert "cut off mid-line" in listing and "empty" in listing


@trio_test
async def test_a_recording_being_written_is_listed_as_recording(tmp_path: Path) -> None:
    recorder = await SessionRecorder.create(tmp_path, "ses_live")
    [listed] = await trio.to_thread.run_sync(list_recordings, tmp_path)
    assert listed.state is RecordingState.RECORDING
    await recorder.close()
    [listed] = await trio.to_thread.run_sync(list_recordings, tmp_path)
    assert listed.state is RecordingState.COMPLETE


def test_a_damaged_recording_plays_up_to_the_damage_and_says_where_it_stopped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    write_cast(
        recordings / "ses_d.cast",
        [[0.0, "o", "before "], [0.0, "o", "the cut\n"], b'[0.1, "o", "lost'],
    )
    argv = ["recordings", "play", "ses_d", "--speed", "100", "--state-dir", str(tmp_path)]
    assert agent_main(argv, {}) == 1
    captured = capsys.readouterr()
    assert captured.out == "before the cut\n"
    assert "line 4" in captured.err and "cut off" in captured.err


# ---- the commands' arguments -----------------------------------------------------------------


def test_play_finds_a_session_id_in_the_recordings_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recordings = tmp_path / "recordings"
    recordings.mkdir()
    write_cast(recordings / "ses_p.cast", [[0.0, "o", "hello\n"], [0.0, "m", END_MARKER]])
    for name in ("ses_p", "ses_p.cast"):
        argv = ["recordings", "play", name, "--speed", "100", "--state-dir", str(tmp_path)]
        assert agent_main(argv, {}) == 0
        assert capsys.readouterr().out == "hello\n"
    argv = ["recordings", "play", "ses_nope", "--state-dir", str(tmp_path)]
    assert agent_main(argv, {}) == 1
    assert "no recording of session ses_nope" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["prune", "--max-age-days", "1"], ["list"]])
def test_a_recordings_directory_that_does_not_exist_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    missing = tmp_path / "typo"
    argv = ["recordings", *command, "--recordings-dir", str(missing)]
    assert agent_main(argv, {"TUCDESK_AGENT_STATE_DIR": str(tmp_path)}) == 1
    captured = capsys.readouterr()
    assert "does not exist" in captured.err and "Deleted" not in captured.out
    assert not missing.exists()


def test_file_modes_say_whether_the_agent_finished_a_recording(tmp_path: Path) -> None:
    async def record() -> int:
        recorder = await SessionRecorder.create(tmp_path, "ses_m")
        writing = stat.S_IMODE(os.stat(recorder.path).st_mode)
        await recorder.close()
        return writing

    assert trio.run(record) == 0o600
    assert stat.S_IMODE((tmp_path / "ses_m.cast").stat().st_mode) == 0o400


def test_a_recording_killed_before_its_first_flush_is_marked_cleanly_and_plays(
    tmp_path: Path,
) -> None:
    # Header only: the agent died before any output reached the disk. That is no cut-off line,
    # so the marker follows the header directly and play finds nothing damaged.
    path = tmp_path / "ses_early.cast"
    write_cast(path, [], mode=0o600)
    [recovered] = recover_interrupted_recordings(tmp_path)
    assert recovered.session_id == "ses_early" and recovered.duration_ms == 0
    header, marker = path.read_bytes().split(b"\n")[:2]
    assert json.loads(header)["version"] == 2
    assert json.loads(marker)[1:] == ["m", INTERRUPTED_MARKER]
    assert path.read_bytes().count(b"\n") == 2
    [listed] = list_recordings(tmp_path)
    assert listed.state is RecordingState.INTERRUPTED and not listed.detail
    _, events = read_cast(path)
    assert [event[1:] for event in events] == [["m", INTERRUPTED_MARKER]]


NOT_ROOT_RECOVERY = """
import logging, os, sys
from pathlib import Path
from agent.recording import recover_interrupted_recordings
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
os.chdir(sys.argv[1])  # before dropping root: the test's parent directories are root's only
os.setgid(65534)
os.setuid(65534)
print(sorted(item.session_id for item in recover_interrupted_recordings(Path("."))))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the recovery as another user")
def test_an_agent_not_running_as_root_leaves_finished_recordings_alone_without_warning(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "recordings"
    directory.mkdir()
    write_cast(directory / "ses_done.cast", [[0.5, "o", "hi"], [0.6, "m", END_MARKER]])
    write_cast(directory / "ses_cut.cast", [[0.5, "o", "hi"]], mode=0o600)
    for path in (directory, *directory.iterdir()):
        os.chown(path, 65534, 65534)
    result = subprocess.run(
        [sys.executable, "-c", NOT_ROOT_RECOVERY, str(directory)],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['ses_cut']"  # the unfinished one is still marked
    assert "cannot be marked" not in result.stderr, result.stderr
