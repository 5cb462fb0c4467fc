"""Record encoding, signing and strict parsing."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.actions import Action, ActorKind
from audit.errors import RecordError
from audit.record import (
    GENESIS_HASH,
    MAX_CONTEXT_BYTES,
    MAX_CONTEXT_DEPTH,
    MAX_ID_LENGTH,
    Actor,
    AuditEvent,
    AuditRecord,
    SignedEvent,
    format_time,
    parse_time,
    sign_event,
)
from tests.audit.builders import AGENT_KEY, AUDIT_KEY, OPERATOR, START, TEAM
from tests.audit.strategies import events, moments

AUDIT_KEY_ID = AUDIT_KEY.public.key_id


def event(**changes: object) -> AuditEvent:
    fields: dict[str, object] = {
        "occurred_at": START,
        "team_id": TEAM,
        "actor": OPERATOR,
        "action": Action.SESSION_COMMAND,
        "signer": AUDIT_KEY_ID,
        "session_id": "s-1",
        "context": {"command": "ls", "exit_code": 0},
    }
    fields.update(changes)
    return AuditEvent(**fields)  # type: ignore[arg-type]


def record(seq: int = 0, **changes: object) -> AuditRecord:
    return AuditRecord(seq, START, GENESIS_HASH, sign_event(AUDIT_KEY, event(**changes)))


@settings(max_examples=150, deadline=None)
@given(events(AUDIT_KEY_ID), st.integers(0, 2**40), moments)
def test_record_line_is_rfc8785_and_parses_back_to_the_same_record(
    audit_event: AuditEvent, seq: int, time: datetime
) -> None:
    original = AuditRecord(seq, time, GENESIS_HASH, sign_event(AUDIT_KEY, audit_event))
    assert original.canonical == rfc8785.dumps(original.to_json())
    assert audit_event.canonical == rfc8785.dumps(audit_event.to_json())
    parsed = AuditRecord.from_line(original.canonical)
    assert parsed == original
    assert parsed.canonical == original.canonical
    parsed.signed.verify(AUDIT_KEY.public)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_record_parser_refuses_garbage_with_record_error_only(data: bytes) -> None:
    with pytest.raises(RecordError):
        AuditRecord.from_line(data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_byte_change_outside_seq_time_and_prev_hash_breaks_parse_or_signature(
    data: st.DataObject,
) -> None:
    original = record(context={"command": "rm -rf /tmp/x", "exit_code": 1})
    line = original.canonical
    position = data.draw(st.integers(0, len(line) - 1))
    replacement = data.draw(st.integers(0, 255).filter(lambda byte: byte != line[position]))
    changed = line[:position] + bytes([replacement]) + line[position + 1 :]
    try:
        parsed = AuditRecord.from_line(changed)
        parsed.signed.verify(AUDIT_KEY.public)
    except RecordError:
        return
    # Whatever survived must be a change to the fields the hash chain protects instead.
    assert parsed.signed == original.signed
    assert (parsed.seq, parsed.time, parsed.prev_hash) != (
        original.seq,
        original.time,
        original.prev_hash,
    )


def test_signed_event_transport_form_round_trips_and_verifies() -> None:
    signed = sign_event(AGENT_KEY, event(signer=AGENT_KEY.public.key_id))
    parsed = SignedEvent.from_json(json.loads(json.dumps(signed.to_json())))
    assert parsed == signed
    parsed.verify(AGENT_KEY.public)


def test_event_signed_by_one_key_does_not_verify_under_another() -> None:
    signed = sign_event(AGENT_KEY, event(signer=AGENT_KEY.public.key_id))
    with pytest.raises(RecordError):
        signed.verify(AUDIT_KEY.public)
    forged = SignedEvent(event(signer=AUDIT_KEY_ID), signed.signature)
    with pytest.raises(RecordError, match="does not verify"):
        forged.verify(AUDIT_KEY.public)


def test_signing_with_a_key_other_than_the_named_signer_is_refused() -> None:
    with pytest.raises(RecordError, match="signer"):
        sign_event(AGENT_KEY, event())


def test_unknown_action_is_refused() -> None:
    with pytest.raises(RecordError, match="unknown action"):
        event(action="session.teleported")


def test_unknown_actor_kind_is_refused() -> None:
    with pytest.raises(RecordError, match="unknown actor kind"):
        Actor("robot", "r-1")  # type: ignore[arg-type]


def test_oversized_context_is_refused() -> None:
    with pytest.raises(RecordError, match="larger than"):
        event(context={"command": "x" * MAX_CONTEXT_BYTES})


def test_deeply_nested_context_is_refused() -> None:
    nested: object = "leaf"
    for _ in range(MAX_CONTEXT_DEPTH + 1):
        nested = [nested]
    with pytest.raises(RecordError, match="deeper"):
        event(context={"n": nested})


@pytest.mark.parametrize("value", [1.5, 2**53, float("nan"), b"bytes", object()])
def test_context_values_outside_the_json_subset_are_refused(value: object) -> None:
    with pytest.raises(RecordError):
        event(context={"v": value})


def test_overlong_identifiers_are_refused() -> None:
    with pytest.raises(RecordError, match="longer"):
        event(session_id="s" * (MAX_ID_LENGTH + 1))
    with pytest.raises(RecordError, match="empty"):
        Actor(ActorKind.OPERATOR, "")


def test_naive_times_are_refused() -> None:
    with pytest.raises(RecordError, match="timezone"):
        event(occurred_at=datetime(2026, 11, 26, 10, 0))


def test_times_are_written_in_utc_with_microseconds() -> None:
    moment = datetime(2026, 11, 26, 12, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))
    assert format_time(moment) == "2026-11-26T10:00:00.000005Z"
    assert parse_time("2026-11-26T10:00:00.000005Z") == moment.astimezone(UTC)


@pytest.mark.parametrize(
    "text",
    [
        "2026-11-26T10:00:00Z",
        "2026-11-26T10:00:00.000000+00:00",
        "2026-11-26 10:00:00.000000Z",
        "2026-02-30T10:00:00.000000Z",
        "2026-11-26T10:00:00.0000000Z",
    ],
)
def test_other_time_forms_are_refused(text: str) -> None:
    with pytest.raises(RecordError):
        parse_time(text)


def mutate(line: bytes, change: str) -> bytes:
    value = json.loads(line)
    if change == "whitespace":
        return json.dumps(value).encode()
    if change == "float":
        return line.replace(b'"exit_code":0', b'"exit_code":0.0')
    if change == "unknown field":
        value["extra"] = 1
    if change == "missing field":
        del value["event"]["target"]
    if change == "duplicate key":
        return line.replace(b'{"event":', b'{"seq":0,"event":')
    if change == "bad prev_hash":
        value["prev_hash"] = "00"
    if change == "bool seq":
        return line.replace(b'"seq":0', b'"seq":false')
    if change == "padded signature":
        value["signature"] += "="
    if change == "version":
        value["event"]["version"] = 2
    return rfc8785.dumps(value)


@pytest.mark.parametrize(
    "change",
    [
        "whitespace",
        "float",
        "unknown field",
        "missing field",
        "duplicate key",
        "bad prev_hash",
        "bool seq",
        "padded signature",
        "version",
    ],
)
def test_malformed_record_lines_are_refused(change: str) -> None:
    line = record().canonical
    with pytest.raises(RecordError):
        AuditRecord.from_line(mutate(line, change))
