"""Recordings retention: finished recordings beyond the age and size limits are deleted, oldest
first; recordings being written, foreign files and symlinks never are.

Real files in a temporary directory, real locks held by a real second process, and a real
session host recording a real exec session through a real relay.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.config import AgentConfig, load_config
from agent.errors import ConfigError
from agent.main import build_parser, config_from_arguments, run_daemon
from agent.main import main as agent_main
from agent.recording import RecordingError, RecordingHooks, SessionRecorder, recording_hooks
from agent.recording_retention import (
    RECENT_WRITE_GRACE_SECONDS,
    SECONDS_PER_DAY,
    RecordingRetention,
    RetentionLimits,
    prune_recordings,
)
from tests.agent.session_helpers import WAIT_SECONDS, trio_test
from tests.agent.test_session_host import (
    exec_start,
    operator_session,
    session_stack,
    wait_for_sessions_to_end,
)
from tests.agent.test_session_host_daemon import MACHINE, enrolled_agent_stack

HEADER = b'{"version": 2, "width": 80, "height": 24, "timestamp": 1}\n'
DAY = SECONDS_PER_DAY


def write_recording(directory: Path, session_id: str, *, size: int, age: float) -> Path:
    """A finished recording of ``size`` bytes last written ``age`` seconds ago."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{session_id}.cast"
    event_start, event_end = b'[0.1, "o", "', b'"]\n'
    filler = size - len(HEADER) - len(event_start) - len(event_end)
    assert filler >= 0
    path.write_bytes(HEADER + event_start + b"x" * filler + event_end)
    set_age(path, age)
    return path


def set_age(path: Path, age: float) -> None:
    when = time.time() - age
    os.utime(path, (when, when), follow_symlinks=False)


def names(directory: Path) -> set[str]:
    return set(os.listdir(directory))


# ---- the limits ------------------------------------------------------------------------------


def test_age_limit_deletes_only_the_recordings_older_than_it(tmp_path: Path) -> None:
    write_recording(tmp_path, "ses_old", size=500, age=10 * DAY)
    write_recording(tmp_path, "ses_older", size=700, age=30 * DAY)
    write_recording(tmp_path, "ses_recent", size=600, age=2 * DAY)
    write_recording(tmp_path, "ses_new", size=800, age=3600)
    report = prune_recordings(tmp_path, RetentionLimits(max_age_days=5))
    assert [item.name for item in report.deleted] == ["ses_older.cast", "ses_old.cast"]
    assert names(tmp_path) == {"ses_recent.cast", "ses_new.cast"}
    assert (report.kept, report.kept_bytes, report.deleted_bytes) == (2, 1400, 1200)
    assert report.deleted[0].age_seconds == pytest.approx(30 * DAY, abs=60)


def test_size_cap_deletes_the_oldest_first_until_the_rest_fit(tmp_path: Path) -> None:
    for number, age_days in enumerate([5, 1, 4, 2, 3]):
        write_recording(tmp_path, f"ses_{number}", size=1000, age=age_days * DAY)
    report = prune_recordings(tmp_path, RetentionLimits(max_total_bytes=2500))
    # Ages 5, 4, 3 days go; ages 1 and 2 days (2000 bytes) fit under the cap.
    assert [item.name for item in report.deleted] == ["ses_0.cast", "ses_2.cast", "ses_4.cast"]
    assert names(tmp_path) == {"ses_1.cast", "ses_3.cast"}
    assert report.kept_bytes == 2000
    assert prune_recordings(tmp_path, RetentionLimits(max_total_bytes=2500)).deleted == []


def test_both_limits_hold_after_one_pass(tmp_path: Path) -> None:
    write_recording(tmp_path, "ses_a", size=1000, age=9 * DAY)
    write_recording(tmp_path, "ses_b", size=1000, age=2 * DAY)
    write_recording(tmp_path, "ses_c", size=1000, age=1 * DAY)
    write_recording(tmp_path, "ses_d", size=1000, age=0.5 * DAY)
    limits = RetentionLimits(max_age_days=7, max_total_bytes=2000)
    report = prune_recordings(tmp_path, limits)
    assert [item.name for item in report.deleted] == ["ses_a.cast", "ses_b.cast"]


