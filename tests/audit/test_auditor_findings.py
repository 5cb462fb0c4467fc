"""What an outside audit of the verifier found, pinned: checkpoints kept across an audit key
rotation, the current key pinned instead of the first, a forged agent re-registration, what an
OK does not prove, and exit codes for transformed files and another log's checkpoint. Real
keys, real logs, real bundles."""

from __future__ import annotations

import hashlib
import io
import json
from datetime import timedelta
from pathlib import Path

import pytest
import rfc8785
import trio

from audit.actions import Action
from audit.checkpoint import open_checkpoint, sign_checkpoint
from audit.log import AuditLog
from audit.main import main
from audit.store import MemoryAuditStore
from audit.trust import (
    MAX_LISTED_AFTER_REMOVAL,
    agent_registration_context,
    service_key_rotation_context,
)
from audit.verify import Verdict, VerificationResult, verify_bundle
from protocol.identity import SigningIdentity
from tests.audit.builders import (
    AGENT_ID,
    AGENT_KEY,
    AUDIT_KEY,
    OPERATOR,
    OTHER_KEY,
    SERVICE,
    START,
    StepClock,
    agent_event,
    export_bundle,
    new_log,
    register_agent,
    typical_history,
)

NEW_KEY = SigningIdentity.from_seed(bytes([7]) * 32)
THIRD_KEY = SigningIdentity.from_seed(bytes([8]) * 32)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def pem(tmp_path: Path, name: str, key: SigningIdentity) -> Path:
    path = tmp_path / name
    path.write_bytes(key.public.to_pem())
    return path


class RotatedLog:
    """One team's log: records by AUDIT_KEY, a rotation to NEW_KEY, then records by NEW_KEY."""

    def __init__(self) -> None:
        self.store = MemoryAuditStore()
        self.clock = StepClock()
        self.old = new_log(self.store, self.clock, key=AUDIT_KEY)
        self.new = new_log(self.store, self.clock, key=NEW_KEY)

        async def build() -> None:
            await typical_history(self.old, commands=2)
            await self.old.append(
                Action.SERVICE_KEY_ROTATED,
                SERVICE,
                target="service-key:audit-signer",
                context=service_key_rotation_context(
                    "audit-signer", AUDIT_KEY.public, NEW_KEY.public
                ),
            )
            await self.new.append(Action.POLICY_SET, OPERATOR, context={"version": 2})

        trio.run(build)

    def grow(self) -> None:
        trio.run(lambda: self.new.append(Action.POLICY_SET, OPERATOR, context={"version": 3}))

    def export(self) -> bytes:
        return export_bundle(self.new)


# ---- A. a checkpoint kept after a rotation is signed by the new key ----------------------------


def test_a_checkpoint_saved_after_a_rotation_is_usable_with_the_same_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = RotatedLog()
    key, kept = pem(tmp_path, "audit1.pem", AUDIT_KEY), tmp_path / "cp.txt"
    first = tmp_path / "e1.jsonl"
    first.write_bytes(log.export())
    code, _, err = run(["verify", str(first), "--key", str(key), "--save-checkpoint", str(kept)],
                       capsys)  # fmt: skip
    assert code == 0, err
    _, signer = open_checkpoint(kept.read_bytes(), [AUDIT_KEY.public, NEW_KEY.public])
    assert signer == NEW_KEY.public  # the situation the auditor hit
    size = int(kept.read_bytes().split(b"\n")[1])
    log.grow()
    second = tmp_path / "e2.jsonl"
    second.write_bytes(log.export())
    argv = ["verify", str(second), "--key", str(key), "--previous-checkpoint", str(kept),
            "--save-checkpoint", str(kept)]  # fmt: skip
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert f"consistent with checkpoint at {size}" in out
    assert int(kept.read_bytes().split(b"\n")[1]) == size + 1
    code, out, err = run(argv, capsys)  # later, the very same command line
    assert code == 0, err
    assert f"consistent with checkpoint at {size + 1}" in out


