"""A bundle a newer TucDesk release wrote, with actions this verifier does not know: not
INVALID (the tamper signal) but NEWER, exit 5, once every other check passed; tampering with
such a record, a malformed action, and a key an unknown record may have introduced stay INVALID."""

from __future__ import annotations

import hashlib
import io
import json
from datetime import datetime
from pathlib import Path

import pytest
import trio

from audit.actions import Action, ActorKind
from audit.errors import RecordError
from audit.log import AuditLog
from audit.main import build_parser, main
from audit.record import (
    Actor,
    AuditEvent,
    AuditRecord,
    UnknownAction,
    parse_action,
    sign_event,
)
from audit.show import RecordFilter, show_records
from audit.verify import EXIT_CODES, Verdict, verify_bundle
from protocol.canonical_json import canonical_json
from protocol.identity import SigningIdentity
from tests.audit.builders import (
    AGENT_ID,
    AGENT_KEY,
    AUDIT_KEY,
    OPERATOR,
    OTHER_KEY,
    SERVICE,
    START,
    TEAM,
    agent_event,
    export_bundle,
    new_log,
    register_agent,
    typical_history,
)

NEWER_REFUSAL = "approval.bulk_decision_refused"  # as a later release might add
NEWER_AGENT_ACTION = "session.file_copied"
NEWER_IN_AGENT_NAME = "agent.upgraded"
EXIT_NEWER = 5
TYPICAL_RECORDS = 6  # typical_history(commands=3)


async def _append_newer(
    log: AuditLog,
    action: str,
    actor: Actor,
    *,
    key: SigningIdentity = AUDIT_KEY,
    context: dict[str, object] | None = None,
) -> None:
    """Sign an event naming ``action`` as a raw string and place it through the log's own
    writer, as a newer rendezvous would (this release's ``append`` refuses the action)."""
    moment: datetime = log._clock()  # noqa: SLF001 - the writer's clock and queue, not a copy
    event = AuditEvent(
        occurred_at=moment,
        team_id=TEAM,
        actor=actor,
        action=UnknownAction(action),
        signer=key.public.key_id,
        target="approval_request:apr-9",
        context=context or {"reason": "not_found"},  # type: ignore[arg-type]
    )
    await log._place(sign_event(key, event), moment, None)  # noqa: SLF001


def _newer_log() -> AuditLog:
    log = new_log()

    async def build() -> None:
        await typical_history(log, commands=3)
        await _append_newer(log, NEWER_REFUSAL, OPERATOR)
        await log.append(Action.AGENT_CONNECTED, SERVICE, target=AGENT_ID)
        await _append_newer(log, NEWER_REFUSAL, OPERATOR, context={"reason": "own_request"})
        # A newer agent-signed action, through the path agents' events take.
        signed = agent_event(when=START, context={"file": "a.txt"})
        newer = AuditEvent(
            occurred_at=signed.event.occurred_at, team_id=TEAM, actor=signed.event.actor,
            action=UnknownAction(NEWER_AGENT_ACTION), signer=AGENT_KEY.public.key_id,
            session_id="s-1", context={"file": "a.txt"},
        )  # fmt: skip
        # The log writes only this release's actions (append_agent_event refuses it), so the
        # newer record is placed as a newer rendezvous's log would have placed it.
        await log._place(  # noqa: SLF001
            sign_event(AGENT_KEY, newer), log._clock(), newer.digest  # noqa: SLF001
        )
        # In the agent's name, but signed by the service's audit key.
        agent = Actor(ActorKind.AGENT, AGENT_ID, "web-1")
        await _append_newer(log, NEWER_IN_AGENT_NAME, agent, context={"version": "2"})
        await log.append(Action.AUDIT_EXPORTED, OPERATOR, context={"format": "jsonl"})

    trio.run(build)
    return log


@pytest.fixture(scope="module")
def newer_bundle() -> bytes:
    return export_bundle(_newer_log())