def test_a_dry_run_reports_the_same_deletions_and_deletes_nothing(tmp_path: Path) -> None:
    for number, age_days in enumerate([10, 9, 3, 2]):
        write_recording(tmp_path, f"ses_{number}", size=1000, age=age_days * DAY)
    before = names(tmp_path)
    limits = RetentionLimits(max_age_days=8, max_total_bytes=1000)
    dry = prune_recordings(tmp_path, limits, dry_run=True)
    assert names(tmp_path) == before
    real = prune_recordings(tmp_path, limits)
    deleted = [item.name for item in real.deleted]
    assert [item.name for item in dry.deleted] == deleted
    assert deleted == ["ses_0.cast", "ses_1.cast", "ses_2.cast"]
    assert (dry.kept, dry.kept_bytes) == (real.kept, real.kept_bytes) == (1, 1000)


def test_a_missing_directory_has_nothing_to_prune(tmp_path: Path) -> None:
    report = prune_recordings(tmp_path / "absent", RetentionLimits(max_age_days=1))
    assert (report.deleted, report.kept) == ([], 0)


# ---- what is never deleted -------------------------------------------------------------------


@pytest.mark.parametrize("file_system_locks", [True, False])
def test_a_recording_being_written_is_never_deleted_even_if_oldest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, file_system_locks: bool
) -> None:
    if not file_system_locks:
        # Where flock() is unsupported, this process's set of active recordings still holds.
        import agent.recording

        monkeypatch.setattr(agent.recording, "_lock_while_writing", lambda fd: None)
    trio.run(_write_while_pruning, tmp_path)


async def _write_while_pruning(tmp_path: Path) -> None:
    recorder = await SessionRecorder.create(tmp_path, "ses_live")
    await recorder.output(1, b"x" * 5000)
    set_age(recorder.path, 90 * DAY)
    write_recording(tmp_path, "ses_done", size=1000, age=30 * DAY)
    limits = RetentionLimits(max_age_days=1, max_total_bytes=1)
    report = await trio.to_thread.run_sync(prune_recordings, tmp_path, limits)
    assert [item.name for item in report.deleted] == ["ses_done.cast"]
    assert report.skipped_active == 1
    assert names(tmp_path) == {"ses_live.cast"}
    await recorder.close()
    set_age(recorder.path, 90 * DAY)
    report = await trio.to_thread.run_sync(prune_recordings, tmp_path, limits)
    assert [item.name for item in report.deleted] == ["ses_live.cast"]


def test_a_recording_locked_by_its_writer_in_another_process_is_never_deleted(
    tmp_path: Path,
) -> None:
    # What `recordings prune` sees while the daemon writes: no shared active set, only the lock.
    live = write_recording(tmp_path, "ses_live", size=1000, age=90 * DAY)
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys\n"
         f"fd = os.open({str(live)!r}, os.O_WRONLY)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        report = prune_recordings(tmp_path, RetentionLimits(max_age_days=1))
        assert report.deleted == [] and report.skipped_active == 1
        assert live.exists()
    finally:
        holder.communicate(b"", timeout=WAIT_SECONDS)
    assert [item.name for item in prune_recordings(tmp_path, RetentionLimits(1)).deleted] == [
        "ses_live.cast"
    ]


def test_a_recording_written_in_the_last_minute_is_kept(tmp_path: Path) -> None:
    write_recording(tmp_path, "ses_just", size=5000, age=RECENT_WRITE_GRACE_SECONDS / 2)
    report = prune_recordings(tmp_path, RetentionLimits(max_total_bytes=1000))
    assert report.deleted == [] and report.skipped_active == 1
    assert names(tmp_path) == {"ses_just.cast"}


def test_files_that_are_not_recordings_and_symlinks_are_never_touched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recordings = tmp_path / "recordings"
    outside = write_recording(tmp_path, "ses_target", size=1000, age=90 * DAY)
    write_recording(recordings, "ses_real", size=1000, age=90 * DAY)
    foreign = {
        "notes.txt": b"keep me",
        ".hidden.cast": HEADER,
        "ses_x.cast.bak": HEADER,
        "has space.cast": HEADER,
        "ses_dotted.v2.cast": HEADER,
    }
    for name, data in foreign.items():
        (recordings / name).write_bytes(data)
        set_age(recordings / name, 90 * DAY)
    (recordings / "ses_dir.cast").mkdir()
    os.mkfifo(recordings / "ses_fifo.cast")
    (recordings / "ses_link.cast").symlink_to(outside)
    (recordings / "ses_dangling.cast").symlink_to(tmp_path / "nowhere.cast")
    for name in ("ses_dir.cast", "ses_fifo.cast", "ses_link.cast", "ses_dangling.cast"):
        set_age(recordings / name, 90 * DAY)
    left_alone = names(recordings) - {"ses_real.cast"}

    with caplog.at_level(logging.WARNING, logger="tucdesk.agent.recording"):
        report = prune_recordings(recordings, RetentionLimits(max_age_days=1, max_total_bytes=1))
    assert [item.name for item in report.deleted] == ["ses_real.cast"]
    assert names(recordings) == left_alone
    assert outside.read_bytes().startswith(HEADER)
    assert (recordings / "notes.txt").read_bytes() == b"keep me"
    warned = [record.getMessage() for record in caplog.records]
    assert len(warned) == len(left_alone)
    assert all("not a recording" in message for message in warned)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tucdesk.agent.recording"):
        prune_recordings(recordings, RetentionLimits(max_age_days=1))
    assert caplog.records == []  # warned once each, not at every pass
    assert names(recordings) == left_alone