def test_a_kept_checkpoint_signed_by_the_retired_key_is_valid_for_its_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = RotatedLog()
    signed = trio.run(log.old.checkpoint)  # by AUDIT_KEY, over every record so far
    kept = tmp_path / "cp.txt"
    kept.write_bytes(signed.note)
    bundle = tmp_path / "e.jsonl"
    bundle.write_bytes(log.export())
    code, out, err = run(["verify", str(bundle), "--key", str(pem(tmp_path, "k", AUDIT_KEY)),
                          "--previous-checkpoint", str(kept)], capsys)  # fmt: skip
    assert code == 0, err
    assert f"consistent with checkpoint at {signed.checkpoint.size}" in out


def test_a_kept_checkpoint_by_a_key_no_pin_reaches_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = RotatedLog()
    genuine = trio.run(log.new.checkpoint).checkpoint
    kept = tmp_path / "cp.txt"
    kept.write_bytes(sign_checkpoint(genuine, THIRD_KEY))  # the same statement, another signer
    bundle = tmp_path / "e.jsonl"
    bundle.write_bytes(log.export())
    argv = ["verify", str(bundle), "--key", str(pem(tmp_path, "k", AUDIT_KEY)),
            "--previous-checkpoint", str(kept)]  # fmt: skip
    code, out, err = run(argv, capsys)
    assert code == 2 and out == ""
    assert "cp.txt: earlier checkpoint is unusable: the note carries no signature by a " in err
    code, out, err = run([*argv, "--json"], capsys)
    assert code == 2 and json.loads(out)["code"] == "unreadable"


@pytest.mark.parametrize("covers_rotation", [False, True], ids=["before", "with"])
def test_a_kept_checkpoint_by_the_new_key_over_records_before_its_rotation_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], covers_rotation: bool
) -> None:
    # A key cannot have signed a checkpoint over records from before it existed: such a kept
    # checkpoint was forged with it. One that also covers its rotation record may be genuine.
    store, clock = MemoryAuditStore(), StepClock()
    old, new = new_log(store, clock, key=AUDIT_KEY), new_log(store, clock, key=NEW_KEY)

    async def build() -> bytes:
        await typical_history(old, commands=2)
        before = (await old.checkpoint()).checkpoint
        await old.append(
            Action.SERVICE_KEY_ROTATED, SERVICE, target="service-key:audit-signer",
            context=service_key_rotation_context("audit-signer", AUDIT_KEY.public, NEW_KEY.public),
        )  # fmt: skip
        kept = (await new.checkpoint()).checkpoint if covers_rotation else before
        await new.append(Action.POLICY_SET, OPERATOR, context={"version": 2})
        return sign_checkpoint(kept, NEW_KEY)

    note = trio.run(build)
    kept, bundle = tmp_path / "cp.txt", tmp_path / "e.jsonl"
    kept.write_bytes(note)
    bundle.write_bytes(export_bundle(new))
    argv = ["verify", str(bundle), "--key", str(pem(tmp_path, "k", AUDIT_KEY)),
            "--previous-checkpoint", str(kept)]  # fmt: skip
    code, out, err = run(argv, capsys)
    if covers_rotation:
        assert code == 0, err
        return
    assert code == 2 and out == "", out
    assert "cp.txt: earlier checkpoint is unusable: it covers 5 records, all from before " in err
    assert f"introduced its signer {NEW_KEY.public.fingerprint}" in err
    # Pinned directly, the new key is trusted on its own (the auditor compared it out of band).
    both = [*argv, "--key", str(pem(tmp_path, "k2", NEW_KEY))]
    assert run(both, capsys)[0] == 0


# ---- B. the current key pinned instead of the first ------------------------------------------


def test_pinning_the_current_key_after_a_rotation_is_a_wrong_key_naming_the_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "e.jsonl"
    bundle.write_bytes(RotatedLog().export())
    current = pem(tmp_path, "current.pem", NEW_KEY)
    code, out, _ = run(["verify", str(bundle), "--key", str(current)], capsys)
    assert code == 3
    assert out.startswith("WRONG KEY: ")
    assert f"the log began under audit key {AUDIT_KEY.public.fingerprint}" in out
    assert "appears as the successor named by the audit key rotation at record 5" in out
    assert "and it signed the checkpoint over these records" in out
    # The rotation is the old key's own word: the hint never says to trust it unchecked.
    assert "Pin that key (the verifier then follows the rotation) only if you obtained it " in out
    code, out, _ = run(["verify", str(bundle), "--key", str(current), "--json"], capsys)
    result = json.loads(out)
    assert result["code"] == "wrong_key" and "rotation at record 5" in result["wrong_key_hint"]
    assert result["unconfirmed_rotation_at"] is None


