"""An audit key never speaks for an agent about what it ran: a session.started, session.command or
session.ended in an agent's name must carry the agent's own signature, while what the rendezvous
records in an agent's name (it connected, refused a session or a policy) stays valid, as a real
rendezvous writes it. ``show`` says who signed each line. Real keys, real logs, a real
rendezvous."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from audit.actions import Action, ActorKind
from audit.main import main
from audit.record import Actor
from audit.show import RecordFilter, show_records
from audit.trust import AGENT_SELF_SIGNED_ACTIONS
from audit.verify import Verdict, verify_bundle
from rendezvous.store import Store, open_store
from tests.audit.builders import (
    AGENT_ID,
    AGENT_KEY,
    AUDIT_KEY,
    export_bundle,
    new_log,
    typical_history,
)
from tests.rendezvous.policy_support import set_policy
from tests.rendezvous.sessions_support import (
    agent_channel,
    enroll_agent,
    served_instance,
    wait_for_session_state,
)

AGENT = Actor(ActorKind.AGENT, AGENT_ID, "web-1")
PIN_BY_ID = {AGENT_ID: AGENT_KEY.public.fingerprint}
# What the rendezvous records under its audit key with an agent actor (rendezvous/
# control_channel.py and routes_agents.py: grep agent_actor).
SERVICE_WRITTEN_IN_AN_AGENTS_NAME = {
    Action.REGISTRATION_KEY_USED,
    Action.AGENT_REGISTERED,
    Action.AGENT_CONNECTED,
    Action.AGENT_CLONE_ANOMALY,
    Action.AGENT_DISCONNECTED,
    Action.SESSION_REFUSED,
    Action.POLICY_REFUSED,
}


def _with_audit_signed(action: Action) -> bytes:
    """An honest history, then ``action`` in agent-1's name signed by the audit key."""
    log = new_log()

    async def build() -> None:
        await typical_history(log, commands=1)
        await log.append(
            action, AGENT, target=AGENT_ID, session_id="s-9",
            context={"command": "rm -rf /srv/evidence", "exit_code": 0},
        )  # fmt: skip

    trio.run(build)
    return export_bundle(log)


@pytest.mark.parametrize("action", sorted(AGENT_SELF_SIGNED_ACTIONS))
def test_what_an_agent_ran_signed_by_the_audit_key_is_invalid_even_with_the_agent_pinned(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: Action
) -> None:
    bundle = _with_audit_signed(action)
    result = verify_bundle(io.BytesIO(bundle), [AUDIT_KEY.public], agent_pins=PIN_BY_ID)
    assert result.verdict is Verdict.INVALID and result.bad_seq == 4, result.summary()
    assert f"{action.value} by agent {AGENT_ID} is signed by an audit key" in (result.reason or "")
    path, key = tmp_path / "e.jsonl", tmp_path / "audit.pem"
    path.write_bytes(bundle)
    key.write_bytes(AUDIT_KEY.public.to_pem())
    code = main(["show", str(path), "--key", str(key), "--agent", AGENT_ID,
                 "--agent-key", f"{AGENT_ID}={AGENT_KEY.public.fingerprint}"])  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert code == 1 and len(out) == 1 and out[0].startswith("INVALID: record 4 ")


@pytest.mark.parametrize(
    "action", sorted(SERVICE_WRITTEN_IN_AN_AGENTS_NAME - {Action.AGENT_REGISTERED})
)
def test_what_the_rendezvous_records_in_an_agents_name_stays_valid(action: Action) -> None:
    result = verify_bundle(
        io.BytesIO(_with_audit_signed(action)), [AUDIT_KEY.public], agent_pins=PIN_BY_ID
    )
    assert result.ok, result.summary()


