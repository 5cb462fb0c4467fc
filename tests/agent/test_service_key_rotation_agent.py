"""An agent enrolled before a service key rotation follows it: on (re)connect the rendezvous sends
the current keys and the rotation statements, each signed by the key it retires; the agent pins
a new key only through a chain from what it pinned, and refuses a statement that does not chain."""

from __future__ import annotations

import logging
import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.control_client import ControlClient
from agent.enrollment import (
    MAX_ROTATION_STATEMENTS,
    follow_key_rotations,
    grant_signing_keys,
    parse_service_keys,
)
from protocol.errors import ProtocolError
from protocol.identity import PublicIdentity, SigningIdentity, b64url
from protocol.session_grant import issue_session_grant, verify_session_grant
from rendezvous.config import ServiceConfig
from rendezvous.key_rotation import rotate_service_key, rotation_statement, service_keys_message
from rendezvous.server import run_service
from rendezvous.service_keys import (
    KEY_ROLES,
    MAX_ROTATION_STATEMENTS_PER_PURPOSE,
    ROTATION_HORIZON_SECONDS,
    RetiredKey,
    ServiceKeys,
    create_missing_keys,
    load_service_keys,
)
from rendezvous.store import open_store
from tests.agent.test_control_client import (
    MACHINE,
    WAIT_SECONDS,
    enrolled_agent,
    fast_backoff,
    free_port,
    rendezvous_on,
)
from tests.rendezvous.conftest import database_url, postgres_cluster  # noqa: F401 - fixtures

pytestmark = pytest.mark.anyio

KEY_A, KEY_B, KEY_C, OUTSIDER = (SigningIdentity.generate() for _ in range(4))
PURPOSE = "jwt-issuer"


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


def _jwk(key: PublicIdentity, purpose: str = PURPOSE, **extra: str) -> dict[str, Any]:
    return {
        "kty": "OKP", "crv": "Ed25519", "x": b64url(key.raw), "kid": key.key_id,
        "use": "sig", "alg": "EdDSA", "purpose": purpose, **extra,
    }  # fmt: skip


def _pinned(*keys: SigningIdentity) -> dict[str, Any]:
    return {"keys": [_jwk(key.public) for key in keys]}


def _message(statements: list[dict[str, Any]], *listed: SigningIdentity) -> dict[str, Any]:
    return {"type": "service_keys", "keys": [_jwk(k.public) for k in listed],
            "rotations": statements}  # fmt: skip


def _grant_keys(jwks: dict[str, Any]) -> set[str]:
    return set(parse_service_keys(jwks)[PURPOSE])


def test_a_chain_of_rotations_is_followed_from_the_pinned_key() -> None:
    statements = [
        rotation_statement(PURPOSE, KEY_A, KEY_B.public, 1),
        rotation_statement(PURPOSE, KEY_B, KEY_C.public, 2),
    ]
    # While the rendezvous still lists A and B (what they signed has not expired), they stay.
    kept = follow_key_rotations(_pinned(KEY_A), _message(statements, KEY_C, KEY_B, KEY_A))
    assert kept.refused == () and kept.changed
    assert _grant_keys(kept.service_keys) == {k.public.key_id for k in (KEY_A, KEY_B, KEY_C)}
    # Once they are no longer listed, the retired keys are dropped; the chain still holds
    # for the agent that pinned C meanwhile (nothing to refuse, nothing to change).
    done = follow_key_rotations(kept.service_keys, _message(statements, KEY_C))
    assert _grant_keys(done.service_keys) == {KEY_C.public.key_id}
    again = follow_key_rotations(done.service_keys, _message(statements, KEY_C))
    assert again.refused == () and not again.changed


def test_statements_arriving_out_of_order_still_chain() -> None:
    statements = [
        rotation_statement(PURPOSE, KEY_B, KEY_C.public, 2),
        rotation_statement(PURPOSE, KEY_A, KEY_B.public, 1),
    ]
    outcome = follow_key_rotations(_pinned(KEY_A), _message(statements, KEY_C))
    assert outcome.refused == ()
    assert _grant_keys(outcome.service_keys) == {KEY_C.public.key_id}


def test_a_statement_that_does_not_chain_from_a_pinned_key_is_refused() -> None:
    statements = [rotation_statement(PURPOSE, OUTSIDER, KEY_B.public, 1)]
    outcome = follow_key_rotations(_pinned(KEY_A), _message(statements, KEY_B))
    assert not outcome.changed
    [reason] = outcome.refused
    assert "does not chain" in reason
    assert _grant_keys(outcome.service_keys) == {KEY_A.public.key_id}


