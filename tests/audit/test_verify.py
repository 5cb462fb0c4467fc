"""Every way of tampering with an export is detected, and each is named."""

from __future__ import annotations

import dataclasses
import io
import json
from datetime import timedelta

import pytest
import rfc8785
import trio

from audit.actions import Action
from audit.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from audit.log import AuditLog
from audit.merkle import MerkleFrontier
from audit.record import GENESIS_HASH, AuditEvent, AuditRecord, format_time, sign_event
from audit.store import MemoryAuditStore, StoredRecord
from audit.verify import Verdict, VerificationResult, verify_bundle
from tests.audit.builders import (
    AGENT_ID,
    AGENT_KEY,
    AUDIT_KEY,
    OPERATOR,
    OTHER_KEY,
    START,
    Exported,
    agent_event,
    export_bundle,
    new_log,
    register_agent,
    typical_bundle,
    typical_history,
)

PINNED = [AUDIT_KEY.public]


def verify(bundle: bytes, **options: object) -> VerificationResult:
    return verify_bundle(io.BytesIO(bundle), PINNED, **options)  # type: ignore[arg-type]


def records_of(exported: Exported) -> list[AuditRecord]:
    return [AuditRecord.from_line(line[:-1]) for line in exported.lines()[1:-1]]


def assemble(exported: Exported, records: list[bytes]) -> bytes:
    lines = exported.lines()
    return (
        lines[0]
        + b"".join(line if line.endswith(b"\n") else line + b"\n" for line in records)
        + lines[-1]
    )


def rechain(records: list[AuditRecord]) -> list[bytes]:
    """What an attacker without keys can do: renumber and re-hash, keeping signed events."""
    previous = GENESIS_HASH
    lines = []
    times = sorted(record.time for record in records)
    for seq, record in enumerate(records):
        rebuilt = AuditRecord(seq, times[seq], previous, record.signed)
        previous = rebuilt.record_hash
        lines.append(rebuilt.canonical)
    return lines


def assert_invalid(result: VerificationResult, bad_seq: int | None, reason: str) -> None:
    assert result.verdict is Verdict.INVALID, result.summary()
    assert result.exit_code == 1
    assert result.bad_seq == bad_seq, result.summary()
    assert reason in (result.reason or ""), result.summary()


@pytest.fixture(scope="module")
def exported() -> Exported:
    return typical_bundle(commands=4)


def test_untouched_bundle_verifies(exported: Exported) -> None:
    result = verify(exported.bundle)
    assert result.ok and result.exit_code == 0, result.summary()
    assert result.record_count == len(exported.lines()) - 2 == 8
    assert result.signers == {AUDIT_KEY.public.key_id: 4, AGENT_KEY.public.key_id: 4}
    assert result.summary().startswith("OK: 8 records of desk.example.com/audit/team-7")


def test_truncated_records_under_the_original_checkpoint_are_detected(exported: Exported) -> None:
    lines = exported.lines()
    result = verify(b"".join(lines[:-3] + lines[-1:]))
    assert_invalid(result, 6, "covers 8 records but the bundle has 6")


def test_file_cut_short_is_detected(exported: Exported) -> None:
    lines = exported.lines()
    assert_invalid(verify(b"".join(lines[:6])), 5, "ends without a checkpoint")
    assert_invalid(verify(exported.bundle[:-10]), 8, "cut short")


def test_rollback_to_an_older_export_is_detected_with_the_newer_checkpoint() -> None:
    log = new_log()
    trio.run(typical_history, log, 2)
    old_bundle = export_bundle(log)
    trio.run(typical_history, log, 2)
    newer_note = export_bundle(log).splitlines()[-1]
    newer = json.loads(newer_note)["checkpoint"].encode()
    later, _ = open_checkpoint(newer, PINNED)
    result = verify(old_bundle, previous_checkpoints=[later])
    assert_invalid(result, None, "rollback")


