"""Local policy enforcement on real sessions: through a relay, with the real handshake.

The operator learns the agent's reason in handshake message 4, the refusal is audited as
``session.refused``, approvals bound to one command run exactly that command, and an agent with
no rendezvous at all keeps enforcing the policy it cached.
"""

from __future__ import annotations

import time
from pathlib import Path

import trio

from agent.config import AgentConfig
from agent.machine_identity import MachineIdentifiers
from agent.main import load_policy_cache
from agent.policy_cache import PolicyCache
from agent.state_file import AgentState, load_state, save_state
from audit.actions import Action as AuditAction
from audit.actions import PolicyOutcome
from protocol.control import ExitStatus
from protocol.identity import SigningIdentity
from protocol.policy import Action as PolicyAction
from protocol.policy import ApprovalContext, PinnedPolicyTrust, Role, approve_request
from tests.agent.policy_support import make_bundle
from tests.agent.session_helpers import trio_test
from tests.agent.test_session_host import (
    AGENT_ID,
    TEAM_ID,
    exec_start,
    operator_session,
    refusal_for,
    session_stack,
    wait_for_sessions_to_end,
)

POLICY_SIGNER = SigningIdentity.generate()
ADMIN = SigningIdentity.generate()
ALICE = SigningIdentity.generate()
BOB = SigningIdentity.generate()
MACHINE = MachineIdentifiers(machine_id="0123456789abcdef0123456789abcdef")
MEMBERS = {
    ADMIN: ("admin@example.test", Role.ADMIN),
    ALICE: ("alice@example.test", Role.OPERATOR),
    BOB: ("bob@example.test", Role.APPROVER),
}
POLICY_BODY = """
high_risk = ["*rm -rf*"]

[[rules]]
id = "operators-exec-on-web"
outcome = "allow"
operators = { roles = ["operator"] }
agents = { tags = ["web"] }
actions = ["exec"]

[[rules]]
id = "no-shell-for-operators"
outcome = "deny"
operators = { roles = ["operator"] }
actions = ["shell"]
"""


def pins() -> PinnedPolicyTrust:
    return PinnedPolicyTrust.at_enrollment(TEAM_ID, [ADMIN.public], POLICY_SIGNER.public)


def signed_cache(tmp_path: Path) -> PolicyCache:
    cache = PolicyCache(pins(), None, tmp_path / "policy.json", lambda trust: None)
    cache.apply(
        make_bundle(
            team_id=TEAM_ID, version=1, body=POLICY_BODY, members=MEMBERS, signer=ADMIN,
            policy_signer=POLICY_SIGNER, agent_tags={AGENT_ID: ["web"]},
        ).to_json()
    )
    return cache


@trio_test
async def test_operator_is_told_why_the_agent_refused_and_the_refusal_is_audited(
    tmp_path: Path,
) -> None:
    async with session_stack(tmp_path, cache=signed_cache(tmp_path)) as stack:
        async with trio.open_nursery() as nursery:
            reason = await refusal_for(
                stack, nursery, operator=ALICE, mode="shell", policy_version=1
            )
            await wait_for_sessions_to_end(stack)
    assert "denied by policy version 1 (rule no-shell-for-operators)" in reason
    assert stack.actions() == [AuditAction.SESSION_REFUSED]
    refused = stack.audit[0].event
    assert refused.policy_result is not None and refused.policy_result.reason == reason
    assert refused.context["operator_key_fingerprint"] == ALICE.public.fingerprint


@trio_test
async def test_approved_high_risk_command_runs_and_its_approval_fits_no_other_command(
    tmp_path: Path,
) -> None:
    command = ("sh", "-c", "echo rm -rf nothing-really")
    context = ApprovalContext(
        request_id="apr_42", team_id=TEAM_ID, agent_id=AGENT_ID, action=PolicyAction.EXEC,
        command=command, requester_thumbprint=ALICE.public.key_id, policy_version=1,
    )
    approval = approve_request(BOB, context, now=time.time()).to_json()
    async with session_stack(tmp_path, cache=signed_cache(tmp_path)) as stack:
        async with trio.open_nursery() as nursery:
            unapproved = await refusal_for(
                stack, nursery, operator=ALICE, command=command, policy_version=1,
                session_id="ses_plain",
            )
            other = ("sh", "-c", "echo rm -rf everything")
            replayed = await refusal_for(
                stack, nursery, operator=ALICE, command=other, policy_version=1,
                approval=approval, session_id="ses_replay",
            )
            async with operator_session(
                stack, nursery, operator=ALICE, command=command, policy_version=1,
                approval=approval, session_id="ses_approved",
            ) as operator:
                await operator.start(exec_start(*command))
                await operator.until_closed()
            await wait_for_sessions_to_end(stack)
    assert "requires approval (rule high_risk)" in unapproved
    assert "approval is for another command" in replayed
    assert bytes(operator.stdout) == b"rm -rf nothing-really\n"
    assert operator.exit_status() == ExitStatus(code=0)
    started = [e.event for e in stack.audit if e.event.action is AuditAction.SESSION_STARTED]
    assert [event.session_id for event in started] == ["ses_approved"]
    assert started[0].policy_result is not None
    assert started[0].policy_result.outcome is PolicyOutcome.APPROVED
    assert started[0].policy_result.rule_id == "high_risk"
    assert started[0].context["approval_request_id"] == "apr_42"
    assert started[0].context["policy_version"] == 1


@trio_test
async def test_agent_cut_off_from_the_rendezvous_keeps_enforcing_its_cached_policy(
    tmp_path: Path,
) -> None:
    # Enrolled and synced earlier: the sealed state pins version 1, policy.json holds it.
    config = AgentConfig(state_dir=tmp_path / "agent")
    state = AgentState(
        agent_id=AGENT_ID, team_id=TEAM_ID, server_url="http://127.0.0.1:9",
        identity_seed=bytes(32), name="web-1", policy_trust=pins().to_json(),
    )
    save_state(config.state_file, state, MACHINE)
    online = load_policy_cache(config, state, MACHINE)
    online.apply(
        make_bundle(
            team_id=TEAM_ID, version=1, body=POLICY_BODY, members=MEMBERS, signer=ADMIN,
            policy_signer=POLICY_SIGNER, agent_tags={AGENT_ID: ["web"]},
        ).to_json()
    )
    # A restart with no rendezvous anywhere (the server URL is a closed port): only the disk.
    offline = load_policy_cache(config, load_state(config.state_file, MACHINE), MACHINE)
    assert offline.version == 1
    async with session_stack(tmp_path, cache=offline) as stack:
        async with trio.open_nursery() as nursery:
            async with operator_session(
                stack, nursery, operator=ALICE, command=("echo", "still-enforcing"),
                policy_version=1,
            ) as operator:
                await operator.start(exec_start("echo", "still-enforcing"))
                await operator.until_closed()
            denied = await refusal_for(
                stack, nursery, operator=ALICE, mode="shell", session_id="ses_2"
            )
            outsider = await refusal_for(
                stack, nursery, operator=SigningIdentity.generate(), session_id="ses_3"
            )
            await wait_for_sessions_to_end(stack)
    assert bytes(operator.stdout) == b"still-enforcing\n"
    assert "no-shell-for-operators" in denied
    assert "not in the team roster signed by an admin" in outsider
