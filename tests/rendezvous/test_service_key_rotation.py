"""`keys rotate`: a new key per purpose, the old public half kept as retired (tokens it signed
valid until they expire, or refused at once with --retire-old-now), the rotation audited in
every log, picked up on SIGHUP, and refused by instances whose key files are stale."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import jwt
import pytest
import trio

from agent.enrollment import parse_service_keys
from audit.trust import service_key_rotation_context
from audit.verify import verify_bundle
from protocol.identity import PublicIdentity, SigningIdentity
from relay.keyset import parse_jwks
from rendezvous.audit_trail import SERVICE_LOG, Action, AuditTrail, service_actor
from rendezvous.config import ServiceConfig
from rendezvous.key_rotation import (
    RETIRED_KEY_GRACE_SECONDS,
    reload_service_keys,
    rotate_service_key,
)
from rendezvous.main import main
from rendezvous.server import run_service
from rendezvous.service_keys import (
    KEY_ROLES,
    ServiceKeyMismatch,
    check_pinned_keys,
    create_missing_keys,
    key_path,
    load_service_keys,
    pending_key_path,
    pending_key_paths,
)
from rendezvous.store import Store, open_store
from rendezvous.store.base import RetiredServiceKey
from tests.rendezvous.service_harness import ServiceHarness, harness

pytestmark = pytest.mark.anyio


@pytest.fixture
async def service(store: Store, tmp_path: Path) -> AsyncIterator[ServiceHarness]:
    async with harness(store, tmp_path / "data") as running:
        # As init and serve do: the database pins the data dir's keys.
        await check_pinned_keys(
            store, running.ctx.keys, running.config.data_dir, running.clock.now, pin=True
        )
        yield running


async def _rotate(
    service: ServiceHarness, role: str, *, retire_old_now: bool = False, now: float | None = None
) -> PublicIdentity:
    """Rotate ``role`` as the admin command does, then reload as SIGHUP does; the old key."""
    old = service.ctx.keys.by_role()[role].public
    await rotate_service_key(
        service.store, service.config.data_dir, role, issuer=service.config.issuer,
        retire_old_now=retire_old_now, now=service.clock.now if now is None else now,
    )  # fmt: skip
    assert await reload_service_keys(service.ctx)
    return old


async def _whoami(service: ServiceHarness, operator: object, token: str) -> int:
    response = await service.call(operator, "GET", "/v1/auth/whoami", token=token)  # type: ignore[arg-type]
    return response.status_code


@pytest.mark.parametrize("role", KEY_ROLES)
async def test_rotating_a_key_replaces_it_keeps_its_public_half_and_audits_it(
    service: ServiceHarness, role: str
) -> None:
    data_dir = service.config.data_dir
    team = await service.team("ops")
    old_private = key_path(data_dir, role).read_bytes()
    old = await _rotate(service, role)

    new = load_service_keys(data_dir).by_role()[role].public
    assert new != old and service.ctx.keys.by_role()[role].public == new
    assert stat.S_IMODE(key_path(data_dir, role).stat().st_mode) == 0o600
    assert not pending_key_paths(data_dir, role)
    # The old private key is gone from the data dir; its public half is in the database.
    assert all(path.read_bytes() != old_private for path in (data_dir / "keys").iterdir())
    assert (await service.store.service_key_fingerprints())[role] == new.fingerprint
    [retired] = await service.store.retired_service_keys()
    assert (retired.role, retired.fingerprint, retired.replaced_by) == (
        role, old.fingerprint, new.fingerprint,
    )  # fmt: skip
    assert retired.accept_until == pytest.approx(service.clock.now + RETIRED_KEY_GRACE_SECONDS)

    for log_id in (SERVICE_LOG, team):
        [event] = await service.audit_events(log_id, Action.SERVICE_KEY_ROTATED.value)
        assert event["target"] == f"service-key:{role}"
        assert event["context"]["old_fingerprint"] == old.fingerprint
        assert event["context"]["new_fingerprint"] == new.fingerprint
        # The audit signer's successor is vouched for by the key it replaces.
        signer = old if role == "audit-signer" else service.ctx.keys.audit_signer.public
        assert event["signer"] == signer.key_id

    jwks = (await service.http.get("/.well-known/jwks.json")).json()["keys"]
    published = {(key["purpose"], key["kid"]): key["state"] for key in jwks}
    assert published[(role, new.key_id)] == "current"
    assert published[(role, old.key_id)] == "retired"
    assert len(jwks) == len(KEY_ROLES) + 1
    if role == "relay-token":  # a relay with --jwks verifies tokens of both until they expire
        relay_keys = parse_jwks(json.dumps({"keys": jwks}).encode())
        assert {old.key_id, new.key_id} <= set(relay_keys)


async def test_an_agent_enrolling_after_a_rotation_pins_only_the_current_keys(
    service: ServiceHarness,
) -> None:
    old = await _rotate(service, "jwt-issuer")
    jwks = (await service.http.get("/.well-known/jwks.json")).json()
    assert old.key_id in {key["kid"] for key in jwks["keys"]}
    pinned = parse_service_keys(jwks)
    assert list(pinned["jwt-issuer"]) == [service.ctx.keys.jwt_issuer.public.key_id]


async def test_tokens_of_the_retired_issuer_key_stay_valid_until_they_expire(
    service: ServiceHarness,
) -> None:
    operator = await service.operator(await service.team("ops"))
    await _rotate(service, "jwt-issuer")
    assert await _whoami(service, operator, operator.token) == 200
    fresh = await service.login(operator.identity)
    new_kid = service.ctx.keys.jwt_issuer.public.key_id
    assert jwt.get_unverified_header(fresh["access_token"])["kid"] == new_kid
    assert await _whoami(service, operator, fresh["access_token"]) == 200


async def test_the_retired_issuer_key_verifies_nothing_once_its_tokens_expired(
    service: ServiceHarness,
) -> None:
    operator = await service.operator(await service.team("ops"))
    # A rotation made longer ago than any token lives: the old key is not accepted any more.
    await _rotate(service, "jwt-issuer", now=service.clock.now - RETIRED_KEY_GRACE_SECONDS - 1)
    assert await _whoami(service, operator, operator.token) == 401
    jwks = (await service.http.get("/.well-known/jwks.json")).json()["keys"]
    assert len(jwks) == len(KEY_ROLES)


async def test_retire_old_now_refuses_the_old_keys_tokens_at_once(
    service: ServiceHarness,
) -> None:
    operator = await service.operator(await service.team("ops"))
    assert await _whoami(service, operator, operator.token) == 200  # now in the verified cache
    old = await _rotate(service, "jwt-issuer", retire_old_now=True)
    assert await _whoami(service, operator, operator.token) == 401
    jwks = (await service.http.get("/.well-known/jwks.json")).json()["keys"]
    assert old.key_id not in {key["kid"] for key in jwks}
    fresh = await service.login(operator.identity)
    assert await _whoami(service, operator, fresh["access_token"]) == 200


async def test_an_export_across_an_audit_signer_rotation_verifies_with_the_old_key(
    service: ServiceHarness,
) -> None:
    team = await service.team("ops")
    await service.operator(team)  # records signed by the first key
    old = await _rotate(service, "audit-signer")
    await service.ctx.audit.record(
        team, actor=service_actor("test"), action=Action.AUDIT_EXPORTED, target=None, details={}
    )
    bundle = io.BytesIO()
    await service.ctx.audit.export_to(team, bundle)
    result = verify_bundle(io.BytesIO(bundle.getvalue()), [old])
    assert result.ok, result.summary()
    [rotation] = result.key_rotations
    assert rotation.new_key == service.ctx.keys.audit_signer.public
    assert result.checkpoint_signer == rotation.new_key


async def _after_audit_rotation(service: ServiceHarness) -> tuple[str, SigningIdentity]:
    """A team whose log has an audit-signer rotation (with --retire-old-now); the old key."""
    team = await service.team("ops")
    old = service.ctx.keys.audit_signer
    await _rotate(service, "audit-signer", retire_old_now=True)
    await service.ctx.audit.record(
        team, actor=service_actor("test"), action=Action.AUDIT_EXPORTED, target=None, details={}
    )
    return team, old


@pytest.mark.parametrize("pin_new_too", [False, True], ids=["key-old", "key-old-and-new"])
async def test_a_leaked_retired_audit_key_cannot_fork_the_rotation(
    service: ServiceHarness, pin_new_too: bool
) -> None:
    team, old = await _after_audit_rotation(service)
    evil = SigningIdentity.generate()
    leaked = AuditTrail(service.store.audit, old, origin=service.config.issuer)
    await leaked.record(
        team, actor=service_actor("admin command"), action=Action.SERVICE_KEY_ROTATED,
        target="service-key:audit-signer",
        details=service_key_rotation_context("audit-signer", old.public, evil.public,
                                             retire_old_now=True, accept_old_until=0),
    )  # fmt: skip
    forged = AuditTrail(service.store.audit, evil, origin=service.config.issuer)
    await forged.record(
        team, actor=service_actor("forged"), action=Action.AUDIT_EXPORTED, target=None, details={}
    )
    bundle = io.BytesIO()
    await forged.export_to(team, bundle)
    pins = [old.public, service.ctx.keys.audit_signer.public][: 2 if pin_new_too else 1]
    result = verify_bundle(io.BytesIO(bundle.getvalue()), pins)
    assert not result.ok and result.exit_code != 0
    assert "second rotation" in (result.reason or "") and "fork" in (result.reason or "")


@pytest.mark.parametrize("extra", [1, 2, 200])
async def test_records_a_retired_audit_key_signs_after_its_rotation_verify_and_are_reported(
    service: ServiceHarness, extra: int
) -> None:
    # An instance not reloaded yet keeps signing with the old key for as long as the runbook
    # takes; a leaked key would sign the same way. Refusing them would make an honest log
    # unverifiable for good: they verify, and the verifier says how many there were.
    team, old = await _after_audit_rotation(service)
    not_reloaded = AuditTrail(service.store.audit, old, origin=service.config.issuer)
    for _ in range(extra - 1):
        await not_reloaded.record(
            team, actor=service_actor("t"), action=Action.AUDIT_EXPORTED, target=None,
            details={},
        )  # fmt: skip
    bundle = io.BytesIO()
    await service.ctx.audit.export_to(team, bundle)
    result = verify_bundle(io.BytesIO(bundle.getvalue()), [old.public])
    assert result.ok, result.summary()
    late = dict((key.fingerprint, count) for key, count in result.late_signatures)
    if extra == 1:
        assert late == {}
        assert "WARNING" not in result.summary()
    else:
        assert late == {old.public.fingerprint: extra - 1}
        assert f"retired audit key {old.public.fingerprint} signed {extra - 1} more" in (
            result.summary()
        )


async def test_a_checkpoint_a_retired_audit_key_signs_verifies_and_is_reported(
    service: ServiceHarness,
) -> None:
    team, old = await _after_audit_rotation(service)
    bundle = io.BytesIO()
    await AuditTrail(service.store.audit, old, origin=service.config.issuer).export_to(
        team, bundle)  # fmt: skip
    result = verify_bundle(io.BytesIO(bundle.getvalue()), [old.public])
    assert result.ok, result.summary()
    assert [(key.fingerprint, count) for key, count in result.late_signatures] == [
        (old.public.fingerprint, 1)
    ]


# ---- the admin command, SIGHUP, and other instances ------------------------------------------


def test_keys_rotate_and_show_name_current_and_retired_keys(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--data-dir", str(tmp_path / "data"), "--database", database_url]
    assert main(["init", *store]) == 0
    old = load_service_keys(tmp_path / "data").relay_token.public
    capsys.readouterr()
    assert main(["keys", "rotate", "relay-token", "--retire-old-now", *store]) == 0
    out = capsys.readouterr().out
    new = load_service_keys(tmp_path / "data").relay_token.public
    assert f"{old.fingerprint} -> {new.fingerprint}" in out and "reload by themselves" in out
    assert main(["keys", "show", *store]) == 0
    out = capsys.readouterr().out
    assert f"relay-token: {new.fingerprint} kid={new.key_id}\n" in out
    assert f"relay-token: {old.fingerprint} kid={old.key_id} (retired" in out


def test_an_instance_with_stale_key_files_refuses_to_start_with_the_copy_instruction(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["init", "--data-dir", str(first), "--database", database_url]) == 0
    second.mkdir()
    shutil.copytree(first / "keys", second / "keys")  # a second host, set up before the rotation
    assert (
        main(
            ["keys", "rotate", "audit-signer", "--data-dir", str(first), "--database", database_url]
        )
        == 0
    )
    config = ServiceConfig(
        data_dir=second, database=database_url, listen="127.0.0.1:0", insecure_http=True
    )
    with pytest.raises(ServiceKeyMismatch, match="copy .*first.*keys"):
        trio.run(run_service, config)
    assert "where 'keys rotate' last ran" in _mismatch(second, database_url, capsys)


def test_an_interrupted_rotation_names_the_step_left(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    assert main(["init", "--data-dir", str(data), "--database", database_url]) == 0
    old_file = key_path(data, "jwt-issuer").read_bytes()
    assert main(["keys", "rotate", "jwt-issuer", "--data-dir", str(data), "--database",
                 database_url]) == 0  # fmt: skip
    # As if the process died after the database pinned the new key, before the rename.
    pending = pending_key_path(data, "jwt-issuer", "0123abcd")
    os.replace(key_path(data, "jwt-issuer"), pending)
    key_path(data, "jwt-issuer").write_bytes(old_file)
    key_path(data, "jwt-issuer").chmod(0o600)
    error = _mismatch(data, database_url, capsys)
    assert f"mv {pending} {key_path(data, 'jwt-issuer')}" in error
    assert "service_key.rotated" in error  # it may have died before recording it


async def _rotation_records(store: Store) -> int:
    """How many service_key.rotated records the service log holds."""
    records = 0
    for record in await store.audit.read_records(SERVICE_LOG, 0, 10_000):
        records += json.loads(record.canonical)["event"]["action"] == (
            Action.SERVICE_KEY_ROTATED.value)
    return records


@pytest.mark.parametrize("shared_data_dir", [True, False], ids=["same-host", "two-hosts"])
async def test_two_concurrent_rotations_leave_one_pinned_key_file_and_one_record(
    database_url: str, tmp_path: Path, shared_data_dir: bool
) -> None:
    first = tmp_path / "first"
    create_missing_keys(first)
    second = first
    if not shared_data_dir:  # another host sharing the database, with a copy of the keys
        second = tmp_path / "second"
        shutil.copytree(first, second)
    async with open_store(database_url) as store:
        await check_pinned_keys(store, load_service_keys(first), first, time.time(), pin=True)
    outcomes: dict[Path, object] = {}
    # Both stores open before either rotates: on a loaded machine one open can take longer than
    # the other's whole rotation, which would make them one after the other, not concurrent.
    opened = 0
    both_open = trio.Event()

    async def rotate(data_dir: Path, name: str) -> None:
        nonlocal opened
        async with open_store(database_url) as store:
            opened += 1
            if opened == 2:
                both_open.set()
            await both_open.wait()
            try:
                outcomes[Path(name)] = await rotate_service_key(
                    store, data_dir, "jwt-issuer", issuer="https://x", retire_old_now=False,
                    now=time.time(),
                )  # fmt: skip
            except Exception as error:  # noqa: BLE001 - kept to assert on below
                outcomes[Path(name)] = error

    async with trio.open_nursery() as nursery:
        nursery.start_soon(rotate, first, "a")
        nursery.start_soon(rotate, second, "b")
    won = [outcome for outcome in outcomes.values() if not isinstance(outcome, Exception)]
    lost = [outcome for outcome in outcomes.values() if isinstance(outcome, Exception)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert "nothing was changed" in str(lost[0]) or "recorded nothing" in str(lost[0]) or (
        "holds" in str(lost[0])  # the other host's pin check ran after the winner's rotation
    )
    async with open_store(database_url) as store:
        # The service can start from the winner's data dir: its key file is the pinned key.
        winner = first if shared_data_dir else {"a": first, "b": second}[
            next(str(name) for name, outcome in outcomes.items() if outcome is won[0])]
        await check_pinned_keys(store, load_service_keys(winner), winner, time.time(), pin=False)
        assert len(await store.retired_service_keys()) == 1
        assert await _rotation_records(store) == 1  # only the rotation that happened
    for data_dir in {first, second}:
        assert not pending_key_paths(data_dir, "jwt-issuer")


async def test_a_rotation_that_lost_the_database_race_records_nothing_and_keeps_no_file(
    store: Store, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    create_missing_keys(data)
    await check_pinned_keys(store, load_service_keys(data), data, time.time(), pin=True)
    before = key_path(data, "jwt-issuer").read_bytes()
    # Another host's rotation moves the pin (for real, in the database) between this one's
    # check and its compare-and-set, which then runs for real and finds the pin moved.
    original = store.rotate_service_key

    async def other_host_won(retired: RetiredServiceKey, now: float) -> bool:
        other = dataclasses.replace(retired, replaced_by="SHA256:another-hosts-key")
        assert await original(other, now)
        return await original(retired, now)

    store.rotate_service_key = other_host_won  # type: ignore[method-assign,assignment]
    try:
        with pytest.raises(ServiceKeyMismatch, match="another rotation.*recorded nothing"):
            await rotate_service_key(store, data, "jwt-issuer", issuer="https://x",
                                     retire_old_now=False, now=time.time())
    finally:
        store.rotate_service_key = original  # type: ignore[method-assign]
    assert key_path(data, "jwt-issuer").read_bytes() == before
    assert not pending_key_paths(data, "jwt-issuer")
    assert await _rotation_records(store) == 0
    [retired] = await store.retired_service_keys()
    assert retired.replaced_by == "SHA256:another-hosts-key"


def _mismatch(data_dir: Path, database_url: str, capsys: pytest.CaptureFixture[str]) -> str:
    """The one-line error of an admin command that checks the pins (init) with ``data_dir``."""
    capsys.readouterr()
    assert main(["init", "--data-dir", str(data_dir), "--database", database_url]) == 1
    return capsys.readouterr().err


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
async def test_a_running_service_takes_the_rotated_key_on_sighup(
    database_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    config = ServiceConfig(
        data_dir=data, database=database_url, listen="127.0.0.1:0", insecure_http=True
    )
    create_missing_keys(data)
    # Until the service's receiver takes SIGHUP over, one must not end the test run.
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        await _rotate_while_serving(config, data, database_url)
    finally:
        signal.signal(signal.SIGHUP, previous)


async def _rotate_while_serving(config: ServiceConfig, data: Path, database_url: str) -> None:
    async with trio.open_nursery() as nursery:
        with trio.fail_after(30):
            [url] = (await nursery.start(_serve_with_hangup, config))[:1]
        async with httpx.AsyncClient(base_url=url) as client:
            jwks = (await client.get("/.well-known/jwks.json")).json()["keys"]
            before = {key["kid"] for key in jwks}
            async with open_store(database_url) as store:
                rotation = await rotate_service_key(
                    store, data, "policy-signer", issuer=config.issuer, retire_old_now=False,
                    now=time.time(),
                )  # fmt: skip
            os.kill(os.getpid(), signal.SIGHUP)
            with trio.fail_after(10):
                while True:
                    keys = (await client.get("/.well-known/jwks.json")).json()["keys"]
                    current = {key["kid"] for key in keys if key["state"] == "current"}
                    if rotation.new_key.key_id in current:
                        break
                    await trio.sleep(0.05)
        assert rotation.old_key.key_id in before and rotation.old_key.key_id not in current
        nursery.cancel_scope.cancel()


async def _serve_with_hangup(
    config: ServiceConfig, task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED
) -> None:
    await run_service(config, reload_on_hangup=True, task_status=task_status)