def test_rollback_inside_a_bundle_with_an_earlier_larger_checkpoint_is_detected() -> None:
    log = new_log()
    trio.run(typical_history, log, 2)
    small = export_bundle(log)
    trio.run(typical_history, log, 2)
    large_note = json.loads(export_bundle(log).splitlines()[-1])["checkpoint"]
    lines = small.splitlines(keepends=True)
    trailer = json.loads(lines[-1])
    trailer["previous_checkpoint"] = large_note
    forged = b"".join(lines[:-1]) + rfc8785.dumps(trailer) + b"\n"
    assert_invalid(verify(forged), None, "rollback")


def test_reordered_records_are_detected(exported: Exported) -> None:
    lines = exported.lines()
    lines[3], lines[4] = lines[4], lines[3]
    assert_invalid(verify(b"".join(lines)), 2, "sequence number 3 where 2 was expected")


def test_reordered_and_rechained_records_are_detected_by_the_checkpoint(
    exported: Exported,
) -> None:
    records = records_of(exported)
    records[3], records[4] = records[4], records[3]
    assert_invalid(verify(assemble(exported, rechain(records))), None, "Merkle root differs")


def test_duplicated_record_is_detected(exported: Exported) -> None:
    lines = exported.lines()
    lines.insert(3, lines[2])
    assert_invalid(verify(b"".join(lines)), 2, "record 1 appears twice (lines 3 and 4)")


def test_a_record_repeated_later_names_where_it_first_was(exported: Exported) -> None:
    lines = exported.lines()
    lines.insert(4, lines[1])  # record 0 again, after record 2
    result = verify(b"".join(lines))
    assert_invalid(result, 3, "where 3 was expected: record 0 is already on line 2")
    assert result.bad_line == 5


def test_inserted_and_rechained_record_is_detected_by_the_checkpoint(exported: Exported) -> None:
    records = records_of(exported)
    records.insert(5, records[5])
    assert_invalid(verify(assemble(exported, rechain(records))), 8, "covers 8 records")


def test_inserted_record_signed_by_an_unpinned_key_is_detected(exported: Exported) -> None:
    records = records_of(exported)
    event = AuditEvent(
        occurred_at=START,
        team_id="team-7",
        actor=OPERATOR,
        action=Action.POLICY_SET,
        signer=OTHER_KEY.public.key_id,
    )
    forged = AuditRecord(0, START, GENESIS_HASH, sign_event(OTHER_KEY, event))
    records.insert(3, forged)
    assert_invalid(verify(assemble(exported, rechain(records))), 3, "neither pinned")


def test_deleted_record_is_detected(exported: Exported) -> None:
    lines = exported.lines()
    del lines[4]
    assert_invalid(verify(b"".join(lines)), 3, "sequence number 4 where 3 was expected")


def test_deleted_and_rechained_record_is_detected_by_the_checkpoint(exported: Exported) -> None:
    records = records_of(exported)
    del records[4]
    assert_invalid(verify(assemble(exported, rechain(records))), 7, "covers 8 records")


def test_edited_signed_field_is_detected_at_that_record(exported: Exported) -> None:
    lines = exported.lines()
    value = json.loads(lines[5])
    value["event"]["context"]["command"] = "echo innocent"
    lines[5] = rfc8785.dumps(value) + b"\n"
    assert_invalid(verify(b"".join(lines)), 4, "signature does not verify")


def test_edited_log_time_is_detected_by_the_next_records_hash(exported: Exported) -> None:
    lines = exported.lines()
    value = json.loads(lines[3])
    value["time"] = value["time"].replace("10:00:00", "10:00:00")[:-2] + "9Z"
    lines[3] = rfc8785.dumps(value) + b"\n"
    assert_invalid(verify(b"".join(lines)), 3, "previous-record hash does not match")


def test_edited_last_record_is_detected_by_the_checkpoint(exported: Exported) -> None:
    lines = exported.lines()
    value = json.loads(lines[-2])
    value["time"] = value["time"][:-2] + "9Z"
    lines[-2] = rfc8785.dumps(value) + b"\n"
    assert_invalid(verify(b"".join(lines)), None, "Merkle root differs")


