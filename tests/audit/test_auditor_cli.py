"""What an auditor runs into with `tucdesk-audit`: recordings checked from one verified read,
kept checkpoints that never move backwards, keys named by fingerprint, a wrong key told apart
from tampering, Ctrl-C, and bundles read from stdin."""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import stat
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import trio

import audit.main as audit_main
from audit import recording_check
from audit.actions import Action
from audit.main import main
from audit.progress import ERASE_LINE
from audit.verify import VerificationResult
from tests.audit.builders import (
    AGENT_ID,
    AGENT_KEY,
    AUDIT_KEY,
    OTHER_KEY,
    START,
    agent_event,
    export_bundle,
    new_log,
    register_agent,
    typical_bundle,
    typical_history,
)

SCRIPT = Path(sys.executable).parent / "tucdesk-audit"
WAIT_SECONDS = 30
RECORDING = b'{"version": 2, "width": 80, "height": 24}\n[0.5, "o", "hello"]\n'
OTHER_RECORDING = b'{"version": 2, "width": 80, "height": 24}\n[0.5, "o", "bye"]\n[1, "o", "!"]\n'


def binding(name: str, data: bytes) -> dict[str, object]:
    """The ``recording`` context an agent signs into session.ended for ``data``."""
    return {"file": name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "truncated": False, "failed": False}  # fmt: skip


def bundle_with_recordings(*sessions: tuple[str, dict[str, object]]) -> bytes:
    """A log where the agent ended each (session id, recording binding) session."""
    log = new_log()

    async def run() -> None:
        await register_agent(log)
        for session_id, bound in sessions:
            when = START + timedelta(microseconds=await log.size())
            event = agent_event(
                Action.SESSION_ENDED, when=when, session_id=session_id,
                context={"recording": bound, "reason": "normal"},
            )  # fmt: skip
            await log.append_agent_event(event, AGENT_ID, AGENT_KEY.public)

    trio.run(run)
    return export_bundle(log)


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "audit.pub"
    path.write_bytes(AUDIT_KEY.public.to_pem())
    return path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- 1. recording: nothing is read from the bundle after it verified -------------------------


