"""An export across an audit key rotation verifies with the originally pinned key only: the
verifier follows ``service_key.rotated`` records signed by the key they retire, and nothing else
introduces an audit key."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import trio

from audit.actions import Action
from audit.main import main as audit_main
from audit.store import MemoryAuditStore
from audit.trust import service_key_rotation_context
from audit.verify import Verdict, VerificationResult, verify_bundle
from protocol.identity import SigningIdentity
from tests.audit.builders import (
    AUDIT_KEY,
    OPERATOR,
    OTHER_KEY,
    SERVICE,
    StepClock,
    export_bundle,
    new_log,
    register_agent,
    typical_history,
)

NEW_KEY = SigningIdentity.from_seed(bytes([7]) * 32)
ROTATION_TARGET = "service-key:audit-signer"


def _bundle(
    *,
    rotation_signer: SigningIdentity = AUDIT_KEY,
    purpose: str = "audit-signer",
    retired: SigningIdentity = AUDIT_KEY,
    with_rotation: bool = True,
) -> bytes:
    """Records by AUDIT_KEY, a rotation record, then records and the checkpoint by NEW_KEY."""
    store = MemoryAuditStore()
    clock = StepClock()
    before = new_log(store, clock, key=AUDIT_KEY)
    rotating = new_log(store, clock, key=rotation_signer)
    after = new_log(store, clock, key=NEW_KEY)

    async def run() -> None:
        await typical_history(before, commands=2)
        if with_rotation:
            await rotating.append(
                Action.SERVICE_KEY_ROTATED,
                SERVICE,
                target=ROTATION_TARGET,
                context=service_key_rotation_context(purpose, retired.public, NEW_KEY.public),
            )
        await after.append(Action.POLICY_SET, OPERATOR, context={"version": 2})
        await register_agent(after, key=OTHER_KEY, agent_id="agent-2")

    trio.run(run)
    return export_bundle(after)


def _verify(bundle: bytes) -> VerificationResult:
    return verify_bundle(io.BytesIO(bundle), [AUDIT_KEY.public])


def test_an_export_across_an_audit_key_rotation_verifies_with_the_old_key_only() -> None:
    result = _verify(_bundle())
    assert result.ok, result.summary()
    [rotation] = result.key_rotations
    assert (rotation.old_key, rotation.new_key) == (AUDIT_KEY.public, NEW_KEY.public)
    assert result.checkpoint_signer == NEW_KEY.public
    summary = result.summary()
    assert f"from {AUDIT_KEY.public.fingerprint} to {NEW_KEY.public.fingerprint}" in summary
    assert result.to_json()["key_rotations"] == [rotation.to_json()]


def test_records_by_a_key_no_rotation_introduced_are_refused() -> None:
    result = _verify(_bundle(with_rotation=False))
    assert result.verdict is Verdict.INVALID
    assert "unknown" in (result.reason or "").lower() or NEW_KEY.public.key_id in (
        result.reason or ""
    )


def test_a_rotation_record_signed_by_another_key_is_refused() -> None:
    # A forger who names the pinned key as the one retired still cannot sign as it.
    result = _verify(_bundle(rotation_signer=OTHER_KEY))
    assert result.verdict is Verdict.INVALID
    assert result.bad_seq is not None


def test_a_rotation_record_must_be_signed_by_the_key_it_retires() -> None:
    # Signed by the pinned key, but claiming to retire another key: refused, not followed.
    result = _verify(_bundle(retired=OTHER_KEY))
    assert result.verdict is Verdict.INVALID
    assert "signed by the key it retires" in (result.reason or "")


def test_a_rotation_of_another_purpose_introduces_no_audit_key() -> None:
    result = _verify(_bundle(purpose="jwt-issuer"))
    assert result.verdict is Verdict.INVALID


def test_a_rotation_record_whose_new_key_was_edited_is_refused() -> None:
    lines = _bundle().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if ROTATION_TARGET.encode() in line)
    record = json.loads(lines[index])
    record["event"]["context"]["new_fingerprint"] = OTHER_KEY.public.fingerprint
    lines[index] = json.dumps(record, separators=(",", ":"), sort_keys=True).encode() + b"\n"
    assert _verify(b"".join(lines)).verdict is Verdict.INVALID


def test_the_verify_command_names_both_fingerprints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle, key = tmp_path / "bundle.jsonl", tmp_path / "audit.pem"
    bundle.write_bytes(_bundle())
    key.write_bytes(AUDIT_KEY.public.to_pem())
    assert audit_main(["verify", str(bundle), "--key", str(key)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("OK:")
    assert AUDIT_KEY.public.fingerprint in out and NEW_KEY.public.fingerprint in out
    assert "rotated" in out