def test_forged_signature_bytes_are_detected(exported: Exported) -> None:
    lines = exported.lines()
    value = json.loads(lines[2])
    value["signature"] = "A" * 85 + "A"
    lines[2] = rfc8785.dumps(value) + b"\n"
    assert_invalid(verify(b"".join(lines)), 1, "does not verify")


def test_record_re_signed_by_an_unpinned_key_is_detected(exported: Exported) -> None:
    records = records_of(exported)
    event = records[1].event
    forged_event = dataclasses.replace(event, signer=OTHER_KEY.public.key_id)
    records[1] = AuditRecord(
        1, records[1].time, records[1].prev_hash, sign_event(OTHER_KEY, forged_event)
    )
    assert_invalid(verify(assemble(exported, rechain(records))), 1, "neither pinned")


def test_checkpoint_signed_by_an_unpinned_key_is_detected(exported: Exported) -> None:
    lines = exported.lines()
    trailer = json.loads(lines[-1])
    checkpoint, _ = open_checkpoint(trailer["checkpoint"].encode(), PINNED)
    trailer["checkpoint"] = sign_checkpoint(checkpoint, OTHER_KEY).decode()
    lines[-1] = rfc8785.dumps(trailer) + b"\n"
    assert_invalid(verify(b"".join(lines)), None, "no signature by a pinned key")


def test_pinning_only_the_wrong_key_is_reported_as_a_wrong_key(exported: Exported) -> None:
    result = verify_bundle(io.BytesIO(exported.bundle), [OTHER_KEY.public])
    assert result.verdict is Verdict.WRONG_KEY and result.exit_code == 3
    assert result.bundle_signer == f"audit key {AUDIT_KEY.public.fingerprint}"
    summary = result.summary({OTHER_KEY.public.key_id: "other.pub"})
    assert summary.startswith("WRONG KEY: no pinned key signed this bundle")
    assert f"{OTHER_KEY.public.fingerprint} (other.pub)" in summary
    assert result.to_json()["code"] == "wrong_key"


def test_wrong_key_is_recognised_in_a_bundle_read_from_a_pipe(exported: Exported) -> None:
    class Pipe(io.BytesIO):
        def seekable(self) -> bool:
            return False

    result = verify_bundle(Pipe(exported.bundle), [OTHER_KEY.public])
    assert result.verdict is Verdict.WRONG_KEY
    assert result.bundle_signer == f"audit key {AUDIT_KEY.public.fingerprint}"


def _record_zero_resigned_by_an_attacker() -> bytes:
    """A genuine bundle whose record 0 alone is replaced by one the attacker signed, with the
    attacker's trailer (naming the attacker's key as the audit key) at the end."""
    genuine, forged = new_log(), new_log(key=OTHER_KEY)
    trio.run(typical_history, genuine, 3)
    trio.run(typical_history, forged, 3)
    g = export_bundle(genuine).splitlines(keepends=True)
    f = export_bundle(forged).splitlines(keepends=True)
    return b"".join([g[0], f[1], *g[2:-1], f[-1]])


@pytest.mark.parametrize("seekable", [True, False])
def test_a_resigned_first_record_is_invalid_not_a_wrong_key(seekable: bool) -> None:
    # The other records verify under the pinned key: this is tampering, not a wrong --key.
    class Pipe(io.BytesIO):
        def seekable(self) -> bool:
            return seekable

    result = verify_bundle(Pipe(_record_zero_resigned_by_an_attacker()), PINNED)
    assert result.verdict is Verdict.INVALID and result.exit_code == 1, result.summary()
    assert result.bad_seq == 0 and "neither pinned nor introduced" in (result.reason or "")