def test_a_bundle_swapped_after_verification_never_vouches_for_a_recording(
    tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    recording = tmp_path / "ses_1.cast"
    recording.write_bytes(RECORDING)
    genuine = bundle_with_recordings(("s-1", binding("ses_1.cast", OTHER_RECORDING)))
    # The forger rewrites the binding to the file's size and hash: the signature no longer holds.
    forged = genuine.replace(
        hashlib.sha256(OTHER_RECORDING).hexdigest().encode(),
        hashlib.sha256(RECORDING).hexdigest().encode(),
    ).replace(b'"bytes":%d' % len(OTHER_RECORDING), b'"bytes":%d' % len(RECORDING))
    assert forged != genuine
    bundle = tmp_path / "audit.jsonl"
    bundle.write_bytes(genuine)
    real_verify = recording_check.verify_bundle

    def verify_then_swap(*args: object, **kwargs: object) -> VerificationResult:
        result = real_verify(*args, **kwargs)  # type: ignore[arg-type]
        bundle.write_bytes(forged)  # the swap lands right after the verifying read
        return result

    monkeypatch.setattr(recording_check, "verify_bundle", verify_then_swap)
    argv = ["recording", str(recording), "--export", str(bundle), "--key", str(key)]
    code, out, err = run(argv, capsys)
    assert code == 1 and out == "" and "matches" not in err
    assert f"the log says {len(OTHER_RECORDING)} bytes, the file has {len(RECORDING)}" in err
    monkeypatch.undo()
    code, out, err = run(argv, capsys)  # the forged bundle itself does not verify
    assert code == 1 and "does not verify" in err


# ---- 2. --save-checkpoint never moves backwards nor across logs -------------------------------


def _two_exports(tmp_path: Path) -> tuple[Path, Path]:
    log = new_log()
    trio.run(typical_history, log, 1)
    old = tmp_path / "old.jsonl"
    old.write_bytes(export_bundle(log))
    trio.run(typical_history, log, 1)
    new = tmp_path / "new.jsonl"
    new.write_bytes(export_bundle(log))
    return old, new


def test_a_kept_checkpoint_is_not_replaced_by_an_older_smaller_one(
    tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = _two_exports(tmp_path)
    saved = tmp_path / "kept.note"
    code, _, _ = run(["verify", str(new), "--key", str(key), "--save-checkpoint", str(saved)],
                     capsys)  # fmt: skip
    kept = saved.read_bytes()
    assert code == 0 and kept.startswith(b"desk.example.com/audit/team-7\n8\n")
    code, out, err = run(
        ["verify", str(old), "--key", str(key), "--save-checkpoint", str(saved)], capsys
    )
    assert code == 4 and saved.read_bytes() == kept
    assert out.startswith("OK: 4 records")  # the older export itself is fine
    assert "keeps a checkpoint of 8 records and this bundle has only 4" in err
    assert "never moves backwards" in err
    code, out, _ = run(
        ["verify", str(old), "--key", str(key), "--save-checkpoint", str(saved), "--json"], capsys
    )
    assert code == 4 and json.loads(out)["code"] == "checkpoint_not_saved"
    code, _, _ = run(["verify", str(new), "--key", str(key), "--save-checkpoint", str(saved)],
                     capsys)  # fmt: skip
    assert code == 0 and saved.read_bytes() == kept


def test_a_kept_checkpoint_of_another_log_is_not_overwritten(
    tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, new = _two_exports(tmp_path)
    other_team = new_log(team="team-8")
    trio.run(register_agent, other_team)
    other = tmp_path / "other.jsonl"
    other.write_bytes(export_bundle(other_team))
    saved = tmp_path / "kept.note"
    assert main(["verify", str(new), "--key", str(key), "--save-checkpoint", str(saved)]) == 0
    kept = saved.read_bytes()
    capsys.readouterr()
    code, _, err = run(
        ["verify", str(other), "--key", str(key), "--save-checkpoint", str(saved)], capsys
    )
    assert code == 4 and saved.read_bytes() == kept
    assert "another log (desk.example.com/audit/team-7)" in err


def test_a_file_holding_no_pinned_checkpoint_is_not_overwritten(
    tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, new = _two_exports(tmp_path)
    saved = tmp_path / "notes.txt"
    saved.write_bytes(b"my own notes\n")
    code, out, err = run(
        ["verify", str(new), "--key", str(key), "--save-checkpoint", str(saved)], capsys
    )
    assert code == 4 and saved.read_bytes() == b"my own notes\n"
    assert out.startswith("OK: 8 records")  # exit 4 says the bundle verified: it is checked first
    assert "holds no checkpoint signed by a pinned key" in err
    code, out, _ = run(
        ["verify", str(new), "--key", str(key), "--save-checkpoint", str(saved), "--json"], capsys
    )
    result = json.loads(out)
    assert code == 4 and result["code"] == "checkpoint_not_saved"
    assert result["verdict"] == "valid" and result["ok"] is True


def test_a_tampered_bundle_is_reported_invalid_whatever_the_checkpoint_file_holds(
    tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Exit 4 ("verified, FILE unchanged") must never be what a tampered bundle gets.
    _, new = _two_exports(tmp_path)
    lines = new.read_bytes().splitlines(keepends=True)
    del lines[3]  # a record deleted
    new.write_bytes(b"".join(lines))
    saved = tmp_path / "notes.txt"
    saved.write_bytes(b"my own notes\n")
    argv = ["verify", str(new), "--key", str(key), "--save-checkpoint", str(saved)]
    code, out, err = run(argv, capsys)
    assert code == 1 and out.startswith("INVALID:") and "not saving" not in err
    code, out, _ = run([*argv, "--json"], capsys)
    result = json.loads(out)
    assert code == 1 and saved.read_bytes() == b"my own notes\n"
    assert result["verdict"] == "invalid" and result["code"] == "invalid" and result["ok"] is False


def test_a_run_finishing_after_a_newer_one_does_not_move_the_kept_checkpoint_back(
    tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    old, new = _two_exports(tmp_path)
    saved = tmp_path / "kept.note"
    real_verify = audit_main.verify_bundle
    fired: list[int] = []
    newer = ["verify", str(new), "--key", str(key), "--save-checkpoint", str(saved)]

    def another_run_saves_meanwhile(*args: object, **kwargs: object) -> VerificationResult:
        if not fired:  # another auditor's run, on the newer export, ends while this verifies
            fired.append(1)
            assert main(newer) == 0
        return real_verify(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(audit_main, "verify_bundle", another_run_saves_meanwhile)
    code, _, err = run(
        ["verify", str(old), "--key", str(key), "--save-checkpoint", str(saved)], capsys
    )
    assert code == 4 and saved.read_bytes().startswith(b"desk.example.com/audit/team-7\n8\n")
    assert "keeps a checkpoint of 8 records and this bundle has only 4" in err


def test_the_checkpoint_lock_is_private_and_never_followed_through_a_symlink(
    tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, new = _two_exports(tmp_path)
    saved = tmp_path / "kept.note"
    argv = ["verify", str(new), "--key", str(key), "--save-checkpoint", str(saved)]
    assert main(argv) == 0
    lock = tmp_path / "kept.note.lock"
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    saved.chmod(0o400)  # a stricter mode the auditor chose is kept
    assert main(argv) == 0 and stat.S_IMODE(saved.stat().st_mode) == 0o400
    lock.unlink()
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me\n")
    lock.symlink_to(victim)
    capsys.readouterr()
    code, out, err = run(argv, capsys)
    assert code == 4 and out.startswith("OK: 8 records") and "cannot lock" in err
    assert victim.read_bytes() == b"keep me\n"


@pytest.mark.parametrize("option", ["--save-checkpoint", "--previous-checkpoint"])
def test_a_fifo_in_place_of_a_checkpoint_file_is_refused_at_once(
    tmp_path: Path, key: Path, option: str
) -> None:
    _, new = _two_exports(tmp_path)
    fifo = tmp_path / "kept.note"
    os.mkfifo(fifo)
    done = subprocess.run(
        [str(SCRIPT), "verify", str(new), "--key", str(key), option, str(fifo)],
        capture_output=True, timeout=WAIT_SECONDS,
    )  # fmt: skip
    assert done.returncode == (4 if option == "--save-checkpoint" else 2), done.stderr
    assert b"not a regular file" in done.stderr and stat.S_ISFIFO(fifo.stat().st_mode)


def test_a_bundle_contradicting_the_kept_checkpoint_does_not_replace_it(
    tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, forked = new_log(), new_log()
    trio.run(typical_history, first, 1)  # 4 records: ..., one command, session end
    trio.run(typical_history, forked, 2)  # 5 records: record 3 is a second command instead
    saved = tmp_path / "kept.note"
    (tmp_path / "first.jsonl").write_bytes(export_bundle(first))
    (tmp_path / "forked.jsonl").write_bytes(export_bundle(forked))
    argv = ["--key", str(key), "--save-checkpoint", str(saved)]
    assert main(["verify", str(tmp_path / "first.jsonl"), *argv]) == 0
    kept = saved.read_bytes()
    capsys.readouterr()
    code, out, _ = run(["verify", str(tmp_path / "forked.jsonl"), *argv], capsys)
    assert code == 1 and saved.read_bytes() == kept
    assert "the first 4 records differ from the checkpoint kept in" in out


# ---- 3. which keys were verified against -----------------------------------------------------


def test_the_summary_and_json_name_the_keys_by_fingerprint(
    tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "audit.jsonl"
    bundle.write_bytes(typical_bundle(commands=2).bundle)
    code, out, _ = run(["verify", str(bundle), "--key", str(key)], capsys)
    assert code == 0
    assert out.splitlines()[0].endswith(f"; signed by pinned audit key "
                                        f"{AUDIT_KEY.public.fingerprint} ({key})")  # fmt: skip
    code, out, _ = run(["verify", str(bundle), "--key", str(key), "--json"], capsys)
    result = json.loads(out)
    assert result["code"] == "valid"
    assert result["pinned_keys"] == [{
        "file": str(key), "fingerprint": AUDIT_KEY.public.fingerprint,
        "key_id": AUDIT_KEY.public.key_id, "signed": True,
    }]  # fmt: skip
    signers = {entry["role"]: entry for entry in result["signing_keys"]}
    assert signers["audit"]["fingerprint"] == AUDIT_KEY.public.fingerprint
    assert signers["audit"]["agent_id"] is None
    assert signers["agent"]["fingerprint"] == AGENT_KEY.public.fingerprint
    assert signers["agent"]["agent_id"] == AGENT_ID and signers["agent"]["records"] == 2


def test_key_command_prints_the_fingerprint_as_keys_show_does(
    tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other.pub"
    other.write_bytes(OTHER_KEY.public.to_pem())
    code, out, _ = run(["key", str(key), str(other)], capsys)
    assert code == 0
    assert out == (
        f"{key}: {AUDIT_KEY.public.fingerprint} kid={AUDIT_KEY.public.key_id}\n"
        f"{other}: {OTHER_KEY.public.fingerprint} kid={OTHER_KEY.public.key_id}\n"
    )
    assert AUDIT_KEY.public.fingerprint.startswith("SHA256:")


def test_a_reader_that_goes_away_ends_the_command_quietly(key: Path) -> None:
    # `tucdesk-audit key *.pem | head -1`: no "internal error (BrokenPipeError)", no traceback.
    child = subprocess.Popen(
        [str(SCRIPT), "key", *[str(key)] * 5000], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert child.stdout is not None and child.stderr is not None
    assert child.stdout.readline().startswith(str(key).encode())
    child.stdout.close()
    err = child.stderr.read()
    child.stderr.close()
    assert child.wait(WAIT_SECONDS) == -signal.SIGPIPE
    assert err == b""


# ---- 4. a private key is refused -------------------------------------------------------------


@pytest.mark.parametrize("command", ["verify", "key"])
def test_a_private_key_file_is_refused(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private = tmp_path / "audit.key"
    AUDIT_KEY.save(private)
    bundle = tmp_path / "audit.jsonl"
    bundle.write_bytes(typical_bundle(commands=1).bundle)
    argv = ["verify", str(bundle), "--key", str(private)] if command == "verify" else [
        "key", str(private)]  # fmt: skip
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert "PRIVATE key; refusing it" in err and err.count("\n") == 1


# ---- 5. recording: the file first, precise differences, --json -------------------------------


def test_an_unreadable_recording_is_reported_before_the_export_is_read(
    tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing_export = str(tmp_path / "no-export.jsonl")
    code, _, err = run(["recording", str(tmp_path / "nope.cast"), "--export", missing_export,
                        "--key", str(key)], capsys)  # fmt: skip
    assert code == 2 and err == f"tucdesk-audit: {tmp_path / 'nope.cast'}: cannot read (No such " \
        "file or directory)\n"
    code, _, err = run(["recording", str(tmp_path), "--export", missing_export, "--key",
                        str(key)], capsys)  # fmt: skip
    assert code == 2 and "a directory, not a recording file" in err


@pytest.mark.parametrize(
    ("content", "change"),
    [(RECORDING[:-4], "cut short"), (RECORDING + b'[2, "o", "x"]\n', "extended")],
)
def test_a_size_difference_says_whether_the_file_was_cut_or_extended(
    content: bytes, change: str, tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recording = tmp_path / "ses_1.cast"
    recording.write_bytes(content)
    bundle = tmp_path / "audit.jsonl"
    bundle.write_bytes(bundle_with_recordings(("s-1", binding("ses_1.cast", RECORDING))))
    argv = ["recording", str(recording), "--export", str(bundle), "--key", str(key)]
    code, _, err = run(argv, capsys)
    assert code == 1 and err.rstrip().endswith(f"the file has {len(content)} ({change})")
    code, out, _ = run([*argv, "--json"], capsys)
    result = json.loads(out)
    assert code == 1 and result["code"] == change.replace(" ", "_")
    assert result["record"]["bytes"] == len(RECORDING) and result["record"]["session_id"] == "s-1"
    assert result["recording"]["bytes"] == len(content)


def test_a_recording_of_another_session_is_named(
    tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "audit.jsonl"
    bundle.write_bytes(bundle_with_recordings(
        ("s-1", binding("ses_1.cast", RECORDING)), ("s-2", binding("ses_2.cast", OTHER_RECORDING))
    ))  # fmt: skip
    swapped = tmp_path / "ses_1.cast"
    swapped.write_bytes(OTHER_RECORDING)  # session 2's recording under session 1's name
    code, _, err = run(["recording", str(swapped), "--export", str(bundle), "--key", str(key)],
                       capsys)  # fmt: skip
    assert code == 1 and "size differs from record 1 (session s-1)" in err
    assert "its content matches record 2 (session s-2, file 'ses_2.cast')" in err
    renamed = tmp_path / "incident.cast"
    renamed.write_bytes(RECORDING)
    code, out, _ = run(["recording", str(renamed), "--export", str(bundle), "--key", str(key),
                        "--json"], capsys)  # fmt: skip
    result = json.loads(out)
    assert code == 1 and result["code"] == "not_named"
    assert [entry["session_id"] for entry in result["same_content_records"]] == ["s-1"]
    assert "session s-1" in result["message"]


def test_recording_json_reports_a_match_and_the_export(
    tmp_path: Path, key: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recording = tmp_path / "ses_1.cast"
    recording.write_bytes(RECORDING)
    bundle = tmp_path / "audit.jsonl"
    bundle.write_bytes(bundle_with_recordings(("s-1", binding("ses_1.cast", RECORDING))))
    code, out, _ = run(["recording", str(recording), "--export", str(bundle), "--key", str(key),
                        "--json"], capsys)  # fmt: skip
    result = json.loads(out)
    assert code == 0 and result["code"] == "matches" and result["ok"] is True
    assert result["recording"]["sha256"] == hashlib.sha256(RECORDING).hexdigest()
    assert result["export"]["pinned_keys"][0]["fingerprint"] == AUDIT_KEY.public.fingerprint


# ---- 6 and 8. Ctrl-C, and a bundle on stdin --------------------------------------------------


def test_a_bundle_on_stdin_is_verified(tmp_path: Path, key: Path) -> None:
    bundle = typical_bundle(commands=2).bundle
    completed = subprocess.run(
        [str(SCRIPT), "verify", "-", "--key", str(key)],
        input=bundle, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith(b"OK: 6 records")


def test_ctrl_c_prints_one_line_erases_progress_and_exits_130(key: Path) -> None:
    lines = typical_bundle(commands=400).bundle.splitlines(keepends=True)
    child = subprocess.Popen(
        [str(SCRIPT), "verify", "-", "--key", str(key), "--progress"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert child.stdin is not None and child.stderr is not None and child.stdout is not None
    try:
        child.stdin.write(b"".join(lines[:300]))  # the verifier then waits for more
        child.stdin.flush()
        err = b""
        deadline = time.monotonic() + WAIT_SECONDS
        while b"records" not in err:
            ready, _, _ = select.select([child.stderr], [], [], deadline - time.monotonic())
            assert ready, f"no progress line: {err!r}"
            err += os.read(child.stderr.fileno(), 4096)
        child.send_signal(signal.SIGINT)
        code = child.wait(WAIT_SECONDS)
        err += child.stderr.read()
        out = child.stdout.read()
    finally:
        child.kill()
        child.wait()
        for stream in (child.stdin, child.stdout, child.stderr):
            stream.close()
    assert code == 130 and out == b""
    assert err.endswith(ERASE_LINE.encode() + b"tucdesk-audit: interrupted\n"), err
    assert b"Traceback" not in err
