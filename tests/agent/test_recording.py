"""Session recordings: asciicast files of what the operator saw, bound to the signed audit log.

End to end through a real relay and a real PTY or exec session (tests/agent/test_session_host.py
drives the operator side), then checked with `tucdesk-audit recording` against a real export.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.audit_events import SessionAuditor
from agent.config import load_config
from agent.errors import ConfigError
from agent.main import main as agent_main
from agent.recording import (
    END_MARKER,
    INTERRUPTED_MARKER,
    MARKER_RESERVE_BYTES,
    TRUNCATED_MARKER,
    RecordingError,
    RecordingFailed,
    RecordingState,
    SessionRecorder,
    list_recordings,
    recording_file_name,
)
from audit.actions import Action
from audit.main import main as audit_main
from audit.record import SignedEvent
from protocol.control import Close, Resize, encode_control
from protocol.frames import FrameType
from protocol.identity import SigningIdentity
from tests.agent.session_helpers import trio_test
from tests.agent.test_session_host import (
    AGENT_ID,
    TEAM_ID,
    Stack,
    exec_start,
    operator_session,
    session_stack,
    shell_start,
    wait_for_sessions_to_end,
)
from tests.audit.builders import AUDIT_KEY, export_bundle, new_log, register_agent

SECRET = b"typed-secret-7c41"


def read_cast(path: Path) -> tuple[dict[str, Any], list[list[Any]]]:
    """The header and events of an asciicast file, which must be valid UTF-8 JSON lines."""
    lines = path.read_bytes().decode("utf-8").splitlines()
    return json.loads(lines[0]), [json.loads(line) for line in lines[1:]]


def replayed_output(events: list[list[Any]]) -> bytes:
    return "".join(data for _, code, data in events if code == "o").encode()


def ended_event(stack: Stack) -> SignedEvent:
    ended = [event for event in stack.audit if event.event.action is Action.SESSION_ENDED]
    assert len(ended) == 1
    ended[0].verify(stack.agent.public)
    return ended[0]


def recording_context(stack: Stack) -> dict[str, Any]:
    recording = ended_event(stack).event.context["recording"]
    assert isinstance(recording, dict)
    return recording


# ---- a PTY session, recorded -----------------------------------------------------------------


@trio_test
async def test_shell_recording_replays_what_the_operator_saw_and_never_what_was_typed(
    tmp_path: Path,
) -> None:
    recordings = tmp_path / "recordings"
    async with (
        session_stack(tmp_path, shell="/bin/sh", record_sessions=True) as stack,
        trio.open_nursery() as nursery,
    ):
        async with operator_session(stack, nursery, mode="shell") as operator:
            await operator.start(shell_start(rows=30, cols=100))
            # "é" (c3 a9) written in two pieces with a pause: two PTY reads split the character.
            split = b"printf 'caf\\303'; sleep 0.3; printf '\\251!\\n'\n"
            await operator.send(FrameType.DATA, split)
            await operator.until_stdout_contains("café!".encode())
            await operator.send(FrameType.CONTROL, encode_control(Resize(rows=50, cols=132)))
            # Typed with echo off, as a password is: the operator never sees it, nor may the file.
            await operator.send(FrameType.DATA, b"stty -echo; echo RE''ADY; read x; echo DO''NE\n")
            await operator.until_stdout_contains(b"READY\r\n")
            await operator.send(FrameType.DATA, SECRET + b"\n")
            await operator.until_stdout_contains(b"DONE")
            await operator.send(FrameType.DATA, b"exit 0\n")
            await operator.until_closed()
        await wait_for_sessions_to_end(stack)
    path = recordings / "ses_1.cast"
    header, events = read_cast(path)
    assert header["version"] == 2
    assert (header["width"], header["height"]) == (100, 30)
    assert header["env"] == {"TERM": "xterm-256color"}
    assert replayed_output(events) == bytes(operator.stdout)
    assert "café!" in replayed_output(events).decode()
    assert ["r", "132x50"] in [event[1:] for event in events]
    assert all(code in ("o", "r") for _, code, _ in events[:-1])
    assert events[-1][1:] == ["m", END_MARKER]
    times = [event[0] for event in events]
    assert times == sorted(times)
    assert SECRET not in path.read_bytes()
    assert SECRET not in operator.stdout
    # The signed session.ended event binds the file's exact bytes.
    recording = recording_context(stack)
    data = path.read_bytes()
    assert recording == {
        "file": "ses_1.cast",
        "sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
        "truncated": False,
        "failed": False,
    }
    assert stat.S_IMODE(os.stat(recordings).st_mode) == 0o700
    # Read-only: the agent finished it (an unfinished one stays 0600 until marked interrupted).
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400


@trio_test
async def test_exec_recording_holds_stdout_and_stderr_as_output(tmp_path: Path) -> None:
    command = ("sh", "-c", "echo out; sleep 0.1; echo err >&2")
    async with (
        session_stack(tmp_path, record_sessions=True) as stack,
        trio.open_nursery() as nursery,
    ):
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.until_closed()
        await wait_for_sessions_to_end(stack)
    _, events = read_cast(tmp_path / "recordings" / "ses_1.cast")
    assert replayed_output(events) == b"out\nerr\n"
    assert recording_context(stack)["truncated"] is False


@trio_test
async def test_recording_stops_at_its_limit_with_a_marker_and_the_session_goes_on(
    tmp_path: Path,
) -> None:
    command = ("sh", "-c", "head -c 50000 /dev/zero | tr '\\0' a")
    limit = 4096
    async with (
        session_stack(tmp_path, record_sessions=True, max_recording_bytes=limit) as stack,
        trio.open_nursery() as nursery,
    ):
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.until_closed()
        await wait_for_sessions_to_end(stack)
    assert bytes(operator.stdout) == b"a" * 50000
    path = tmp_path / "recordings" / "ses_1.cast"
    assert path.stat().st_size <= limit
    _, events = read_cast(path)
    assert [event[1:] for event in events[-2:]] == [["m", TRUNCATED_MARKER], ["m", END_MARKER]]
    # What fit of the output is recorded, cut at the limit, not dropped whole.
    recorded = replayed_output(events)
    assert recorded == b"a" * len(recorded)
    assert len(recorded) > limit - MARKER_RESERVE_BYTES - 400
    recording = recording_context(stack)
    assert recording["truncated"] is True
    assert recording["bytes"] == path.stat().st_size
    [listed] = list_recordings(tmp_path / "recordings")
    assert (listed.session_id, listed.state) == ("ses_1", RecordingState.TRUNCATED)


def test_listing_skips_symlinks_and_fifos_posing_as_recordings(tmp_path: Path) -> None:
    directory = tmp_path / "recordings"
    directory.mkdir()
    header = b'{"version": 2, "width": 80, "height": 24, "timestamp": 1700000000}\n'
    (directory / "ses_real.cast").write_bytes(header)
    elsewhere = tmp_path / "elsewhere.cast"
    elsewhere.write_bytes(header)
    (directory / "ses_link.cast").symlink_to(elsewhere)
    os.mkfifo(directory / "ses_fifo.cast")  # opening it for reading would block
    assert [info.session_id for info in list_recordings(directory)] == ["ses_real"]


@trio_test
async def test_recording_off_creates_no_file_and_no_recording_context(tmp_path: Path) -> None:
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery) as operator:
            await operator.start(exec_start("true"))
            await operator.until_closed()
        await wait_for_sessions_to_end(stack)
    assert not (tmp_path / "recordings").exists()
    assert "recording" not in ended_event(stack).event.context


@trio_test
async def test_a_session_whose_id_would_escape_the_directory_is_refused(tmp_path: Path) -> None:
    recordings = tmp_path / "deep" / "recordings"
    async with (
        session_stack(tmp_path, record_sessions=True, recordings_dir=recordings) as stack,
        trio.open_nursery() as nursery,
    ):
        async with operator_session(stack, nursery, session_id="../escaped") as operator:
            await operator.start(exec_start("true"))
            await operator.until_closed()
        await wait_for_sessions_to_end(stack)
    closes = [control for control in operator.controls if isinstance(control, Close)]
    assert closes and closes[0].reason == "internal-error"
    assert operator.exit_status() is None
    assert stack.actions() == [Action.SESSION_REFUSED]
    assert not await trio.to_thread.run_sync(lambda: list(tmp_path.rglob("*.cast")))


@pytest.mark.parametrize("session_id", ["../x", "a/b", ".hidden", "", "x" * 129, "a\0b", "é"])
def test_unsafe_session_ids_cannot_name_a_recording_file(session_id: str) -> None:
    with pytest.raises(RecordingError):
        recording_file_name(session_id)


def test_rendezvous_session_ids_name_a_recording_file() -> None:
    assert recording_file_name("ses_mfrggzdfmztwq2lk") == "ses_mfrggzdfmztwq2lk.cast"


# ---- the recorder on its own -----------------------------------------------------------------


@trio_test
async def test_a_utf8_character_split_across_reads_is_recorded_whole(tmp_path: Path) -> None:
    recorder = await SessionRecorder.create(tmp_path, "ses_split")
    await recorder.output(1, b"caf\xc3")
    await recorder.output(2, b"E\xe2\x82")  # another stream's split sequence stays separate
    await recorder.output(1, b"\xa9 \xff ok")
    await recorder.output(2, b"\xac")
    summary = await recorder.close()
    _, events = read_cast(tmp_path / "ses_split.cast")
    assert replayed_output(events).decode() == "cafE\u00e9 \ufffd ok\u20ac"
    assert summary.bytes == (tmp_path / "ses_split.cast").stat().st_size


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([1, 2]), st.binary(max_size=64)), max_size=12
    ),
    st.integers(min_value=0, max_value=2**31),
)
def test_any_output_split_any_way_replays_as_its_utf8_decoding(
    tmp_path_factory: pytest.TempPathFactory,
    chunks: list[tuple[int, bytes]],
    salt: int,
) -> None:
    directory = tmp_path_factory.mktemp("prop")
    # Mostly text: multi-byte characters cut at random points, with invalid bytes mixed in.
    text_chunks = [(stream, data or "é€😀".encode()[salt % 9 :]) for stream, data in chunks]

    async def record() -> None:
        recorder = await SessionRecorder.create(directory, "ses_prop")
        for stream, data in text_chunks:
            await recorder.output(stream, data)
        await recorder.close()

    trio.run(record)
    _, events = read_cast(directory / "ses_prop.cast")  # valid UTF-8 JSON, or this fails
    expected = {
        stream: b"".join(data for s, data in text_chunks if s == stream).decode(
            "utf-8", "replace"
        )
        for stream in (1, 2)
    }
    # Each stream's events, in order, are that stream's bytes decoded as a whole.
    recorded = "".join(data for _, code, data in events if code == "o")
    assert sorted(recorded) == sorted(expected[1] + expected[2])
    if not any(stream == 2 for stream, _ in text_chunks):
        assert recorded == expected[1]


@trio_test
async def test_a_write_error_stops_the_recording_and_marks_it_failed(tmp_path: Path) -> None:
    # /dev/full fails every write with ENOSPC: a full disk.
    fd = os.open("/dev/full", os.O_WRONLY)
    recorder = SessionRecorder(fd, tmp_path / "ses_full.cast", 64 * 1024 * 1024)
    with pytest.raises(RecordingFailed, match="No space left"):
        for _ in range(40):
            await recorder.output(1, b"x" * 16384)
    assert recorder.failed
    with pytest.raises(RecordingFailed):  # and so on, until the session has ended
        await recorder.output(1, b"more")
    summary = await recorder.close()
    assert summary.failed and summary.bytes == 0
    assert summary.audit_context()["failed"] is True


@trio_test
async def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    (tmp_path / "ses_1.cast").write_text("keep")
    with pytest.raises(RecordingError):
        await SessionRecorder.create(tmp_path, "ses_1")
    assert (tmp_path / "ses_1.cast").read_text() == "keep"


def test_markers_always_fit_in_their_reserve() -> None:
    def marker(text: str) -> int:
        return len(f'[{10**9:.6f}, "m", {json.dumps(text)}]\n'.encode())

    # A truncated recording then gets its end marker, or an interrupted one ("\n" first).
    ending = max(marker(END_MARKER), marker(INTERRUPTED_MARKER) + 1)
    assert marker(TRUNCATED_MARKER) + ending <= MARKER_RESERVE_BYTES


# ---- configuration ---------------------------------------------------------------------------


def test_recording_settings_come_from_environment_and_flags(tmp_path: Path) -> None:
    environ = {
        "TUCDESK_AGENT_STATE_DIR": str(tmp_path),
        "TUCDESK_AGENT_RECORD_SESSIONS": "true",
        "TUCDESK_AGENT_MAX_RECORDING_BYTES": "100000",
    }
    config = load_config({}, environ)
    assert config.record_sessions is True
    assert config.max_recording_bytes == 100000
    assert config.recordings_path == tmp_path / "recordings"
    config = load_config({"recordings_dir": tmp_path / "elsewhere"}, environ)
    assert config.recordings_path == tmp_path / "elsewhere"
    assert load_config({}, {"TUCDESK_AGENT_STATE_DIR": str(tmp_path)}).record_sessions is False


@pytest.mark.parametrize(
    ("name", "value"),
    [("TUCDESK_AGENT_RECORD_SESSIONS", "maybe"), ("TUCDESK_AGENT_MAX_RECORDING_BYTES", "10")],
)
def test_bad_recording_settings_are_refused(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(ConfigError):
        load_config({}, {"TUCDESK_AGENT_STATE_DIR": str(tmp_path), name: value})


# ---- verifying a recording against the audit export ------------------------------------------


async def _exported_with(tmp_path: Path, agent: SigningIdentity, ended: SignedEvent) -> Path:
    log = new_log(team=TEAM_ID, clock=lambda: datetime.now(UTC))
    await register_agent(log, key=agent, agent_id=AGENT_ID)
    await log.append_agent_event(ended, AGENT_ID, agent.public)
    bundle = tmp_path / "audit.jsonl"
    bundle.write_bytes(await trio.to_thread.run_sync(export_bundle, log))
    return bundle


@trio_test
async def test_audit_recording_check_accepts_the_file_and_catches_edits_and_cuts(
    tmp_path: Path,
) -> None:
    command = ("sh", "-c", "echo hello from the host")
    async with (
        session_stack(tmp_path, record_sessions=True) as stack,
        trio.open_nursery() as nursery,
    ):
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.until_closed()
        await wait_for_sessions_to_end(stack)
    bundle = await _exported_with(tmp_path, stack.agent, ended_event(stack))
    key = tmp_path / "audit.pub"
    key.write_bytes(AUDIT_KEY.public.to_pem())
    path = tmp_path / "recordings" / "ses_1.cast"
    original = path.read_bytes()

    def check() -> int:
        return audit_main(["recording", str(path), "--export", str(bundle), "--key", str(key)])

    assert check() == 0
    edited = bytearray(original)
    edited[original.index(b"hello")] ^= 0x20  # "Hello": one byte
    path.write_bytes(bytes(edited))
    assert check() == 1
    path.write_bytes(original[:-10])
    assert check() == 1
    path.write_bytes(original)
    assert check() == 0
    other = tmp_path / "recordings" / "ses_2.cast"
    other.write_bytes(original)
    assert audit_main(["recording", str(other), "--export", str(bundle), "--key", str(key)]) == 1


def test_audit_recording_check_messages_name_what_differs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = SigningIdentity.generate()
    auditor = SessionAuditor(agent, AGENT_ID, TEAM_ID, "web-1")
    path = tmp_path / "ses_9.cast"
    path.write_bytes(b'{"version": 2, "width": 80, "height": 24, "timestamp": 1}\n')
    data = path.read_bytes()
    ended = auditor.ended(
        "ses_9", duration_ms=1, exit_status=None, bytes_in=0, bytes_out=0, reason="normal",
        recording={"file": path.name, "sha256": hashlib.sha256(data).hexdigest(),
                   "bytes": len(data), "truncated": False, "failed": False},
    )
    bundle = trio.run(_exported_with, tmp_path, agent, ended)
    key = tmp_path / "audit.pub"
    key.write_bytes(AUDIT_KEY.public.to_pem())
    argv = ["recording", str(path), "--export", str(bundle), "--key", str(key)]
    assert audit_main(argv) == 0
    assert "matches record" in capsys.readouterr().out
    path.write_bytes(data.replace(b"80", b"81"))
    assert audit_main(argv) == 1
    assert "SHA-256 differs" in capsys.readouterr().err
    path.write_bytes(data + b"[1.0, \"o\", \"x\"]\n")
    assert audit_main(argv) == 1
    assert "size differs" in capsys.readouterr().err
    # A bundle that does not verify is never used to vouch for a recording.
    tampered = bundle.read_bytes().replace(b"ses_9.cast", b"ses_8.cast")
    bundle.write_bytes(tampered)
    path.write_bytes(data)
    assert audit_main(argv) == 1
    assert "does not verify" in capsys.readouterr().err


# ---- the agent's recordings commands ---------------------------------------------------------


def test_recordings_list_and_play_show_the_session(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def record() -> None:
        recorder = await SessionRecorder.create(tmp_path / "recordings", "ses_list", title="t")
        await recorder.output(1, b"hello ")
        await recorder.resize(100, 40)
        await recorder.output(1, b"world\n")
        await recorder.close()

    trio.run(record)
    assert agent_main(["recordings", "list", "--state-dir", str(tmp_path)], {}) == 0
    listing = capsys.readouterr().out
    assert "ses_list" in listing and "complete" in listing
    path = str(tmp_path / "recordings" / "ses_list.cast")
    assert agent_main(["recordings", "play", path, "--speed", "100"], {}) == 0
    assert capsys.readouterr().out == "hello world\n"