def test_a_genuine_checkpoint_alone_makes_a_foreign_first_record_invalid() -> None:
    genuine, forged = new_log(), new_log(key=OTHER_KEY)
    trio.run(typical_history, genuine, 1)
    trio.run(typical_history, forged, 1)
    g = export_bundle(genuine).splitlines(keepends=True)
    f = export_bundle(forged).splitlines(keepends=True)
    trailer = json.loads(f[-1])  # the attacker's key list, but the genuine checkpoint
    trailer["checkpoint"] = json.loads(g[-1])["checkpoint"]
    bundle = b"".join([g[0], *f[1:-1], rfc8785.dumps(trailer) + b"\n"])
    result = verify(bundle)
    assert result.verdict is Verdict.INVALID, result.summary()


def test_wrong_key_on_an_empty_log_is_reported_as_a_wrong_key() -> None:
    result = verify_bundle(io.BytesIO(export_bundle(new_log())), [OTHER_KEY.public])
    assert result.verdict is Verdict.WRONG_KEY, result.summary()


def test_record_zero_signed_by_a_key_the_bundle_does_not_vouch_for_is_invalid(
    exported: Exported,
) -> None:
    # A forger's own key is named nowhere as the bundle's audit key: tampering, not a wrong key.
    lines = exported.lines()
    record = json.loads(lines[1])
    event = AuditEvent.from_json(record["event"])
    forged = sign_event(OTHER_KEY, dataclasses.replace(event, signer=OTHER_KEY.public.key_id))
    record.update(forged.to_json())
    lines[1] = rfc8785.dumps(record) + b"\n"
    assert_invalid(verify(b"".join(lines)), 0, "neither pinned")


def test_agent_record_without_an_earlier_registration_is_refused() -> None:
    log = new_log()

    async def run() -> None:
        await log.append_agent_event(agent_event(), AGENT_ID, AGENT_KEY.public)
        await register_agent(log)

    trio.run(run)
    assert_invalid(verify(export_bundle(log)), 0, "neither pinned nor introduced")


def test_agent_key_cannot_sign_as_another_agent() -> None:
    log = new_log()

    async def run() -> None:
        await register_agent(log)
        await log.append_agent_event(agent_event(agent_id="agent-2"), "agent-2", AGENT_KEY.public)

    trio.run(run)
    assert_invalid(verify(export_bundle(log)), 1, "may only sign as agent agent-1")


def test_agent_registered_by_an_agent_key_introduces_nothing() -> None:
    other_agent = OTHER_KEY
    log = new_log()

    async def run() -> None:
        await register_agent(log)
        await log.append_agent_event(
            agent_event(Action.AGENT_CONNECTED), AGENT_ID, AGENT_KEY.public
        )
        await log.append_agent_event(
            agent_event(key=other_agent, agent_id="agent-2"), "agent-2", other_agent.public
        )

    trio.run(run)
    assert_invalid(verify(export_bundle(log)), 2, "neither pinned nor introduced")


def bundle_from_records(records: list[AuditRecord]) -> bytes:
    """A bundle whose checkpoint the audit key honestly signed over arbitrary records."""
    store = MemoryAuditStore()
    log = AuditLog(store, AUDIT_KEY, "desk.example.com", "team-7")

    async def run() -> None:
        for record in records:
            await store.append(
                "team-7",
                StoredRecord(
                    record.seq,
                    format_time(record.time),
                    record.record_hash,
                    record.leaf_hash,
                    record.canonical,
                ),
            )

    trio.run(run)
    return export_bundle(log)


def chain(events: list[tuple[AuditEvent, int]]) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    previous = GENESIS_HASH
    for seq, (event, offset) in enumerate(events):
        record = AuditRecord(
            seq, START + timedelta(seconds=offset), previous, sign_event(AUDIT_KEY, event)
        )
        previous = record.record_hash
        records.append(record)
    return records


def audit_event(**changes: object) -> AuditEvent:
    fields: dict[str, object] = {
        "occurred_at": START,
        "team_id": "team-7",
        "actor": OPERATOR,
        "action": Action.SESSION_COMMAND,
        "signer": AUDIT_KEY.public.key_id,
    }
    fields.update(changes)
    return AuditEvent(**fields)  # type: ignore[arg-type]