def test_a_symlinked_recordings_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    write_recording(real, "ses_a", size=1000, age=90 * DAY)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(RecordingError, match="symlink"):
        prune_recordings(tmp_path / "link", RetentionLimits(max_age_days=1))
    assert names(real) == {"ses_a.cast"}


@pytest.mark.parametrize("replacement", ["file", "symlink"])
def test_a_file_swapped_after_the_scan_is_not_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, replacement: str
) -> None:
    # The name is re-checked against the scanned file: whatever was put in its place survives.
    import agent.recording_retention as retention

    write_recording(tmp_path, "ses_a", size=1000, age=90 * DAY)
    outside = write_recording(tmp_path / "outside", "ses_b", size=1000, age=90 * DAY)
    scan = retention._scan

    def scan_then_swap(directory: Path, directory_fd: int) -> list[retention._Candidate]:
        found = scan(directory, directory_fd)
        swapped = tmp_path / "swap"
        if replacement == "file":
            swapped.write_bytes(HEADER)
        else:
            swapped.symlink_to(outside)
        os.replace(swapped, tmp_path / "ses_a.cast")
        return found

    monkeypatch.setattr(retention, "_scan", scan_then_swap)
    assert prune_recordings(tmp_path, RetentionLimits(max_age_days=1)).deleted == []
    assert (tmp_path / "ses_a.cast").read_bytes().startswith(HEADER)
    assert outside.exists()


# ---- the daemon: after each recording, and room for a new one --------------------------------


@trio_test
async def test_the_daemon_prunes_after_a_recording_ends(tmp_path: Path) -> None:
    recordings = tmp_path / "recordings"
    limits = RetentionLimits(max_age_days=7)
    async with (
        session_stack(tmp_path, record_sessions=True, recordings_max_age_days=7) as stack,
        trio.open_nursery() as nursery,
    ):
        retention = RecordingRetention(recordings, limits, stack.host._config.max_recording_bytes)
        await nursery.start(retention.run)
        # Written after the start-up pass: only the pass after the session can delete it.
        write_recording(recordings, "ses_stale", size=1000, age=30 * DAY)
        command = ("sh", "-c", "echo retained")
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.until_closed()
        await wait_for_sessions_to_end(stack)
        with trio.fail_after(WAIT_SECONDS):
            while (recordings / "ses_stale.cast").exists():  # noqa: ASYNC110 - a thread deletes it
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert names(recordings) == {"ses_1.cast"}


@trio_test
async def test_with_a_size_cap_room_for_a_full_recording_is_made_before_it_starts(
    tmp_path: Path,
) -> None:
    recordings = tmp_path / "recordings"
    for number, age_days in enumerate([3, 2, 1]):
        write_recording(recordings, f"ses_old{number}", size=9000, age=age_days * DAY)
    limits = RetentionLimits(max_total_bytes=30_000)
    async with (
        session_stack(
            tmp_path, record_sessions=True, max_recording_bytes=10_000,
            recordings_max_total_bytes=30_000,
        ) as stack,
        trio.open_nursery() as nursery,
    ):
        retention = RecordingRetention(recordings, limits, 10_000)
        await nursery.start(retention.run)
        assert len(names(recordings)) == 3  # 27000 bytes: under the cap
        command = ("sh", "-c", "echo room")
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.until_closed()
        await wait_for_sessions_to_end(stack)
        nursery.cancel_scope.cancel()
    # 27000 + a full 10000-byte recording would pass 30000: the oldest made room.
    assert names(recordings) == {"ses_old1.cast", "ses_old2.cast", "ses_1.cast"}


