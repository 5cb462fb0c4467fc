"""The agent daemon and a real rendezvous: policy pins at enrollment, sync, and local enforcement.

The rendezvous pushes each stored bundle down the control channel; the daemon applies it, caches
it, reports the version (visible in the agent registry), and from then on enforces it itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from agent.config import AgentConfig
from agent.enrollment import EnrollmentRequest, enroll
from agent.main import run_daemon
from agent.policy_cache import policy_file_path
from agent.state_file import load_state
from protocol.control import ExitStatus
from protocol.handshake import HandshakeRefused
from protocol.identity import PublicIdentity, b64url_decode
from protocol.policy import Action, ApprovalContext, approve_request
from rendezvous.service_keys import create_missing_keys, load_service_keys
from rendezvous.store import Store, open_store
from tests.agent.session_helpers import trio_test
from tests.agent.test_session_host_daemon import MACHINE, _run_exec
from tests.relay.harness import RELAY_ID, running_relay
from tests.rendezvous.policy_support import policy_text, set_policy
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness
from tests.rendezvous.sessions_support import served_instance

WAIT_SECONDS = 15
OPERATORS_EXEC_ONLY = """
[[rules]]
id = "operators-exec"
outcome = "allow"
operators = { roles = ["operator", "admin"] }
actions = ["exec"]
"""


@trio_test
async def test_daemon_pins_admins_applies_pushed_policies_and_enforces_them(
    tmp_path: Path,
) -> None:
    create_missing_keys(tmp_path / "data")
    keys = load_service_keys(tmp_path / "data")
    async with open_store(f"sqlite:///{tmp_path / 'rv.db'}") as store:
        async with running_relay(keys.relay_token) as relay:
            assert relay.tcp_address is not None
            relays = (f"{RELAY_ID}=127.0.0.1:{relay.tcp_address[1]}",)
            async with served_instance(store, tmp_path / "data", relays=relays) as (service, url):
                team = await service.team("ops")
                admin = await service.operator(team, "admin")
                alice = await service.operator(team, "operator")
                key = (await service.registration_key(admin))["key"]
                state_file = tmp_path / "agent" / "agent.state"
                state = await enroll(EnrollmentRequest(url, key, state_file, name="web-1"), MACHINE)
                assert state.policy_trust is not None
                config = AgentConfig(state_dir=tmp_path / "agent", shell="/bin/sh")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run_daemon, config, state, MACHINE)
                    await _wait_until_online(store, team, state.agent_id)

                    # No signed policy yet: the agent lets only its pinned admins in.
                    with pytest.raises(HandshakeRefused, match="pinned at enrollment"):
                        await _exec(service, alice, ["true"])
                    assert await _exec(service, admin, ["echo", "admin"]) == b"admin\n"

                    await set_policy(service, admin, text=policy_text(1, OPERATORS_EXEC_ONLY))
                    await _wait_for_applied(store, team, state.agent_id, 1)
                    assert await _exec(service, alice, ["echo", "synced"]) == b"synced\n"

                    await set_policy(service, admin)  # version 2: the default test rules
                    await _wait_for_applied(store, team, state.agent_id, 2)
                    nursery.cancel_scope.cancel()
    cached = json.loads(policy_file_path(config.state_dir).read_bytes())
    assert cached["content"]["version"] == 2
    pins = load_state(state_file, MACHINE).policy_trust
    assert pins is not None and pins["version"] == 2


@trio_test
async def test_daemon_runs_a_high_risk_command_once_an_approver_signed_for_it(
    tmp_path: Path,
) -> None:
    create_missing_keys(tmp_path / "data")
    keys = load_service_keys(tmp_path / "data")
    command = ["sh", "-c", "echo rm -rf nothing-at-all"]  # matches the high-risk "*rm -rf*"
    async with open_store(f"sqlite:///{tmp_path / 'rv.db'}") as store:
        async with running_relay(keys.relay_token) as relay:
            assert relay.tcp_address is not None
            relays = (f"{RELAY_ID}=127.0.0.1:{relay.tcp_address[1]}",)
            async with served_instance(store, tmp_path / "data", relays=relays) as (service, url):
                team = await service.team("ops")
                admin = await service.operator(team, "admin")
                alice = await service.operator(team, "operator")
                bob = await service.operator(team, "approver")
                key = (await service.registration_key(admin))["key"]
                state_file = tmp_path / "agent" / "agent.state"
                state = await enroll(EnrollmentRequest(url, key, state_file, name="web-1"), MACHINE)
                config = AgentConfig(state_dir=tmp_path / "agent", shell="/bin/sh")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run_daemon, config, state, MACHINE)
                    await _wait_until_online(store, team, state.agent_id)
                    await set_policy(service, admin)
                    await _wait_for_applied(store, team, state.agent_id, 1)

                    body = {"target": "web-1", "mode": "exec", "command": command}
                    parked = await service.call(alice, "POST", "/v1/sessions", body)
                    assert parked.status_code == 202, parked.text
                    request_id = parked.json()["approval_request"]["id"]
                    view = (await service.call(bob, "GET", f"/v1/approvals/{request_id}")).json()
                    context = ApprovalContext(
                        request_id=view["id"], team_id=view["team_id"],
                        agent_id=view["agent"]["id"], action=Action(view["action"]),
                        command=tuple(view["command"]),
                        requester_thumbprint=view["requester_thumbprint"],
                        policy_version=view["policy_version"],
                    )
                    signed = approve_request(bob.identity, context, now=service.clock.now)
                    approved = await service.call(
                        bob, "POST", f"/v1/approvals/{request_id}/approve",
                        {"approval": signed.to_json(), "reason": "fine"},
                    )
                    assert approved.status_code == 200, approved.text
                    stdout = await _exec(
                        service, alice, command, extra={"approval_id": request_id}
                    )
                    nursery.cancel_scope.cancel()
    assert stdout == b"rm -rf nothing-at-all\n"


async def _exec(
    service: ServiceHarness,
    operator: OperatorSession,
    command: list[str],
    extra: dict[str, Any] | None = None,
) -> bytes:
    body = {"target": "web-1", "mode": "exec", "command": command, **(extra or {})}
    response = await service.call(operator, "POST", "/v1/sessions", body)
    assert response.status_code == 201, response.text
    answer = response.json()
    agent_key = PublicIdentity(b64url_decode(answer["agent"]["public_key"]))
    stdout, status = await _run_exec(answer, operator.identity, agent_key, command)
    assert status == ExitStatus(code=0)
    return stdout


async def _wait_until_online(store: Store, team_id: str, agent_id: str) -> None:
    with trio.fail_after(WAIT_SECONDS):
        while True:
            agent = await store.get_agent(team_id, agent_id)
            if agent is not None and agent.online:
                return
            await trio.sleep(0.02)


async def _wait_for_applied(store: Store, team_id: str, agent_id: str, version: int) -> None:
    """The version the agent reported, as the rendezvous stored it (what `tucdesk agents` shows)."""
    with trio.fail_after(WAIT_SECONDS):
        while True:
            agent = await store.get_agent(team_id, agent_id)
            if agent is not None and agent.policy_version == version:
                return
            await trio.sleep(0.02)