def test_show_marks_a_service_signed_line_in_an_agents_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, key = tmp_path / "e.jsonl", tmp_path / "audit.pem"
    path.write_bytes(_with_audit_signed(Action.SESSION_REFUSED))
    key.write_bytes(AUDIT_KEY.public.to_pem())
    argv = ["show", str(path), "--key", str(key), "--agent", AGENT_ID]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    [command] = [line for line in lines if " session.command " in line]
    [refused] = [line for line in lines if " session.refused " in line]
    assert "signed_by" not in command  # the agent's own signature
    assert "by=agent:agent-1 (web-1) signed_by=service " in refused
    assert main([*argv, "--json"]) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    signed = {record["action"]: record["signed_by"] for record in records}
    assert signed["session.command"] == "agent" and signed["session.refused"] == "service"
    assert signed["agent.registered"] == "service"
    by_key = {record["signed_by"]: record["signer_key_id"] for record in records}
    assert by_key == {"agent": AGENT_KEY.public.key_id, "service": AUDIT_KEY.public.key_id}


# ---- a real rendezvous writes every kind, and its export verifies --------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    async with open_store(f"sqlite:///{tmp_path / 'rendezvous.db'}") as opened:
        yield opened


@pytest.mark.anyio
async def test_a_real_rendezvous_log_verifies_with_the_agent_pinned_by_id(
    store: Store, tmp_path: Path
) -> None:
    async with served_instance(store, tmp_path / "data") as (service, url):
        team = await service.team("ops")
        admin = await service.operator(team, "admin")
        agent = await enroll_agent(service, admin)
        async with agent_channel(url, agent) as channel:
            refused = (await service.call(admin, "POST", "/v1/sessions",
                                          {"target": "web-1", "mode": "shell"})).json()  # fmt: skip
            await channel.receive("session_offer")
            await channel.send({"type": "session_offer_refused", "reason": "no shells",
                                "session_id": refused["session_id"]})  # fmt: skip
            await wait_for_session_state(service, admin, refused["session_id"], "refused")
            ran = (await service.call(admin, "POST", "/v1/sessions",
                                      {"target": "web-1", "mode": "exec",
                                       "command": ["id"]})).json()  # fmt: skip
            await channel.receive("session_offer")
            await channel.send({"type": "session_offer_ack", "session_id": ran["session_id"]})
            for number, action in enumerate(sorted(AGENT_SELF_SIGNED_ACTIONS)):
                answer = await channel.send_event(
                    action, session_id=ran["session_id"], context={"command": "id"},
                    event_id=f"e{number}",
                )  # fmt: skip
                assert answer["type"] == "audit_event_ack", answer
            await set_policy(service, admin)
            bundle = await channel.receive("policy_bundle")
            version = bundle["bundle"]["content"]["version"]
            await channel.send({"type": "policy_refused", "version": version, "reason": "no"})
            await channel.send({"type": "heartbeat"})  # the answers before it were handled
            await channel.ws.get_message()
        with trio.fail_after(10):  # recorded as the server's end of the channel closes
            for _ in range(1000):
                if "agent.disconnected" in await service.audit_actions(team):
                    break
                await trio.sleep(0.01)
        exported = io.BytesIO()
        await service.ctx.audit.export_to(team, exported)
        audit_key = service.ctx.audit.audit_key
    pins = {agent.agent_id: agent.identity.public.fingerprint}
    shown = show_records(
        io.BytesIO(exported.getvalue()), [audit_key], RecordFilter(agent=agent.agent_id),
        agent_pins=pins,
    )  # fmt: skip
    assert shown.verification.ok, shown.verification.summary()
    in_its_name = {
        (record.action, record.signed_by)
        for record in shown.records
        if record.actor_kind == ActorKind.AGENT.value
    }
    by_agent = {(action.value, "agent") for action in AGENT_SELF_SIGNED_ACTIONS}
    by_service = {
        (action.value, "service")
        for action in SERVICE_WRITTEN_IN_AN_AGENTS_NAME - {Action.AGENT_CLONE_ANOMALY}
    }
    assert in_its_name == by_agent | by_service