def test_log_time_going_backwards_is_detected() -> None:
    records = chain([(audit_event(), 5), (audit_event(), 6), (audit_event(), 4)])
    assert_invalid(verify(bundle_from_records(records)), 2, "log time goes backwards")


def test_record_from_another_team_is_detected() -> None:
    records = chain([(audit_event(), 1), (audit_event(team_id="team-8"), 2)])
    assert_invalid(verify(bundle_from_records(records)), 1, "belongs to team 'team-8'")


def test_event_dated_long_after_its_log_time_is_detected() -> None:
    late = audit_event(occurred_at=START + timedelta(hours=1))
    records = chain([(audit_event(), 1), (late, 2)])
    assert_invalid(verify(bundle_from_records(records)), 1, "dated after the log received it")


def test_unknown_action_in_a_bundle_is_detected(exported: Exported) -> None:
    lines = exported.lines()
    lines[2] = lines[2].replace(b'"action":"session.decision"', b'"action":"session.teleport"')
    assert_invalid(verify(b"".join(lines)), 1, "unknown action")


def test_non_canonical_record_encoding_is_detected(exported: Exported) -> None:
    lines = exported.lines()
    lines[2] = json.dumps(json.loads(lines[2])).encode() + b"\n"
    assert_invalid(verify(b"".join(lines)), 1, "canonical")


def test_data_after_the_checkpoint_is_detected(exported: Exported) -> None:
    assert_invalid(verify(exported.bundle + exported.lines()[1]), None, "after the checkpoint")


def test_bundle_carrying_an_earlier_checkpoint_and_proof_verifies() -> None:
    exported = typical_bundle(commands=3, with_previous=True)
    result = verify(exported.bundle)
    assert result.ok, result.summary()
    assert result.previous_sizes == (6,)
    assert "consistent with checkpoint at 6" in result.summary()


def test_tampered_consistency_proof_is_detected() -> None:
    lines = typical_bundle(commands=3, with_previous=True).lines()
    trailer = json.loads(lines[-1])
    trailer["consistency_proof"][0] = "00" * 32
    lines[-1] = rfc8785.dumps(trailer) + b"\n"
    assert_invalid(verify(b"".join(lines)), None, "consistency proof does not match")


def test_earlier_checkpoint_kept_by_the_auditor_is_checked_against_the_records(
    exported: Exported,
) -> None:
    earlier, _ = open_checkpoint(exported.checkpoints[0], PINNED)
    result = verify(exported.bundle, previous_checkpoints=[earlier])
    assert result.ok and result.previous_sizes == (earlier.size,), result.summary()


def test_rewritten_history_under_a_fresh_checkpoint_fails_the_auditors_checkpoint(
    exported: Exported,
) -> None:
    earlier, _ = open_checkpoint(exported.checkpoints[0], PINNED)
    records = records_of(exported)
    records[1], records[2] = records[2], records[1]
    rewritten = bundle_from_records([AuditRecord.from_line(line) for line in rechain(records)])
    assert verify(rewritten).ok
    result = verify(rewritten, previous_checkpoints=[earlier])
    assert_invalid(result, None, "history was rewritten")


def test_auditors_checkpoint_of_another_log_is_a_usage_problem_not_tampering(
    exported: Exported,
) -> None:
    other = Checkpoint("desk.example.com/audit/team-9", 1, bytes(32))
    result = verify(exported.bundle, previous_checkpoints=[other])
    assert result.verdict is Verdict.UNREADABLE and result.exit_code == 2, result.summary()
    assert "this checkpoint is of another log: desk.example.com/audit/team-9" in (
        result.reason or ""
    )


@pytest.mark.parametrize(
    "bundle",
    [b"", b"\x00\xff garbage", b"[1, 2, 3]\n", b'{"format":"something-else"}\n', b"x" * 300_000],
)
def test_input_that_is_not_a_bundle_is_unreadable(bundle: bytes) -> None:
    result = verify(bundle)
    assert result.verdict is Verdict.UNREADABLE and result.exit_code == 2, result.summary()


