"""Progress while verifying: a throttled, erased line on stderr that never changes stdout."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from audit.main import main
from audit.progress import ERASE_LINE, ProgressLine, format_bytes, wants_progress
from audit.verify import PROGRESS_EVERY_RECORDS, verify_bundle
from tests.audit.builders import AUDIT_KEY, Exported, typical_bundle
from tests.audit.terminal import run_with_terminal_stderr

COMMANDS = 2 * PROGRESS_EVERY_RECORDS + 100  # enough records for two progress calls
SCRIPT = Path(sys.executable).parent / "tucdesk-audit"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def exported() -> Exported:
    return typical_bundle(commands=COMMANDS)


@pytest.fixture
def files(tmp_path: Path, exported: Exported) -> dict[str, Path]:
    paths = {"bundle": tmp_path / "audit.jsonl", "key": tmp_path / "audit.pub"}
    paths["bundle"].write_bytes(exported.bundle)
    paths["key"].write_bytes(AUDIT_KEY.public.to_pem())
    return paths


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- the line itself -------------------------------------------------------------------------


def test_progress_line_is_redrawn_at_most_four_times_a_second_and_erased() -> None:
    stream, clock = io.StringIO(), FakeClock()
    line = ProgressLine(stream, clock=clock)
    line.show("one")
    line.show("too soon")
    clock.now += 0.1
    assert not line.due()
    line.show("still too soon")
    clock.now += 0.15
    assert line.due()
    line.show("two")
    line.clear()
    line.clear()  # nothing more to erase
    assert stream.getvalue() == f"{ERASE_LINE}one{ERASE_LINE}two{ERASE_LINE}"


def test_progress_line_never_drawn_is_not_erased() -> None:
    stream = io.StringIO()
    with ProgressLine(stream):
        pass
    assert stream.getvalue() == ""


def test_progress_line_is_cut_to_the_terminal_width() -> None:
    stream = io.StringIO()  # no terminal: 80 columns
    ProgressLine(stream).show("x" * 200)
    assert stream.getvalue() == ERASE_LINE + "x" * 79


def test_unwritable_stream_stops_the_line_without_failing_the_work() -> None:
    stream, clock = io.StringIO(), FakeClock()
    line = ProgressLine(stream, clock=clock)
    stream.close()
    line.show("one")  # ValueError inside: swallowed
    clock.now += 1
    assert not line.due()
    line.clear()


def test_progress_is_shown_by_default_only_on_a_terminal(tmp_path: Path) -> None:
    leader, follower = pty.openpty()
    try:
        with open(follower, "w", closefd=False) as terminal:
            assert wants_progress(None, terminal)
            assert not wants_progress(False, terminal)
    finally:
        os.close(leader)
        os.close(follower)
    with (tmp_path / "file").open("w") as regular:
        assert not wants_progress(None, regular)
        assert wants_progress(True, regular)
    assert not wants_progress(None, io.StringIO())


def test_byte_counts_read_like_a_person_wrote_them() -> None:
    assert format_bytes(812) == "812 B"
    assert format_bytes(64 * 1024) == "64.0 KiB"
    assert format_bytes(1.5 * 1024**3) == "1.5 GiB"
    assert format_bytes(3 * 1024**4) == "3072.0 GiB"


# ---- the verifier's callback -----------------------------------------------------------------


def test_verifier_reports_records_and_bytes_every_n_records(files: dict[str, Path]) -> None:
    calls: list[tuple[int, int]] = []
    result = verify_bundle(
        files["bundle"], [AUDIT_KEY.public], progress=lambda *call: calls.append(call)
    )
    assert result == verify_bundle(files["bundle"], [AUDIT_KEY.public])
    assert result.ok and result.record_count > 2 * PROGRESS_EVERY_RECORDS
    assert [records for records, _ in calls] == [
        PROGRESS_EVERY_RECORDS * n
        for n in range(1, result.record_count // PROGRESS_EVERY_RECORDS + 1)
    ]
    lines = files["bundle"].read_bytes().splitlines(keepends=True)
    for records, bytes_read in calls:  # the header and exactly `records` records were read
        assert bytes_read == sum(len(line) for line in lines[: records + 1])


# ---- the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("json_output", [False, True], ids=["summary", "json"])
def test_forced_progress_draws_on_stderr_and_leaves_stdout_byte_for_byte(
    files: dict[str, Path], json_output: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["verify", str(files["bundle"]), "--key", str(files["key"])]
    argv += ["--json"] if json_output else []
    code, quiet_out, quiet_err = run([*argv, "--no-progress"], capsys)
    assert code == 0 and quiet_err == ""
    code, out, err = run([*argv, "--progress"], capsys)
    assert code == 0 and out == quiet_out
    assert err.startswith(f"{ERASE_LINE}verifying audit.jsonl: {PROGRESS_EVERY_RECORDS} records")
    assert "% of " in err and err.endswith(ERASE_LINE) and "\n" not in err


def test_no_progress_by_default_when_stderr_is_not_a_terminal(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["verify", str(files["bundle"]), "--key", str(files["key"])], capsys)
    assert code == 0 and out.startswith("OK: ") and err == ""


def test_failure_message_starts_on_an_erased_line(
    files: dict[str, Path], exported: Exported, capsys: pytest.CaptureFixture[str]
) -> None:
    files["bundle"].write_bytes(b"".join(exported.lines()[:-1]))  # no checkpoint: truncated
    argv = ["verify", str(files["bundle"]), "--key", str(files["key"])]
    code, quiet_out, _ = run([*argv, "--no-progress"], capsys)
    code, out, err = run([*argv, "--progress"], capsys)
    assert code == 1 and out == quiet_out and "truncated" in out
    assert err.startswith(ERASE_LINE) and err.endswith(ERASE_LINE)


def test_recording_command_shows_progress_while_it_verifies_the_export(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recording = tmp_path / "s-1.cast"
    recording.write_bytes(b"{}\n")
    argv = ["recording", str(recording), "--export", str(files["bundle"]), "--key",
            str(files["key"])]  # fmt: skip
    code, _, quiet_err = run([*argv, "--no-progress"], capsys)
    assert code == 1 and quiet_err.startswith("tucdesk-audit: no agent-signed session.ended")
    code, out, err = run([*argv, "--progress"], capsys)
    assert code == 1 and out == ""
    assert err.startswith(f"{ERASE_LINE}verifying audit.jsonl: ")
    assert err.endswith(ERASE_LINE + quiet_err)


def test_help_documents_the_progress_switch(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("verify", "recording"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "--progress, --no-progress" in capsys.readouterr().out


def test_terminal_stderr_gets_progress_and_a_pipe_gets_none(files: dict[str, Path]) -> None:
    argv = ["verify", str(files["bundle"]), "--key", str(files["key"])]
    piped = subprocess.run([str(SCRIPT), *argv], capture_output=True, timeout=60, check=False)
    assert piped.returncode == 0 and piped.stderr == b""
    code, out, terminal = run_with_terminal_stderr("tucdesk-audit", argv)
    assert code == 0 and out == piped.stdout
    assert terminal.startswith(ERASE_LINE.encode() + b"verifying audit.jsonl: ")
    assert terminal.endswith(ERASE_LINE.encode())
    code, out, terminal = run_with_terminal_stderr("tucdesk-audit", [*argv, "--no-progress"])
    assert code == 0 and out == piped.stdout and terminal == b""
