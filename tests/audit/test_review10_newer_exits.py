"""Review 10: NEWER keeps its meaning in every command. `recording` exits 5 with "newer": true
when the file matches its record in a NEWER export (and its --help says so); `verify
--save-checkpoint` exits 4 when the checkpoint is not saved even for a NEWER bundle (the save
asked for failed: that wins, as documented) but still says NEWER in its output."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import trio

from audit.actions import Action
from audit.main import EXIT_CHECKPOINT_NOT_SAVED, build_parser, main
from audit.verify import EXIT_CODES, Verdict
from tests.audit.builders import (
    AGENT_ID,
    AGENT_KEY,
    AUDIT_KEY,
    OPERATOR,
    START,
    agent_event,
    export_bundle,
    new_log,
    register_agent,
    typical_history,
)
from tests.audit.test_newer_actions import NEWER_REFUSAL, _append_newer, _newer_log

RECORDING = b'{"version": 2, "width": 80, "height": 24}\n[0.5, "o", "hi"]\n'


def _run(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(arguments)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _recording_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    bound = {"file": "ses_1.cast", "sha256": hashlib.sha256(RECORDING).hexdigest(),
             "bytes": len(RECORDING), "truncated": False, "failed": False}  # fmt: skip
    log = new_log()

    async def build() -> None:
        await register_agent(log)
        ended = agent_event(Action.SESSION_ENDED, when=START, session_id="s-1",
                            context={"recording": bound, "reason": "normal"})  # fmt: skip
        await log.append_agent_event(ended, AGENT_ID, AGENT_KEY.public)
        await _append_newer(log, NEWER_REFUSAL, OPERATOR)

    trio.run(build)
    bundle, key, recording = tmp_path / "a.jsonl", tmp_path / "a.pub", tmp_path / "ses_1.cast"
    bundle.write_bytes(export_bundle(log))
    key.write_bytes(AUDIT_KEY.public.to_pem())
    recording.write_bytes(RECORDING)
    return bundle, key, recording


def test_a_recording_matching_a_newer_export_exits_5_and_says_newer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, key, recording = _recording_files(tmp_path)
    arguments = ["recording", str(recording), "--export", str(bundle), "--key", str(key)]
    code, out, _ = _run(arguments, capsys)
    assert code == EXIT_CODES[Verdict.NEWER] == 5, out
    assert "ses_1.cast matches record" in out and "upgrade tucdesk-audit" in out
    code, out, _ = _run([*arguments, "--json"], capsys)
    answer = json.loads(out)
    assert code == 5
    assert answer["code"] == "matches" and answer["ok"] is True and answer["newer"] is True
    assert answer["verdict"] == "newer"
    # An edited file is still a mismatch (1), the newer fact kept beside it.
    recording.write_bytes(RECORDING.replace(b"hi", b"ho"))
    code, out, _ = _run([*arguments, "--json"], capsys)
    answer = json.loads(out)
    assert code == 1 and answer["code"] == "edited" and answer["newer"] is True


def test_recording_help_lists_exit_5(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["recording", "--help"])
    text = capsys.readouterr().out
    assert " 5 when the file matches its record but the bundle is NEWER" in " ".join(text.split())
    assert '"newer"' in text


def test_an_unsaved_checkpoint_of_a_newer_bundle_exits_4_and_still_says_newer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "k.pub"
    key.write_bytes(AUDIT_KEY.public.to_pem())
    other = new_log()
    trio.run(lambda: typical_history(other, commands=40))
    larger, newer = tmp_path / "other.jsonl", tmp_path / "newer.jsonl"
    larger.write_bytes(export_bundle(other))
    newer.write_bytes(export_bundle(_newer_log()))
    kept = tmp_path / "kept"
    code, _, _ = _run(["verify", str(larger), "--key", str(key), "--save-checkpoint", str(kept)],
                      capsys)  # fmt: skip
    assert code == 0
    arguments = ["verify", str(newer), "--key", str(key), "--save-checkpoint", str(kept)]
    code, out, err = _run(arguments, capsys)
    assert code == EXIT_CHECKPOINT_NOT_SAVED == 4
    assert "NEWER" in out and "not saving the checkpoint" in err
    code, out, _ = _run([*arguments, "--json"], capsys)
    answer = json.loads(out)
    assert code == 4 and answer["code"] == "checkpoint_not_saved"
    assert answer["verdict"] == "newer" and answer["newer_actions"]
    verify_help = " ".join(build_parser()._subparsers._group_actions[0].choices[  # noqa: SLF001
        "verify"].epilog.split())  # fmt: skip
    assert "It wins over 5 for a NEWER bundle" in verify_help
    assert "retired key still signing" in verify_help