def test_a_statement_naming_a_pinned_key_but_signed_by_another_is_refused() -> None:
    forged = rotation_statement(PURPOSE, OUTSIDER, KEY_B.public, 1)
    forged["old_key_id"] = KEY_A.public.key_id
    outcome = follow_key_rotations(_pinned(KEY_A), _message([forged], KEY_B))
    assert not outcome.changed
    [reason] = outcome.refused
    assert "not signed by the key it retires" in reason


def test_an_edited_statement_is_refused() -> None:
    edited = rotation_statement(PURPOSE, KEY_A, KEY_B.public, 1)
    edited["new_key"], edited["new_key_id"] = b64url(OUTSIDER.public.raw), OUTSIDER.public.key_id
    outcome = follow_key_rotations(_pinned(KEY_A), _message([edited], OUTSIDER))
    assert not outcome.changed and len(outcome.refused) == 1


async def test_an_agent_enrolled_before_a_rotation_accepts_grants_of_the_new_key_after_reconnecting(
    tmp_path: Path,
    database_url: str,  # noqa: F811 - the fixture: SQLite and PostgreSQL
    caplog: pytest.LogCaptureFixture,
) -> None:
    data_dir, port = tmp_path / "data", free_port()
    async with rendezvous_on(data_dir, database_url, port) as url:
        state = await enrolled_agent(url, database_url, tmp_path / "state")
    old_kid = load_service_keys(data_dir).jwt_issuer.public.key_id
    async with open_store(database_url) as store:
        rotation = await rotate_service_key(
            store, data_dir, PURPOSE, issuer="tucdesk-rendezvous", retire_old_now=False,
            now=time.time(),
        )  # fmt: skip
    new_issuer = load_service_keys(data_dir).jwt_issuer
    grant = _grant(new_issuer, state.agent_id, state.team_id)
    keys = grant_signing_keys(state)  # what the session host holds for the daemon's lifetime
    with pytest.raises(ProtocolError):
        _verify(grant, keys, state.agent_id, state.team_id)

    caplog.set_level(logging.INFO, logger="tucdesk.agent.control")
    client = ControlClient(state, MACHINE.fingerprint(), lambda offer: None, backoff=fast_backoff())
    async with rendezvous_on(data_dir, database_url, port), trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        with trio.fail_after(WAIT_SECONDS):
            await client.wait_connected()
            while rotation.new_key.key_id not in keys:  # noqa: ASYNC110 - no event to wait on
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    _verify(grant, keys, state.agent_id, state.team_id)
    assert old_kid in keys  # still listed: grants it signed before the rotation have not expired
    assert f"pinned rotated service key {PURPOSE} {rotation.new_key.fingerprint}" in caplog.text


def _grant(signer: SigningIdentity, agent_id: str, team_id: str) -> str:
    return issue_session_grant(
        signer, issuer="tucdesk-rendezvous", session_id="s-1", team_id=team_id,
        agent_id=agent_id, operator_id="op-1", operator_email="a@b.test", role="admin",
        operator_key_thumbprint="thumb", mode="shell", command=None, policy_result="allow",
        policy_rule_id=None, policy_version=None, approval=None, now=time.time(),
    )  # fmt: skip