@pytest.fixture
def files(tmp_path: Path, newer_bundle: bytes) -> dict[str, Path]:
    paths = {"bundle": tmp_path / "audit.jsonl", "key": tmp_path / "audit.pub"}
    paths["bundle"].write_bytes(newer_bundle)
    paths["key"].write_bytes(AUDIT_KEY.public.to_pem())
    return paths


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _verify(bundle: bytes) -> tuple[Verdict, str]:
    result = verify_bundle(io.BytesIO(bundle), [AUDIT_KEY.public])
    return result.verdict, result.summary()


def _edited(bundle: bytes, seq: int, change: dict[str, object]) -> bytes:
    """``bundle`` with record ``seq``'s event fields changed, re-encoded canonically."""
    lines = bundle.splitlines(keepends=True)
    record = json.loads(lines[seq + 1])
    record["event"].update(change)
    lines[seq + 1] = canonical_json(record) + b"\n"
    return b"".join(lines)


def test_unknown_actions_of_a_newer_release_verify_as_newer_with_exit_5(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(["verify", str(files["bundle"]), "--key", str(files["key"])], capsys)
    assert code == EXIT_NEWER == EXIT_CODES[Verdict.NEWER] and err == ""
    verdict, newer, rollback = out.splitlines()
    assert verdict.startswith("NEWER: 12 records of desk.example.com/audit/team-7")
    assert "4 records of actions this tucdesk-audit does not know" in verdict
    first = TYPICAL_RECORDS
    assert newer == (
        "from a newer TucDesk release: 4 records use actions this tucdesk-audit does not know: "
        f"{NEWER_REFUSAL} (2), {NEWER_IN_AGENT_NAME} (1), {NEWER_AGENT_ACTION} (1); the first "
        f"is record {first} (line {first + 2}): chain and signatures verified, what these "
        "records mean was not checked: upgrade tucdesk-audit; 1 of them names an agent as the "
        "actor but is signed by the service's audit key, verified only as far as that "
        "signature goes (whether the agent's own key must sign such records was not checked)"
    )
    assert rollback.startswith("not checked: rollback or truncation")


def test_json_says_newer_with_its_code_and_the_unknown_actions(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["verify", str(files["bundle"]), "--key", str(files["key"]), "--json"]
    code, out, _ = _run(argv, capsys)
    value = json.loads(out)
    assert code == EXIT_NEWER
    assert (value["verdict"], value["code"], value["ok"], value["verified"]) == (
        "newer", "newer", False, True,
    )  # fmt: skip
    assert value["newer_actions"] == {
        "records": 4,
        "actions": {NEWER_REFUSAL: 2, NEWER_IN_AGENT_NAME: 1, NEWER_AGENT_ACTION: 1},
        "uncounted_records": 0,
        "first_seq": TYPICAL_RECORDS,
        "first_line": TYPICAL_RECORDS + 2,
        "in_agent_name_signed_by_service": 1,
    }
    assert value["not_checked"][0].startswith("from a newer TucDesk release: 4 records")
    assert value["record_count"] == 12 and value["reason"] is None


def test_a_bundle_of_known_actions_only_stays_valid_with_exit_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = new_log()
    trio.run(typical_history, log)
    bundle = tmp_path / "audit.jsonl"
    bundle.write_bytes(export_bundle(log))
    key = tmp_path / "audit.pub"
    key.write_bytes(AUDIT_KEY.public.to_pem())
    code, out, _ = _run(["verify", str(bundle), "--key", str(key), "--json"], capsys)
    value = json.loads(out)
    assert code == 0 and value["verdict"] == "valid" and value["newer_actions"] is None


def test_a_tampered_record_of_an_unknown_action_is_invalid(newer_bundle: bytes) -> None:
    seq = TYPICAL_RECORDS
    edited = _edited(newer_bundle, seq, {"context": {"reason": "approved"}})
    verdict, summary = _verify(edited)
    assert verdict is Verdict.INVALID
    assert summary == (
        f"INVALID: record {seq} (line {seq + 2}): event signature does not verify (on a record "
        f"of an unknown action, '{NEWER_REFUSAL}': a newer release's, or edited)"
    )
    # Renamed to another unknown action: its signature covers the action too.
    verdict, summary = _verify(_edited(newer_bundle, seq, {"action": "approval.other_thing"}))
    assert verdict is Verdict.INVALID and "event signature does not verify" in summary
    # Renamed to a known one: the same.
    verdict, summary = _verify(_edited(newer_bundle, seq, {"action": "approval.denied"}))
    assert verdict is Verdict.INVALID and "event signature does not verify" in summary


def test_a_record_of_an_unknown_action_signed_by_an_unknown_key_is_invalid(
    newer_bundle: bytes,
) -> None:
    seq = TYPICAL_RECORDS
    lines = newer_bundle.splitlines(keepends=True)
    record = json.loads(lines[seq + 1])
    event = AuditEvent.from_json(
        {**record["event"], "signer": OTHER_KEY.public.key_id}, newer_actions=True
    )
    resigned = AuditRecord(
        seq, datetime.fromisoformat(record["time"]), bytes.fromhex(record["prev_hash"]),
        sign_event(OTHER_KEY, event),
    )  # fmt: skip
    lines[seq + 1] = resigned.canonical + b"\n"
    verdict, summary = _verify(b"".join(lines))
    assert verdict is Verdict.INVALID
    assert summary.startswith(f"INVALID: record {seq} (line {seq + 2}): signed by key")


@pytest.mark.parametrize(
    ("action", "why"),
    [
        ("Approval.Refused", "is not of the form word.word"),
        ("approval.bulk.refused", "is not of the form word.word"),
        ("approval", "is not of the form word.word"),
        ("approval.refused\n", "is not of the form word.word"),
        ("approval.r\u0435fused", "is not of the form word.word"),  # a Cyrillic e
        ("approval." + "x" * 60, "is longer than 64 characters"),
        (7, "must be a string"),
    ],
)
def test_a_malformed_action_stays_invalid(newer_bundle: bytes, action: object, why: str) -> None:
    seq = TYPICAL_RECORDS
    verdict, summary = _verify(_edited(newer_bundle, seq, {"action": action}))
    assert verdict is Verdict.INVALID
    assert summary.startswith(f"INVALID: record {seq} (line {seq + 2}): ") and why in summary


def test_a_key_an_unknown_record_may_have_introduced_stays_invalid_naming_both(
    tmp_path: Path,
) -> None:
    log = new_log()

    async def build() -> None:
        await typical_history(log, commands=1)
        await _append_newer(log, "service_key.rotated_v2", SERVICE, context={"new": "key"})
        await _append_newer(log, NEWER_REFUSAL, SERVICE, key=OTHER_KEY)

    trio.run(build)
    result = verify_bundle(io.BytesIO(export_bundle(log)), [AUDIT_KEY.public])
    assert result.verdict is Verdict.INVALID and result.exit_code == 1
    assert result.bad_seq == 5 and result.bad_line == 7
    assert f"signed by key {OTHER_KEY.public.key_id}" in (result.reason or "")
    assert (
        "(record 4, line 6, has action 'service_key.rotated_v2', which this tucdesk-audit does "
        "not know: from a newer TucDesk release, it may be a new kind of key rotation"
    ) in (result.reason or "")


def test_show_prints_records_of_unknown_actions_as_they_are_with_exit_5(
    files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["show", str(files["bundle"]), "--key", str(files["key"]), "--action", "approval."]
    code, out, err = _run(argv, capsys)
    assert code == EXIT_NEWER
    lines = out.splitlines()
    assert len(lines) == 2 and all(f" {NEWER_REFUSAL} by=operator:op-1" in line for line in lines)
    assert "details.reason=own_request" in lines[1]
    assert err.startswith("tucdesk-audit: NEWER: 12 records")
    assert "tucdesk-audit: from a newer TucDesk release: 4 records" in err
    shown = show_records(
        io.BytesIO(files["bundle"].read_bytes()), [AUDIT_KEY.public], RecordFilter()
    )
    assert [record.action for record in shown.records][TYPICAL_RECORDS:-1] == [
        NEWER_REFUSAL, "agent.connected", NEWER_REFUSAL, NEWER_AGENT_ACTION, NEWER_IN_AGENT_NAME,
    ]  # fmt: skip


def test_save_checkpoint_keeps_a_newer_bundles_checkpoint(
    files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kept = tmp_path / "kept.checkpoint"
    argv = ["verify", str(files["bundle"]), "--key", str(files["key"])]
    code, _, _ = _run([*argv, "--save-checkpoint", str(kept)], capsys)
    assert code == EXIT_NEWER and kept.read_bytes()
    code, out, _ = _run([*argv, "--previous-checkpoint", str(kept)], capsys)
    assert code == EXIT_NEWER and "not checked: rollback" not in out


def test_the_log_and_strict_parsing_still_refuse_unknown_actions(newer_bundle: bytes) -> None:
    line = newer_bundle.splitlines()[TYPICAL_RECORDS + 1]
    with pytest.raises(RecordError, match="unknown action 'approval.bulk_decision_refused'"):
        AuditRecord.from_line(line)
    with pytest.raises(RecordError, match="unknown action"):
        parse_action(NEWER_REFUSAL)
    assert parse_action("session.ended", newer_actions=True) is Action.SESSION_ENDED
    log = new_log()
    with pytest.raises(RecordError, match="unknown audit action"):
        trio.run(log.append, NEWER_REFUSAL, OPERATOR)


def test_help_documents_exit_5_and_what_an_unknown_action_can_hide(
    capsys: pytest.CaptureFixture[str],
) -> None:
    top = build_parser().format_help()
    assert "5    NEWER" in top and "newer, checkpoint_not_saved" in top
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "5 NEWER" in flat
    assert "new kind of key rotation" in flat and "stays INVALID" in flat
    assert "verified only as far as that signature goes" in flat


def test_the_log_refuses_an_agent_event_of_an_action_it_does_not_know() -> None:
    log = new_log()
    signed = agent_event(when=START, context={"file": "a.txt"})
    newer = AuditEvent(
        occurred_at=signed.event.occurred_at, team_id=TEAM, actor=signed.event.actor,
        action=UnknownAction(NEWER_AGENT_ACTION), signer=AGENT_KEY.public.key_id,
        session_id="s-1", context={"file": "a.txt"},
    )  # fmt: skip

    async def append() -> None:
        await log.append_agent_event(sign_event(AGENT_KEY, newer), AGENT_ID, AGENT_KEY.public)

    with pytest.raises(RecordError, match="only actions of this release"):
        trio.run(append)


def test_a_recording_is_checked_against_a_newer_export_and_the_newer_records_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recording_bytes = b'{"version": 2, "width": 80, "height": 24}\n[0.5, "o", "hi"]\n'
    bound = {"file": "ses_1.cast", "sha256": hashlib.sha256(recording_bytes).hexdigest(),
             "bytes": len(recording_bytes), "truncated": False, "failed": False}  # fmt: skip
    log = new_log()

    async def build() -> None:
        await register_agent(log)
        ended = agent_event(Action.SESSION_ENDED, when=START, session_id="s-1",
                            context={"recording": bound, "reason": "normal"})  # fmt: skip
        await log.append_agent_event(ended, AGENT_ID, AGENT_KEY.public)
        await _append_newer(log, NEWER_REFUSAL, OPERATOR)

    trio.run(build)
    bundle, key, recording = (tmp_path / "audit.jsonl", tmp_path / "audit.pub",
                              tmp_path / "ses_1.cast")  # fmt: skip
    bundle.write_bytes(export_bundle(log))
    key.write_bytes(AUDIT_KEY.public.to_pem())
    recording.write_bytes(recording_bytes)
    code, out, _ = _run(["recording", str(recording), "--export", str(bundle), "--key", str(key)],
                        capsys)  # fmt: skip
    assert code == 5, out  # NEWER, as verify says it (tests/audit/test_review10_newer_exits.py)
    assert "ses_1.cast matches record" in out
    assert "a newer release's), verified but not interpreted: upgrade tucdesk-audit" in out