def test_missing_bundle_file_is_unreadable(tmp_path: object) -> None:
    result = verify_bundle("/nonexistent/bundle.jsonl", PINNED)
    assert result.verdict is Verdict.UNREADABLE and "cannot read bundle" in (result.reason or "")


@pytest.mark.parametrize(
    "line",
    [
        b"\xff\xfe\n",
        b"not json\n",
        b"{}\n",
        b"[]\n",
        b'{"checkpoint": 1}\n',
        b"1e999\n",
        b"[" * 200_000 + b"\n",
        b"x" * 300_000,
    ],
)
def test_garbage_after_a_good_header_is_invalid_not_a_crash(
    exported: Exported, line: bytes
) -> None:
    lines = exported.lines()
    result = verify(lines[0] + lines[1] + line + lines[-1])
    assert result.verdict is Verdict.INVALID and result.bad_line == 3, result.summary()


def test_frontier_matches_checkpoint_root(exported: Exported) -> None:
    trailer = json.loads(exported.lines()[-1])
    checkpoint, _ = open_checkpoint(trailer["checkpoint"].encode(), PINNED)
    frontier = MerkleFrontier(record.leaf_hash for record in records_of(exported))
    assert checkpoint.root_hash == frontier.root() and checkpoint.size == frontier.size


def test_export_of_an_empty_log_verifies_as_zero_records() -> None:
    result = verify(export_bundle(new_log()))
    assert result.ok and result.record_count == 0, result.summary()


def test_bundle_with_a_second_pinned_key_from_a_rotation_still_verifies(exported: Exported) -> None:
    result = verify_bundle(io.BytesIO(exported.bundle), [OTHER_KEY.public, AUDIT_KEY.public])
    assert result.ok, result.summary()


def test_lone_surrogates_in_header_or_trailer_are_refused_not_crashed_on(
    exported: Exported,
) -> None:
    lines = exported.lines()
    header = b'{"format":"tucdesk-audit-bundle-v1","origin":"\\ud800","team_id":"t"}\n'
    assert verify(header + b"".join(lines[1:])).verdict is Verdict.UNREADABLE
    trailer = (
        b'{"checkpoint":"\\ud800","consistency_proof":[],"keys":[],"previous_checkpoint":null}\n'
    )
    assert_invalid(verify(lines[0] + trailer), None, "no UTF-8 encoding")


# ---- where a damaged bundle is reported ------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "what"), [(b"\n", "a blank line"), (b'{"seq":1}\n', "another line")]
)
def test_a_line_after_the_checkpoint_is_reported_on_its_own_line(
    extra: bytes, what: str, exported: Exported
) -> None:
    lines = exported.lines()
    result = verify(exported.bundle + extra)
    assert_invalid(result, None, f"{what} after the checkpoint")
    assert result.bad_line == len(lines) + 1


def test_a_missing_final_newline_names_the_checkpoint_line(exported: Exported) -> None:
    result = verify(exported.bundle[:-1])
    assert_invalid(result, None, "the checkpoint line does not end with a newline")
    assert result.bad_line == len(exported.lines())
    assert "record" not in result.summary()


def test_crlf_line_endings_are_named(exported: Exported) -> None:
    result = verify(exported.bundle.replace(b"\n", b"\r\n"))
    # A transformed file is not the bundle exported: INVALID (exit 1), as audit/README says.
    assert_invalid(result, None, "CRLF (Windows) line endings")
    assert result.bad_line == 1
    lines = exported.lines()
    lines[2] = lines[2][:-1] + b"\r\n"
    assert_invalid(verify(b"".join(lines)), 1, "the line ends with CRLF")


def test_a_byte_order_mark_is_named(exported: Exported) -> None:
    result = verify(b"\xef\xbb\xbf" + exported.bundle)
    assert_invalid(result, None, "byte-order mark")
    assert result.bad_line == 1 and result.exit_code == 1