@trio_test
async def test_a_recording_starts_without_a_scan_while_the_cap_surely_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.recording_retention as retention_module

    full = 4096
    write_recording(tmp_path, "ses_a", size=1000, age=2 * DAY)
    write_recording(tmp_path, "ses_b", size=1000, age=1 * DAY)
    # (+ 512: ses_live's header, written at its creation, is counted in the kept bytes too)
    retention = RecordingRetention(
        tmp_path, RetentionLimits(max_total_bytes=2000 + 3 * full + 512), full
    )
    # Being written during the pass: it may still grow to a full recording.
    recorders = [await SessionRecorder.create(tmp_path, "ses_live")]
    assert retention.prune() is not None
    scans: list[int] = []
    prune = retention_module.prune_recordings

    def counted(*args: Any, **kwargs: Any) -> retention_module.PruneReport:
        scans.append(kwargs["reserve_bytes"])
        return prune(*args, **kwargs)

    monkeypatch.setattr(retention_module, "prune_recordings", counted)
    with recording_hooks(RecordingHooks(retention.before_create, lambda path: None)):
        for number in range(2):  # 2000 + ses_live + 2 full recordings fit the cap: no scan
            recorders.append(await SessionRecorder.create(tmp_path, f"ses_new{number}"))
        assert scans == []
        # A fourth might not fit: scan, making room for it.
        recorders.append(await SessionRecorder.create(tmp_path, "ses_new2"))
        assert scans == [full]
        for recorder in recorders:
            await recorder.close()
    assert names(tmp_path) >= {"ses_a.cast", "ses_b.cast"}


# ---- the prune command -----------------------------------------------------------------------


def test_prune_dry_run_deletes_nothing_and_reports_what_it_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recordings = tmp_path / "recordings"
    write_recording(recordings, "ses_old", size=1000, age=40 * DAY)
    write_recording(recordings, "ses_new", size=1000, age=1 * DAY)
    argv = ["recordings", "prune", "--state-dir", str(tmp_path), "--max-age-days", "30"]
    assert agent_main([*argv, "--dry-run"], {}) == 0
    out = capsys.readouterr().out
    assert "would delete ses_old.cast (1000 bytes, 40.0 days old)" in out
    assert "Would delete 1 recording(s), 1000 bytes; 1 left, 1000 bytes" in out
    assert "ses_new" not in out
    assert names(recordings) == {"ses_old.cast", "ses_new.cast"}
    assert agent_main(argv, {}) == 0
    assert "Deleted 1 recording(s), 1000 bytes" in capsys.readouterr().out
    assert names(recordings) == {"ses_new.cast"}


def test_prune_uses_the_configured_limits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recordings = tmp_path / "elsewhere"
    write_recording(recordings, "ses_a", size=1000, age=3 * DAY)
    write_recording(recordings, "ses_b", size=1000, age=2 * DAY)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nrecordings_dir = "{recordings}"\nmax_recording_bytes = 4096\n'
        "recordings_max_total_bytes = 5000\n"
    )
    environ = {"TUCDESK_AGENT_STATE_DIR": str(tmp_path)}
    assert agent_main(["--config", str(config), "recordings", "prune"], environ) == 0
    assert names(recordings) == {"ses_a.cast", "ses_b.cast"}  # 2000 <= 5000
    environ["TUCDESK_AGENT_RECORDINGS_MAX_TOTAL_BYTES"] = "4096"
    assert agent_main(["--config", str(config), "recordings", "prune"], environ) == 0
    assert names(recordings) == {"ses_a.cast", "ses_b.cast"}
    environ["TUCDESK_AGENT_RECORDINGS_MAX_AGE_DAYS"] = "2.5"
    assert agent_main(["--config", str(config), "recordings", "prune"], environ) == 0
    assert names(recordings) == {"ses_b.cast"}
    assert "deleted ses_a.cast" in capsys.readouterr().out


def test_prune_without_any_limit_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_recording(tmp_path / "recordings", "ses_a", size=1000, age=900 * DAY)
    assert agent_main(["recordings", "prune", "--state-dir", str(tmp_path)], {}) == 1
    assert "no retention limits" in capsys.readouterr().err
    assert names(tmp_path / "recordings") == {"ses_a.cast"}


# ---- configuration ---------------------------------------------------------------------------


