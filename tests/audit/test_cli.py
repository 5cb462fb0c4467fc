"""`tucdesk-audit verify`: exit codes, one-line messages, --json, and the installed script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from audit.main import main
from tests.audit.builders import (
    AUDIT_KEY,
    OTHER_KEY,
    Exported,
    export_bundle,
    new_log,
    typical_bundle,
    typical_history,
)


@pytest.fixture(scope="module")
def exported() -> Exported:
    return typical_bundle(commands=2)


@pytest.fixture
def files(tmp_path: Path, exported: Exported) -> dict[str, Path]:
    paths = {
        "bundle": tmp_path / "audit.jsonl",
        "key": tmp_path / "audit.pub",
        "other": tmp_path / "other.pub",
        "earlier": tmp_path / "earlier.note",
    }
    paths["bundle"].write_bytes(exported.bundle)
    paths["key"].write_bytes(AUDIT_KEY.public.to_pem())
    paths["other"].write_bytes(OTHER_KEY.public.to_pem())
    paths["earlier"].write_bytes(exported.checkpoints[0])
    return paths


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_valid_bundle_exits_zero_with_a_summary_and_what_it_did_not_check(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(["verify", str(files["bundle"]), "--key", str(files["key"])], capsys)
    assert code == 0 and err == ""
    summary, not_checked = out.splitlines()
    assert summary.startswith("OK: 6 records of desk.example.com/audit/team-7")
    assert not_checked.startswith("not checked: rollback or truncation against an earlier export")
    assert "--previous-checkpoint FILE" in not_checked
    code, out, _ = run(["verify", str(files["bundle"]), "--key", str(files["key"]), "--json"],
                       capsys)  # fmt: skip
    assert json.loads(out)["not_checked"] == [not_checked]


def test_with_an_earlier_checkpoint_the_ok_is_one_line(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["verify", str(files["bundle"]), "--key", str(files["key"])]
    code, out, _ = run([*argv, "--previous-checkpoint", str(files["earlier"])], capsys)
    assert code == 0 and out.count("\n") == 1 and out.startswith("OK: 6 records")
    code, out, _ = run([*argv, "--previous-checkpoint", str(files["earlier"]), "--json"], capsys)
    result = json.loads(out)
    assert result["not_checked"] == [] and result["auditor_checkpoint_sizes"] == [5]
    assert result["format"] == "tucdesk-audit-verify-v1"


def test_earlier_checkpoint_file_is_checked(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["verify", str(files["bundle"]), "--key", str(files["key"])]
    code, out, _ = run([*argv, "--previous-checkpoint", str(files["earlier"])], capsys)
    assert code == 0 and "consistent with checkpoint at 5" in out


def test_tampered_bundle_exits_one_naming_the_record(
    files: dict[str, Path], exported: Exported, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = exported.lines()
    del lines[3]
    files["bundle"].write_bytes(b"".join(lines))
    code, out, _ = run(["verify", str(files["bundle"]), "--key", str(files["key"])], capsys)
    assert code == 1
    assert out.strip() == (
        "INVALID: record 2 (line 4): sequence number 3 where 2 was expected "
        "(a record was deleted, inserted or moved)"
    )


def test_wrong_key_exits_three_naming_both_fingerprints(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(["verify", str(files["bundle"]), "--key", str(files["other"])], capsys)
    assert code == 3 and out.startswith("WRONG KEY: no pinned key signed this bundle")
    assert f"signed by audit key {AUDIT_KEY.public.fingerprint}" in out
    assert f"{OTHER_KEY.public.fingerprint} ({files['other']})" in out
    code, out, _ = run(
        ["verify", str(files["bundle"]), "--key", str(files["other"]), "--json"], capsys
    )
    result = json.loads(out)
    assert code == 3 and result["code"] == "wrong_key" and result["ok"] is False


def test_json_output_is_structured(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        ["verify", str(files["bundle"]), "--key", str(files["key"]), "--json"], capsys
    )
    result = json.loads(out)
    assert code == 0
    assert result["verdict"] == "valid" and result["record_count"] == 6
    assert result["origin"] == "desk.example.com/audit/team-7" and len(result["root_hash"]) == 64


@pytest.mark.parametrize(
    "problem", ["missing bundle", "missing key", "garbage key", "garbage bundle", "bad earlier"]
)
def test_unreadable_input_exits_two_with_one_line(
    problem: str, files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["verify", str(files["bundle"]), "--key", str(files["key"])]
    if problem == "missing bundle":
        argv[1] = str(tmp_path / "nope.jsonl")
    elif problem == "missing key":
        argv[3] = str(tmp_path / "nope.pub")
    elif problem == "garbage key":
        files["key"].write_bytes(b"not a key")
    elif problem == "garbage bundle":
        files["bundle"].write_bytes(b"\x00\x01garbage")
    else:
        files["earlier"].write_bytes(b"not a note")
        argv += ["--previous-checkpoint", str(files["earlier"])]
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith("tucdesk-audit: UNREADABLE: ") and err.count("\n") == 1
    assert "Traceback" not in err


def test_help_describes_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for line in ("  0    OK", "  1    INVALID", "  2    UNREADABLE", "  3    WRONG KEY", "  4  ",
                 "  130  interrupted", "  141  the reader of the output went away (SIGPIPE",
                 "wrong_key", "checkpoint_not_saved"):  # fmt: skip
        assert line in help_text
    with pytest.raises(SystemExit):
        main(["recording", "--help"])
    assert "141 when the reader of the output went away (SIGPIPE)" in capsys.readouterr().out


def test_installed_console_script_verifies(files: dict[str, Path]) -> None:
    script = Path(sys.executable).parent / "tucdesk-audit"
    completed = subprocess.run(
        [str(script), "verify", str(files["bundle"]), "--key", str(files["key"])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("OK: 6 records")


def test_saved_checkpoint_catches_a_later_rollback(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    log = new_log()
    trio.run(typical_history, log, 1)
    old_bundle = tmp_path / "old.jsonl"
    old_bundle.write_bytes(export_bundle(log))
    trio.run(typical_history, log, 1)
    new_bundle = tmp_path / "new.jsonl"
    new_bundle.write_bytes(export_bundle(log))
    saved = tmp_path / "last.note"
    key = ["--key", str(files["key"])]

    code, _, _ = run(["verify", str(new_bundle), *key, "--save-checkpoint", str(saved)], capsys)
    assert code == 0 and saved.read_bytes().startswith(b"desk.example.com/audit/team-7\n8\n")
    code, out, _ = run(
        ["verify", str(old_bundle), *key, "--previous-checkpoint", str(saved)], capsys
    )
    assert code == 1 and "rollback" in out
    code, _, _ = run(["verify", str(new_bundle), *key, "--previous-checkpoint", str(saved)], capsys)
    assert code == 0


def test_invalid_bundle_does_not_save_a_checkpoint(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    saved = tmp_path / "last.note"
    argv = ["verify", str(files["bundle"]), "--key", str(files["other"])]
    code, _, _ = run([*argv, "--save-checkpoint", str(saved)], capsys)
    assert code == 3 and not saved.exists()