def _verify(grant: str, keys: Any, agent_id: str, team_id: str) -> None:
    verify_session_grant(
        grant, keys, issuer="tucdesk-rendezvous", agent_id=agent_id, team_id=team_id,
        session_id="s-1", operator_key_thumbprint="thumb", now=time.time(),
    )  # fmt: skip


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize("retire_old_now", [False, True], ids=["rotate", "retire-old-now"])
async def test_a_connected_agent_follows_a_rotation_at_the_services_reload_without_reconnecting(
    tmp_path: Path,
    database_url: str,  # noqa: F811 - the fixture: SQLite and PostgreSQL
    retire_old_now: bool,
) -> None:
    data_dir = tmp_path / "data"
    create_missing_keys(data_dir)
    config = ServiceConfig(
        data_dir=data_dir, database=database_url, listen="127.0.0.1:0",
        insecure_http=True, heartbeat_seconds=1.0, heartbeat_timeout_seconds=5.0,
    )  # fmt: skip
    # Until the service's receiver takes SIGHUP over, one must not end the test run.
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(WAIT_SECONDS):
                [url] = (await nursery.start(partial(run_service, config,
                                                     reload_on_hangup=True)))[:1]
            state = await enrolled_agent(url, database_url, tmp_path / "state")
            old_kid = load_service_keys(data_dir).jwt_issuer.public.key_id
            keys = grant_signing_keys(state)  # what the session host holds
            client = ControlClient(state, MACHINE.fingerprint(), lambda offer: None,
                                   backoff=fast_backoff())  # fmt: skip
            nursery.start_soon(client.run)
            with trio.fail_after(WAIT_SECONDS):
                await client.wait_connected()
            async with open_store(database_url) as store:
                rotation = await rotate_service_key(
                    store, data_dir, PURPOSE, issuer="tucdesk-rendezvous",
                    retire_old_now=retire_old_now, now=time.time(),
                )  # fmt: skip
            grant = _grant(load_service_keys(data_dir).jwt_issuer, state.agent_id, state.team_id)
            os.kill(os.getpid(), signal.SIGHUP)
            with trio.fail_after(WAIT_SECONDS):
                gone = {old_kid} if retire_old_now else set()
                while rotation.new_key.key_id not in keys or gone & set(keys):  # noqa: ASYNC110
                    await trio.sleep(0.02)
            _verify(grant, keys, state.agent_id, state.team_id)
            # The leaked key's grants are refused at once with --retire-old-now.
            assert (old_kid in keys) is not retire_old_now
            assert client.connections == 1  # followed on the open channel, no reconnect
            nursery.cancel_scope.cancel()
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_rotations_of_purposes_the_agent_does_not_follow_do_not_stop_it_following_its_own() -> None:
    relay_key = SigningIdentity.generate()
    pinned = {"keys": [_jwk(KEY_A.public), _jwk(relay_key.public, "relay-token")]}
    statements, current = [], relay_key
    for number in range(MAX_ROTATION_STATEMENTS + 1):  # one purpose past its cap
        successor = SigningIdentity.generate()
        statements.append(rotation_statement("relay-token", current, successor.public, number))
        current = successor
    statements += [rotation_statement("audit-signer", OUTSIDER, KEY_C.public, 1)]  # not pinned
    statements.append(rotation_statement(PURPOSE, KEY_A, KEY_B.public, 999))
    outcome = follow_key_rotations(pinned, _message(statements, KEY_B))
    assert _grant_keys(outcome.service_keys) == {KEY_B.public.key_id}
    [reason] = outcome.refused  # the relay-token chain past the cap, and nothing else
    assert "relay-token" in reason and str(MAX_ROTATION_STATEMENTS) in reason


def test_the_rendezvous_sends_only_what_agents_can_still_need() -> None:
    keys = {role: SigningIdentity.generate() for role in KEY_ROLES}
    now = time.time()
    retired = []
    for role in KEY_ROLES:
        for number in range(MAX_ROTATION_STATEMENTS_PER_PURPOSE + 10):
            successor = SigningIdentity.generate()
            rotated_at = now - ROTATION_HORIZON_SECONDS - 1000 + number * 10
            retired.append(_retired(role, keys[role], successor, rotated_at))
            keys[role] = successor
    recent = [_retired(PURPOSE, keys[PURPOSE], SigningIdentity.generate(), now - 60)]
    service_keys = ServiceKeys(
        jwt_issuer=keys[PURPOSE], audit_signer=keys["audit-signer"],
        relay_token=keys["relay-token"], policy_signer=keys["policy-signer"],
        retired=(*retired, *recent),
    )  # fmt: skip
    message = service_keys_message(service_keys)
    sent = message["rotations"]
    assert {statement["purpose"] for statement in sent} == {PURPOSE}
    assert len(sent) <= MAX_ROTATION_STATEMENTS_PER_PURPOSE <= MAX_ROTATION_STATEMENTS
    assert all(statement["rotated_at"] >= now - ROTATION_HORIZON_SECONDS - 1
               for statement in sent)
    assert sent[-1] == dict(recent[0].statement)


def _retired(
    role: str, old: SigningIdentity, new: SigningIdentity, rotated_at: float
) -> RetiredKey:
    return RetiredKey(
        role, old.public, new.public.fingerprint, rotated_at, rotated_at,
        rotation_statement(role, old, new.public, rotated_at),
    )