def _forged_rotation_to(current: SigningIdentity, forger: SigningIdentity) -> bytes:
    """What someone holding no real key writes: a log signed by a key of their own, with a
    rotation record (signed by that same key) naming the real current key as its successor;
    the real key signs nothing."""
    store, clock = MemoryAuditStore(), StepClock()
    log = new_log(store, clock, key=forger)

    async def build() -> None:
        await typical_history(log, commands=2)
        await log.append(
            Action.SERVICE_KEY_ROTATED, SERVICE, target="service-key:audit-signer",
            context=service_key_rotation_context("audit-signer", forger.public, current.public),
        )  # fmt: skip
        await log.append(Action.POLICY_SET, OPERATOR, context={"version": 2})

    trio.run(build)
    return export_bundle(log)


def test_a_rotation_to_the_pinned_key_that_key_never_signed_names_no_key_to_pin(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Following a hint to pin the forger's key would make the forgery VALID.
    bundle = tmp_path / "forged.jsonl"
    bundle.write_bytes(_forged_rotation_to(NEW_KEY, THIRD_KEY))
    assert verify_bundle(bundle, [THIRD_KEY.public]).ok  # what the old hint led to
    result = verify_bundle(bundle, [NEW_KEY.public])
    assert result.verdict is Verdict.WRONG_KEY, result.summary()
    assert result.wrong_key_hint is None and result.unconfirmed_rotation == 5
    summary = result.summary()
    assert summary.startswith("WRONG KEY: no pinned key signed this bundle: ")
    assert "pin the key" not in summary.lower() and "pin that key" not in summary.lower()
    assert "Record 5 claims an audit key rotation to the pinned key, but the pinned key " in summary
    argv = ["verify", str(bundle), "--key", str(pem(tmp_path, "current.pem", NEW_KEY))]
    code, out, _ = run(argv, capsys)
    assert code == 3 and "a claim anyone can write, not a reason to pin another key" in out
    code, out, _ = run([*argv, "--json"], capsys)
    value = json.loads(out)
    assert code == 3 and value["wrong_key_hint"] is None
    assert value["unconfirmed_rotation_at"] == 5


def test_a_rotation_the_pinned_key_confirms_only_by_the_checkpoint_gets_the_hint() -> None:
    # Exported right after the rotation: the new key signed no record yet, only the checkpoint.
    store, clock = MemoryAuditStore(), StepClock()
    old, new = new_log(store, clock, key=AUDIT_KEY), new_log(store, clock, key=NEW_KEY)

    async def build() -> None:
        await typical_history(old, commands=2)
        await old.append(
            Action.SERVICE_KEY_ROTATED, SERVICE, target="service-key:audit-signer",
            context=service_key_rotation_context("audit-signer", AUDIT_KEY.public, NEW_KEY.public),
        )  # fmt: skip

    trio.run(build)
    result = verify_bundle(io.BytesIO(export_bundle(new)), [NEW_KEY.public])
    assert result.verdict is Verdict.WRONG_KEY, result.summary()
    assert "rotation at record 5, and it signed the checkpoint over these records:" in (
        result.wrong_key_hint or ""
    )
    assert AUDIT_KEY.public.fingerprint in (result.wrong_key_hint or "")


def test_a_pinned_key_signature_only_before_the_rotation_naming_it_is_tampering() -> None:
    # A record by the pinned key placed before the rotation that names it, none after: the
    # key never confirmed the rotation, and it signed something here, so this is no wrong key.
    store, clock = MemoryAuditStore(), StepClock()
    forged, real = new_log(store, clock, key=THIRD_KEY), new_log(store, clock, key=NEW_KEY)

    async def build() -> None:
        await typical_history(forged, commands=1)
        await real.append(Action.POLICY_SET, OPERATOR, context={"version": 1})
        await forged.append(
            Action.SERVICE_KEY_ROTATED, SERVICE, target="service-key:audit-signer",
            context=service_key_rotation_context("audit-signer", THIRD_KEY.public, NEW_KEY.public),
        )  # fmt: skip

    trio.run(build)
    result = verify_bundle(io.BytesIO(export_bundle(forged)), [NEW_KEY.public])
    assert result.verdict is Verdict.INVALID and result.bad_seq == 0, result.summary()
    assert result.wrong_key_hint is None


def _genuine_line_of_the_current_key() -> bytes:
    """A record line NEW_KEY signed in the real log (public to any auditor of it)."""
    real = RotatedLog()
    for _ in range(3):
        real.grow()
    return real.export().splitlines(keepends=True)[-2]


def _rechained(line: bytes, seq: int, previous: bytes) -> bytes:
    """``line`` with its seq and prev_hash edited to follow ``previous``: neither is signed."""
    value = json.loads(line)
    value.update(seq=seq, prev_hash=hashlib.sha256(previous.rstrip(b"\n")).hexdigest())
    return rfc8785.dumps(value) + b"\n"


def test_a_genuine_record_of_the_pinned_key_spliced_after_a_forged_rotation_names_no_key() -> (
    None
):
    # The forger copies one record the real current key signed into their own log, after
    # their rotation "to" that key. An event's signature does not cover its seq or prev_hash,
    # so even re-chained into place it vouches for nothing before it.
    forged = _forged_rotation_to(NEW_KEY, THIRD_KEY).splitlines(keepends=True)
    genuine = _genuine_line_of_the_current_key()
    as_copied = b"".join([*forged[:-1], genuine, forged[-1]])
    result = verify_bundle(io.BytesIO(as_copied), [NEW_KEY.public])
    assert result.verdict is Verdict.INVALID and result.wrong_key_hint is None, result.summary()
    # forged: header, records 0-4, the rotation (5), record 6, checkpoint
    rechained = b"".join([*forged[:7], _rechained(genuine, 6, forged[6]), forged[-1]])
    result = verify_bundle(io.BytesIO(rechained), [NEW_KEY.public])
    assert result.verdict is Verdict.WRONG_KEY and result.wrong_key_hint is None, result.summary()
    assert result.unconfirmed_rotation == 5 and result.unproven_successor_record == 6
    summary = result.summary()
    assert "pin that key" not in summary.lower()
    assert "an event's signature does not cover its place in the log" in summary


@pytest.mark.parametrize("team", ["team-7", "team-9"], ids=["same log", "another team"])
def test_a_checkpoint_of_the_pinned_key_spliced_after_a_forged_rotation_names_no_key(
    team: str,
) -> None:
    # A real checkpoint by the current key over more records than the rotation's seq: of this
    # team's real log (other records), or of another team's (teams share the audit key).
    real = new_log(team=team, key=NEW_KEY)

    async def build() -> None:
        for version in range(10):
            await real.append(Action.POLICY_SET, OPERATOR, context={"version": version})

    trio.run(build)
    forged = _forged_rotation_to(NEW_KEY, THIRD_KEY).splitlines(keepends=True)
    spliced = b"".join([*forged[:-1], export_bundle(real).splitlines(keepends=True)[-1]])
    result = verify_bundle(io.BytesIO(spliced), [NEW_KEY.public])
    assert result.verdict is Verdict.INVALID and result.wrong_key_hint is None, result.summary()
    assert THIRD_KEY.public.fingerprint not in result.summary()


def test_records_of_the_current_key_under_a_checkpoint_by_the_old_one_name_no_key() -> None:
    # Honest: an instance not reloaded yet exports, so the old key signs the checkpoint. The
    # new key's records alone cannot show where the log began: a plain WRONG KEY.
    rotated = RotatedLog()
    result = verify_bundle(io.BytesIO(export_bundle(rotated.old)), [NEW_KEY.public])
    assert result.verdict is Verdict.WRONG_KEY and result.wrong_key_hint is None, result.summary()
    assert result.unproven_successor_record == 6
    assert "Take that key from an export or checkpoint kept from before the rotation" in (
        result.summary()
    )


def test_a_random_key_on_a_rotated_bundle_is_a_wrong_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "e.jsonl"
    bundle.write_bytes(RotatedLog().export())
    code, out, _ = run(["verify", str(bundle), "--key", str(pem(tmp_path, "x", THIRD_KEY))],
                       capsys)  # fmt: skip
    assert code == 3 and out.startswith("WRONG KEY: no pinned key signed this bundle")
    assert AUDIT_KEY.public.fingerprint in out  # as the rotation record names it


def test_a_bundle_by_a_key_named_nowhere_is_a_wrong_key_by_key_id() -> None:
    # The bundle's own key list (the hint) left out: nothing verifies under the pinned key, so
    # tampering cannot be told from a wrong --key; the signer is named by its key id.
    lines = export_bundle(_typical_log()).splitlines(keepends=True)
    trailer = json.loads(lines[-1])
    trailer["keys"] = []
    lines[-1] = rfc8785.dumps(trailer) + b"\n"
    result = verify_bundle(io.BytesIO(b"".join(lines)), [THIRD_KEY.public])
    assert result.verdict is Verdict.WRONG_KEY, result.summary()
    named = f"key id {AUDIT_KEY.public.key_id} (named by no key in the bundle)"
    assert result.bundle_signer == named


def _typical_log() -> AuditLog:
    log = new_log()
    trio.run(typical_history, log, 2)
    return log


# ---- C. agent keys are introduced once, not after removal, and can be pinned ------------------


def _verify(log: AuditLog, agent_pins: dict[str, str] | None = None) -> VerificationResult:
    bundle = io.BytesIO(export_bundle(log))
    return verify_bundle(bundle, [AUDIT_KEY.public], agent_pins=agent_pins)


def _removed_then_reregistered() -> AuditLog:
    """What the auditor forged with the audit key: a removed agent registered again with a key
    of their own, then an "agent-signed" command by that key."""
    log = new_log()

    async def forge() -> None:
        await typical_history(log, commands=1)
        await log.append(Action.AGENT_REMOVED, OPERATOR, target=AGENT_ID, context={"name": "web-1"})
        await register_agent(log, key=OTHER_KEY)
        await log.append_agent_event(agent_event(key=OTHER_KEY), AGENT_ID, OTHER_KEY.public)

    trio.run(forge)
    return log


def test_a_second_registration_of_one_agent_id_is_invalid_naming_both_records() -> None:
    result = _verify(_removed_then_reregistered())
    assert result.verdict is Verdict.INVALID, result.summary()
    assert result.bad_seq == 5
    assert "agent agent-1 was already registered by record 0" in (result.reason or "")
    assert OTHER_KEY.public.fingerprint in (result.reason or "")


def _removal_then_agent_event(delay: timedelta, dated: timedelta) -> AuditLog:
    """agent-1 registered and removed; after ``delay`` on the log's clock an event it signed,
    dated ``dated`` after the removal's log time, arrives."""
    clock = StepClock()
    log = new_log(clock=clock)

    async def build() -> None:
        await register_agent(log)
        await log.append(Action.AGENT_REMOVED, OPERATOR, target=AGENT_ID)
        removed_at = clock.now
        clock.now += delay
        await log.append_agent_event(
            agent_event(Action.SESSION_ENDED, when=removed_at + dated,
                        context={"reason": "normal"}),
            AGENT_ID, AGENT_KEY.public,
        )  # fmt: skip

    trio.run(build)
    return log


def test_an_event_a_removed_agent_signed_after_its_removal_is_a_warning_naming_the_record(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An honest rendezvous may log it (the removal races its check): reported, never INVALID.
    log = _removal_then_agent_event(timedelta(hours=1), timedelta(minutes=30))
    result = _verify(log)
    assert result.ok, result.summary()
    assert [warning.to_json() for warning in result.signed_after_removal] == [
        {"agent_id": AGENT_ID, "agent_name": "web-1", "removed_by_record": 1, "count": 1,
         "records": [2]}
    ]  # fmt: skip
    assert "WARNING: agent web-1 (agent-1) signed record 2 after its removal by record 1" in (
        result.summary()
    )
    bundle = tmp_path / "e.jsonl"
    bundle.write_bytes(export_bundle(log))
    argv = ["verify", str(bundle), "--key", str(pem(tmp_path, "k", AUDIT_KEY))]
    code, out, _ = run(argv, capsys)
    assert code == 0 and "signed record 2 after its removal by record 1" in out
    code, out, _ = run([*argv, "--json"], capsys)
    assert code == 0
    assert json.loads(out)["signed_after_removal"][0]["records"] == [2]


def test_many_events_after_a_removal_are_counted_and_the_first_ones_listed() -> None:
    clock = StepClock()
    log = new_log(clock=clock)
    after = MAX_LISTED_AFTER_REMOVAL + 3

    async def build() -> None:
        await register_agent(log)
        await log.append(Action.AGENT_REMOVED, OPERATOR, target=AGENT_ID)
        removed_at = clock.now
        clock.now += timedelta(hours=1)
        for number in range(after):
            late = agent_event(when=removed_at + timedelta(minutes=30), context={"n": number})
            await log.append_agent_event(late, AGENT_ID, AGENT_KEY.public)

    trio.run(build)
    result = _verify(log)
    assert result.ok, result.summary()
    (warning,) = result.signed_after_removal
    assert warning.count == after
    assert warning.seqs == tuple(range(2, 2 + MAX_LISTED_AFTER_REMOVAL))
    assert f"and {after - MAX_LISTED_AFTER_REMOVAL} more after its removal" in result.summary()


def test_an_event_signed_before_the_removal_may_arrive_after_it() -> None:
    # Spooled on the host before the removal, delivered later: an honest late delivery.
    result = _verify(_removal_then_agent_event(timedelta(hours=1), -timedelta(seconds=5)))
    assert result.ok, result.summary()
    assert result.signed_after_removal == () and "WARNING" not in result.summary()


def test_a_pinned_agent_fingerprint_refuses_a_registration_with_another_key() -> None:
    log = _typical_log()
    by_name = _verify(log, agent_pins={"web-1": OTHER_KEY.public.fingerprint})
    assert by_name.verdict is Verdict.INVALID and by_name.bad_seq == 0, by_name.summary()
    assert f"pins {OTHER_KEY.public.fingerprint}" in (by_name.reason or "")
    by_id = _verify(log, agent_pins={AGENT_ID: OTHER_KEY.public.fingerprint})
    assert by_id.verdict is Verdict.INVALID
    assert _verify(log, agent_pins={"web-1": AGENT_KEY.public.fingerprint}).ok


def _registered_as_lookalike() -> AuditLog:
    """What the audit-key holder writes to dodge a pin on the name web-1: the real agent id
    registered with a key of their own under the hostname web-l, then a command it signed."""
    log = new_log()

    async def forge() -> None:
        await log.append(
            Action.AGENT_REGISTERED, SERVICE, target=AGENT_ID,
            context=agent_registration_context(OTHER_KEY.public, hostname="web-l"),
        )  # fmt: skip
        await log.append_agent_event(
            agent_event(key=OTHER_KEY, when=START + timedelta(seconds=1),
                        context={"command": "rm -rf /srv/evidence", "exit_code": 0}),
            AGENT_ID, OTHER_KEY.public,
        )  # fmt: skip

    trio.run(forge)
    return log


def test_a_name_pin_no_registration_matches_is_a_warning_naming_lookalikes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = _registered_as_lookalike()
    result = _verify(log, agent_pins={"web-1": AGENT_KEY.public.fingerprint})
    assert result.ok, result.summary()  # nothing in the log contradicts the pin...
    (unmatched,) = result.unmatched_agent_pins  # ...but it checked nothing, and says so
    assert (unmatched.name, unmatched.similar) == ("web-1", (("web-l", AGENT_ID),))
    assert (
        "WARNING: --agent-key pin web-1 (looks like web-l, agent agent-1) matched no agent id, "
        "name or hostname registered in this bundle, so it checked nothing"
    ) in result.summary()
    assert "pin agents by id" in result.summary()
    # Pinned by agent id (the rendezvous makes it, the registrant cannot choose it): caught.
    by_id = _verify(log, agent_pins={AGENT_ID: AGENT_KEY.public.fingerprint})
    assert by_id.verdict is Verdict.INVALID and by_id.bad_seq == 0, by_id.summary()
    bundle = tmp_path / "e.jsonl"
    bundle.write_bytes(export_bundle(log))
    argv = ["verify", str(bundle), "--key", str(pem(tmp_path, "k", AUDIT_KEY)),
            "--agent-key", f"web-1={AGENT_KEY.public.fingerprint}"]  # fmt: skip
    code, out, _ = run(argv, capsys)
    assert code == 0 and "WARNING: --agent-key pin web-1 (looks like web-l" in out
    code, out, _ = run([*argv, "--json"], capsys)
    assert code == 0
    assert json.loads(out)["unmatched_agent_pins"] == [
        {"pin": "web-1", "fingerprint": AGENT_KEY.public.fingerprint,
         "similar": [{"name": "web-l", "agent_id": AGENT_ID}]}
    ]  # fmt: skip
    show = ["show", *argv[1:]]
    code, out, err = run(show, capsys)
    assert code == 0 and "rm -rf /srv/evidence" in out
    assert "WARNING: --agent-key pin web-1 (looks like web-l" in err


def test_an_agent_id_pin_no_registration_matches_is_a_warning() -> None:
    log = _typical_log()
    result = _verify(log, agent_pins={"agt_mfrggzdfmztwq2lk": AGENT_KEY.public.fingerprint})
    assert result.ok, result.summary()
    assert [pin.name for pin in result.unmatched_agent_pins] == ["agt_mfrggzdfmztwq2lk"]
    assert "WARNING: --agent-key pin agt_mfrggzdfmztwq2lk matched no agent id" in result.summary()
    pins = {AGENT_ID: AGENT_KEY.public.fingerprint, "web-1": AGENT_KEY.public.fingerprint}
    matched = _verify(log, agent_pins=pins)
    assert matched.ok and matched.unmatched_agent_pins == ()
    assert "WARNING" not in matched.summary()
    assert matched.to_json()["unmatched_agent_pins"] == []


def test_many_unmatched_pins_are_counted_on_the_ok_line_and_all_listed_in_json() -> None:
    pins = {f"db-{number}": OTHER_KEY.public.fingerprint for number in range(25)}
    result = _verify(_typical_log(), agent_pins=pins)
    assert result.ok and len(result.unmatched_agent_pins) == 25
    assert "db-19 and 5 more matched no agent id" in result.summary()
    assert len(result.to_json()["unmatched_agent_pins"]) == 25  # type: ignore[arg-type]


def test_the_agent_key_options_pin_fingerprints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "e.jsonl"
    bundle.write_bytes(export_bundle(_typical_log()))
    argv = ["verify", str(bundle), "--key", str(pem(tmp_path, "k", AUDIT_KEY))]
    good = f"web-1={AGENT_KEY.public.fingerprint}"
    assert run([*argv, "--agent-key", good], capsys)[0] == 0
    code, out, _ = run([*argv, "--agent-key", f"{AGENT_ID}={OTHER_KEY.public.fingerprint}"],
                       capsys)  # fmt: skip
    assert code == 1 and "--agent-key pins" in out
    pins = tmp_path / "agents.txt"
    pins.write_text(f"# hosts\n\nweb-1 = {OTHER_KEY.public.fingerprint}\n")
    assert run([*argv, "--agent-keys", str(pins)], capsys)[0] == 1
    code, _, err = run([*argv, "--agent-key", "web-1=not-a-fingerprint"], capsys)
    assert code == 2 and "is not a key fingerprint" in err
    code, _, err = run([*argv, "--agent-key", good, "--agent-key",
                        f"web-1={OTHER_KEY.public.fingerprint}"], capsys)  # fmt: skip
    assert code == 2 and "already pinned" in err


# ---- D. the OK names the agent keys and what it did not check --------------------------------


def test_the_ok_names_each_agent_key_by_name_and_fingerprint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "e.jsonl"
    bundle.write_bytes(export_bundle(_typical_log()))
    argv = ["verify", str(bundle), "--key", str(pem(tmp_path, "k", AUDIT_KEY))]
    code, out, _ = run(argv, capsys)
    summary, not_checked = out.splitlines()
    assert code == 0
    assert f"2 signing keys (agent web-1 (agent-1) {AGENT_KEY.public.fingerprint})" in summary
    assert not_checked.startswith("not checked: rollback or truncation")
    code, out, _ = run([*argv, "--json"], capsys)
    agent = next(key for key in json.loads(out)["signing_keys"] if key["role"] == "agent")
    assert agent["agent_name"] == "web-1" and agent["agent_id"] == AGENT_ID


def _log_registering(**names: str) -> AuditLog:
    """agent-1 registered with these context names (``name``, ``hostname``), then one command."""
    log = new_log()

    async def build() -> None:
        await log.append(
            Action.AGENT_REGISTERED, SERVICE, target=AGENT_ID,
            context=agent_registration_context(AGENT_KEY.public, **names),
        )  # fmt: skip
        await log.append_agent_event(agent_event(), AGENT_ID, AGENT_KEY.public)

    trio.run(build)
    return log


def test_the_agent_is_pinned_shown_and_found_by_its_registered_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bundle = tmp_path / "e.jsonl"
    bundle.write_bytes(export_bundle(_log_registering(name="db-primary", hostname="host-7")))
    key = ["--key", str(pem(tmp_path, "k", AUDIT_KEY))]
    code, out, _ = run(["verify", str(bundle), *key], capsys)
    assert code == 0 and f"agent db-primary (agent-1) {AGENT_KEY.public.fingerprint}" in out
    pin = f"db-primary={OTHER_KEY.public.fingerprint}"
    assert run(["verify", str(bundle), *key, "--agent-key", pin], capsys)[0] == 1
    for name in ("db-primary", "host-7", AGENT_ID):
        code, out, _ = run(["show", str(bundle), *key, "--agent", name, "--json"], capsys)
        records = json.loads(out)["records"]
        assert code == 0 and len(records) == 2, name
        assert {record["agent_name"] for record in records} == {"db-primary"}
    code, out, _ = run(["show", str(bundle), *key, "--agent", "web-1", "--json"], capsys)
    assert code == 0 and json.loads(out)["records"] == []


def test_a_registered_name_never_reaches_the_terminal_raw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Whoever held the audit key chose the name; the OK line names agents by it.
    bundle = tmp_path / "e.jsonl"
    bundle.write_bytes(export_bundle(_log_registering(name="web\x1b]0;owned\x07-1")))
    code, out, _ = run(["verify", str(bundle), "--key", str(pem(tmp_path, "k", AUDIT_KEY))],
                       capsys)  # fmt: skip
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out
    assert "agent web\\e]0;owned" in out


# ---- E. exit codes: transformed files are INVALID, another log's checkpoint a usage error -------


@pytest.mark.parametrize(
    "transform",
    [lambda data: b"\xef\xbb\xbf" + data, lambda data: data.replace(b"\n", b"\r\n")],
    ids=["byte-order mark", "CRLF"],
)
def test_a_transformed_bundle_exits_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], transform: object
) -> None:
    bundle = tmp_path / "e.jsonl"
    bundle.write_bytes(transform(export_bundle(_typical_log())))  # type: ignore[operator]
    code, out, _ = run(["verify", str(bundle), "--key", str(pem(tmp_path, "k", AUDIT_KEY))],
                       capsys)  # fmt: skip
    assert code == 1 and out.startswith("INVALID: bundle (line 1): the bundle ")


def test_another_logs_checkpoint_is_a_usage_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = new_log(team="team-9")
    trio.run(lambda: other.append(Action.POLICY_SET, OPERATOR, context={"version": 1}))
    kept = tmp_path / "team9.txt"
    kept.write_bytes(trio.run(other.checkpoint).note)
    bundle = tmp_path / "e.jsonl"
    bundle.write_bytes(export_bundle(_typical_log()))
    code, out, err = run(["verify", str(bundle), "--key", str(pem(tmp_path, "k", AUDIT_KEY)),
                          "--previous-checkpoint", str(kept)], capsys)  # fmt: skip
    assert code == 2 and out == ""
    assert "this checkpoint is of another log: desk.example.com/audit/team-9" in err