def test_retention_settings_come_from_toml_environment_and_flags(tmp_path: Path) -> None:
    environ = {"TUCDESK_AGENT_STATE_DIR": str(tmp_path)}
    config = load_config({}, environ)
    assert (config.recordings_max_age_days, config.recordings_max_total_bytes) == (None, None)
    toml = tmp_path / "agent.toml"
    toml.write_text("recordings_max_age_days = 30\nrecordings_max_total_bytes = 1073741824\n")
    config = load_config({}, environ, toml)
    assert (config.recordings_max_age_days, config.recordings_max_total_bytes) == (30.0, 2**30)
    environ["TUCDESK_AGENT_RECORDINGS_MAX_AGE_DAYS"] = "0.5"
    assert load_config({}, environ, toml).recordings_max_age_days == 0.5
    flags = {"recordings_max_age_days": 2.0, "recordings_max_total_bytes": 2**27}
    config = load_config(flags, environ, toml)
    assert (config.recordings_max_age_days, config.recordings_max_total_bytes) == (2.0, 2**27)


def test_the_daemon_takes_the_retention_limits_as_flags_too(tmp_path: Path) -> None:
    environ = {"TUCDESK_AGENT_STATE_DIR": str(tmp_path)}
    argv = ["run", "--recordings-max-age-days", "7", "--recordings-max-total-bytes", str(2**30)]
    config = config_from_arguments(build_parser().parse_args(argv), environ)
    assert (config.recordings_max_age_days, config.recordings_max_total_bytes) == (7.0, 2**30)
    prune = build_parser().parse_args(["recordings", "prune", "--recordings-max-age-days", "3"])
    assert config_from_arguments(prune, environ).recordings_max_age_days == 3.0


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TUCDESK_AGENT_RECORDINGS_MAX_AGE_DAYS", "0", "more than 0"),
        ("TUCDESK_AGENT_RECORDINGS_MAX_AGE_DAYS", "-3", "more than 0"),
        ("TUCDESK_AGENT_RECORDINGS_MAX_AGE_DAYS", "nan", "more than 0"),
        ("TUCDESK_AGENT_RECORDINGS_MAX_AGE_DAYS", "inf", "more than 0"),
        ("TUCDESK_AGENT_RECORDINGS_MAX_AGE_DAYS", "a week", "not a valid value"),
        ("TUCDESK_AGENT_RECORDINGS_MAX_TOTAL_BYTES", "0", "at least max_recording_bytes"),
        ("TUCDESK_AGENT_RECORDINGS_MAX_TOTAL_BYTES", "-1", "at least max_recording_bytes"),
        ("TUCDESK_AGENT_RECORDINGS_MAX_TOTAL_BYTES", "1000000", "at least max_recording_bytes"),
        ("TUCDESK_AGENT_RECORDINGS_MAX_TOTAL_BYTES", "10GiB", "not a valid value"),
        ("TUCDESK_AGENT_RECORDINGS_MAX_TOTAL_BYTES", "1e9", "not a valid value"),
    ],
)
def test_bad_retention_settings_are_refused(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config({}, {"TUCDESK_AGENT_STATE_DIR": str(tmp_path), name: value})


@pytest.mark.parametrize(
    "line", ["recordings_max_age_days = true", 'recordings_max_total_bytes = "1 GiB"']
)
def test_bad_retention_settings_in_toml_are_refused(tmp_path: Path, line: str) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text(line + "\n")
    with pytest.raises(ConfigError, match="not a valid value"):
        load_config({}, {"TUCDESK_AGENT_STATE_DIR": str(tmp_path)}, toml)


def test_bad_prune_flags_are_refused_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["recordings", "prune", "--state-dir", str(tmp_path), "--max-age-days", "-1"]
    assert agent_main(argv, {}) == 1
    assert "recordings_max_age_days must be" in capsys.readouterr().err


@trio_test
async def test_the_daemon_prunes_recordings_at_start(tmp_path: Path) -> None:
    recordings = tmp_path / "agent" / "recordings"
    write_recording(recordings, "ses_stale", size=1000, age=30 * DAY)
    write_recording(recordings, "ses_fresh", size=1000, age=1 * DAY)
    async with enrolled_agent_stack(tmp_path) as stack:
        config = AgentConfig(
            state_dir=tmp_path / "agent", record_sessions=True, recordings_max_age_days=7
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_daemon, config, stack.state, MACHINE)
            with trio.fail_after(WAIT_SECONDS):
                while (recordings / "ses_stale.cast").exists():  # noqa: ASYNC110
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    assert names(recordings) == {"ses_fresh.cast"}
