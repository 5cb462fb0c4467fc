"""Property tests: any append sequence exports a bundle that verifies; any byte change breaks it."""

from __future__ import annotations

import dataclasses
import io
import json
from typing import cast

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit.actions import ActorKind
from audit.checkpoint import open_checkpoint
from audit.merkle import verify_consistency
from audit.record import Actor, AuditEvent, sign_event
from audit.trust import AGENT_SELF_SIGNED_ACTIONS
from audit.verify import Verdict, verify_bundle
from protocol.identity import SigningIdentity
from tests.audit.builders import (
    AUDIT_KEY,
    START,
    TEAM,
    StepClock,
    export_bundle,
    new_log,
    register_agent,
    typical_bundle,
)
from tests.audit.strategies import events

PINNED = [AUDIT_KEY.public]
AGENT_KEYS = [SigningIdentity.from_seed(bytes([10 + index]) * 32) for index in range(3)]


def _audit_key_may_sign(event: AuditEvent) -> bool:
    """Whether a verifier accepts ``event`` signed by the audit key: only an agent's own key
    signs what it ran (session.started/command/ended with an agent actor)."""
    return not (event.actor.kind is ActorKind.AGENT and event.action in AGENT_SELF_SIGNED_ACTIONS)


operations = st.lists(
    st.one_of(
        st.tuples(
            st.just("audit"), events(AUDIT_KEY.public.key_id, TEAM).filter(_audit_key_may_sign)
        ),
        st.tuples(st.just("agent"), st.tuples(st.integers(0, 2), events("placeholder", TEAM))),
        st.tuples(st.just("checkpoint"), st.none()),
    ),
    max_size=12,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations, st.booleans())
def test_any_append_sequence_exports_a_bundle_that_verifies(
    steps: list[tuple[str, object]], carry_previous: bool
) -> None:
    log = new_log(clock=StepClock())
    checkpoints: list[bytes] = []
    appended = 0

    async def run() -> None:
        nonlocal appended
        registered: set[int] = set()
        held: set[bytes] = set()
        for kind, payload in steps:
            if kind == "audit":
                event = payload
                assert isinstance(event, AuditEvent)
                await log.append(
                    event.action,
                    event.actor,
                    target=event.target,
                    session_id=event.session_id,
                    policy_result=event.policy_result,
                    context=event.context,
                )
                appended += 1
            elif kind == "agent":
                assert isinstance(payload, tuple)
                index, template = cast(tuple[int, AuditEvent], payload)
                key, agent_id = AGENT_KEYS[index], f"agent-{index}"
                if index not in registered:
                    await register_agent(log, key, agent_id)
                    registered.add(index)
                    appended += 1
                event = dataclasses.replace(
                    template,
                    signer=key.public.key_id,
                    actor=Actor(ActorKind.AGENT, agent_id, "host"),
                    occurred_at=START,  # never in the log's future
                )
                result = await log.append_agent_event(sign_event(key, event), agent_id, key.public)
                assert result.record.event == event
                # Two steps may draw the same event: the log holds it once, and says so.
                assert result.already_held == (event.digest in held)
                if event.digest not in held:
                    held.add(event.digest)
                    appended += 1
            else:
                checkpoints.append((await log.checkpoint()).note)

    trio.run(run)
    final = trio.run(log.checkpoint).checkpoint
    for note in checkpoints:
        earlier, _ = open_checkpoint(note, PINNED)
        proof = trio.run(log.consistency_proof, earlier.size, final.size)
        verify_consistency(earlier.size, final.size, earlier.root_hash, final.root_hash, proof)
    previous = checkpoints[0] if carry_previous and checkpoints else None
    result = verify_bundle(io.BytesIO(export_bundle(log, previous)), PINNED)
    assert result.ok, result.summary()
    assert result.record_count == appended
    if previous is not None:
        assert len(result.previous_sizes) == 1


TAMPER_TARGET = typical_bundle(commands=2, with_previous=True).bundle


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_any_single_byte_change_anywhere_in_a_bundle_fails_verification(
    data: st.DataObject,
) -> None:
    position = data.draw(st.integers(0, len(TAMPER_TARGET) - 1), label="position")
    original = TAMPER_TARGET[position]
    replacement = data.draw(st.integers(0, 255).filter(lambda byte: byte != original))
    changed = TAMPER_TARGET[:position] + bytes([replacement]) + TAMPER_TARGET[position + 1 :]
    result = verify_bundle(io.BytesIO(changed), PINNED)
    assert result.verdict in (Verdict.INVALID, Verdict.UNREADABLE), (position, result.summary())


def test_the_tamper_target_itself_verifies() -> None:
    result = verify_bundle(io.BytesIO(TAMPER_TARGET), PINNED)
    assert result.ok and result.previous_sizes, result.summary()


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_cutting_a_bundle_anywhere_fails_verification(data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(TAMPER_TARGET) - 1))
    result = verify_bundle(io.BytesIO(TAMPER_TARGET[:cut]), PINNED)
    assert not result.ok


def test_flipping_the_low_bit_of_every_byte_of_a_bundle_fails_verification() -> None:
    for position in range(len(TAMPER_TARGET)):
        changed = bytearray(TAMPER_TARGET)
        changed[position] ^= 0x01
        result = verify_bundle(io.BytesIO(bytes(changed)), PINNED)
        assert not result.ok, position


FIELD_NAMES = [
    "checkpoint",
    "consistency_proof",
    "keys",
    "previous_checkpoint",
    "event",
    "seq",
    "time",
    "prev_hash",
    "signature",
    "context",
    "actor",
    "format",
    "origin",
    "team_id",
]
awkward_text = st.text(st.characters(categories=["Cs", "Lu", "Nd", "Po", "Cc"]), max_size=6)
awkward_json = st.recursive(
    st.none() | st.booleans() | st.integers() | awkward_text,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(FIELD_NAMES) | awkward_text, children, max_size=5)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(awkward_json, min_size=1, max_size=3), st.booleans())
def test_verifier_answers_any_json_lines_with_a_verdict_never_an_exception(
    values: list[object], keep_header: bool
) -> None:
    header = TAMPER_TARGET.splitlines(keepends=True)[0] if keep_header else b""
    body = b"".join(json.dumps(value).encode() + b"\n" for value in values)
    result = verify_bundle(io.BytesIO(header + body), PINNED)
    assert result.verdict in (Verdict.INVALID, Verdict.UNREADABLE)
