"""The agent's grant check and the operator's agent-key pin, against the real running stack.

A real session is requested from the rendezvous; then the operator's side (the CLI's own
session code) presents a substituted grant at the relay. Forged, expired, other-agent, other-
session and other-operator grants are each refused by the agent with a reason the operator sees,
while the genuine grant (the control case) runs the command. A swapped agent key is refused by
the CLI loudly, before anything runs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import trio

from operator_cli.client import Session
from operator_cli.exec_command import exec_start
from operator_cli.home import CliHome
from operator_cli.known_agents import KnownAgents
from operator_cli.session_client import (
    Closed,
    Exited,
    Output,
    SessionRefused,
    SessionTicket,
    open_session,
    request_session,
)
from protocol.identity import SigningIdentity
from protocol.session_grant import issue_session_grant
from protocol.tokens import SESSION_GRANT_TYPE
from rendezvous.service_keys import load_service_keys
from tests.stack.conftest import TappedStack

pytestmark = pytest.mark.slow

SESSION_TIMEOUT_SECONDS = 40
COMMAND = ("echo", "the command ran")
_CLAIMS_SET_BY_ISSUE = ("iss", "aud", "iat", "exp", "sub", "jti")


def request_ticket(stack: TappedStack) -> SessionTicket:
    api = Session.from_home(CliHome(stack.cli_home))
    try:
        return request_session(api, stack.agent_name, "exec", list(COMMAND))
    finally:
        api.close()


def present_grant(stack: TappedStack, ticket: SessionTicket, grant: str) -> bytes:
    """Run the operator side with ``grant``; the command's stdout, or SessionRefused."""
    output, _ = present_grant_and_end(stack, ticket, grant)
    return output


def present_grant_and_end(
    stack: TappedStack, ticket: SessionTicket, grant: str
) -> tuple[bytes, Exited | Closed | None]:
    """Run the operator side with ``grant``: (stdout, how it ended), or SessionRefused."""
    identity = CliHome(stack.cli_home).load_key()
    assert identity is not None
    known_agents = KnownAgents.in_home(stack.cli_home)

    async def run() -> tuple[bytes, Exited | Closed | None]:
        with trio.fail_after(SESSION_TIMEOUT_SECONDS):
            session = await open_session(
                dataclasses.replace(ticket, grant=grant), identity, known_agents,
                exec_start(COMMAND),
            )  # fmt: skip
            output = bytearray()
            try:
                while True:
                    event = await session.receive()
                    if isinstance(event, Output):
                        output += event.data
                    elif isinstance(event, Exited | Closed) or event is None:
                        return bytes(output), event
            finally:
                await session.close()

    return trio.run(run)


def genuine_claims(ticket: SessionTicket) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(ticket.grant, options={"verify_signature": False})
    return claims


def mint(signer: SigningIdentity, claims: dict[str, Any], **changes: Any) -> str:
    """A grant with ``claims`` (as the rendezvous minted them) except for ``changes``."""
    merged = {**claims, **changes}
    return issue_session_grant(
        signer,
        issuer=merged["iss"],
        session_id=merged["sid"],
        team_id=merged["team_id"],
        agent_id=merged["agent_id"],
        operator_id=merged["operator"]["id"],
        operator_email=merged["operator"]["email"],
        role=merged["role"],
        operator_key_thumbprint=merged["cnf"]["jkt"],
        mode=merged["mode"],
        command=merged["command"],
        policy_result=merged["policy"]["result"],
        policy_rule_id=merged["policy"]["rule_id"],
        policy_version=merged["policy"]["version"],
        approval=merged["approval"],
        now=merged.get("now", time.time()),
    )


def issuer_key(stack: TappedStack) -> SigningIdentity:
    return load_service_keys(stack.data_dir).jwt_issuer


def test_the_genuine_grant_is_accepted_and_the_command_runs(stack: TappedStack) -> None:
    ticket = request_ticket(stack)
    assert present_grant(stack, ticket, ticket.grant) == b"the command ran\n"


def test_a_grant_reminted_with_the_rendezvous_key_is_accepted(stack: TappedStack) -> None:
    # The control for the refusals below: minting itself is not what makes them fail.
    ticket = request_ticket(stack)
    grant = mint(issuer_key(stack), genuine_claims(ticket))
    assert present_grant(stack, ticket, grant) == b"the command ran\n"


def _forged_with_random_key(stack: TappedStack, claims: dict[str, Any]) -> str:
    return mint(SigningIdentity.generate(), claims)


def _forged_under_the_real_key_id(stack: TappedStack, claims: dict[str, Any]) -> str:
    # Claims the rendezvous key's kid, but is signed by another key.
    real_kid = issuer_key(stack).public.key_id
    payload = {**claims, "iat": int(time.time()), "exp": int(time.time()) + 60}
    return jwt.encode(
        payload, SigningIdentity.generate().to_cryptography(), algorithm="EdDSA",
        headers={"kid": real_kid, "typ": SESSION_GRANT_TYPE},
    )  # fmt: skip


def _expired(stack: TappedStack, claims: dict[str, Any]) -> str:
    return mint(issuer_key(stack), claims, now=time.time() - 600)


def _for_another_agent(stack: TappedStack, claims: dict[str, Any]) -> str:
    return mint(issuer_key(stack), claims, agent_id="agt_someoneelse")


def _for_another_team(stack: TappedStack, claims: dict[str, Any]) -> str:
    return mint(issuer_key(stack), claims, team_id="team_someoneelse")


def _for_another_session(stack: TappedStack, claims: dict[str, Any]) -> str:
    return mint(issuer_key(stack), claims, sid="ses_someoneelse")


def _for_another_operator_key(stack: TappedStack, claims: dict[str, Any]) -> str:
    other = SigningIdentity.generate().public.key_id
    return mint(issuer_key(stack), claims, cnf={"jkt": other})


BAD_GRANTS: dict[str, tuple[Callable[[TappedStack, dict[str, Any]], str], tuple[str, ...]]] = {
    "forged-with-a-random-key": (_forged_with_random_key, ()),
    "forged-under-the-real-key-id": (_forged_under_the_real_key_id, ()),
    "expired": (_expired, ("expired",)),
    "for-another-agent": (_for_another_agent, ("another agent",)),
    "for-another-team": (_for_another_team, ("team",)),
    "for-another-session": (_for_another_session, ("session",)),
    "for-another-operator-key": (_for_another_operator_key, ("operator key",)),
}


@pytest.mark.parametrize("kind", list(BAD_GRANTS))
def test_a_bad_grant_is_refused_with_a_reason_the_operator_sees(
    stack: TappedStack, kind: str
) -> None:
    make, reason_words = BAD_GRANTS[kind]
    ticket = request_ticket(stack)
    grant = make(stack, genuine_claims(ticket))
    with pytest.raises(SessionRefused) as refused:
        present_grant(stack, ticket, grant)
    message = str(refused.value)
    assert "refused" in message
    for word in reason_words:
        assert word in message
    assert "the command ran" not in message


def test_a_swapped_agent_key_is_refused_loudly_before_anything_runs(
    stack: TappedStack, tmp_path: Path
) -> None:
    home = stack.cli_home
    marker = tmp_path / "ran"
    assert stack.run_tucdesk("exec", stack.agent_name, "--", "true").returncode == 0
    agent = stack.find_agent()
    assert agent is not None
    known_agents = KnownAgents.in_home(home)
    genuine = known_agents.pinned_key(agent.id)
    assert genuine is not None, "the first session should have pinned the agent's key"
    impostor = SigningIdentity.generate().public
    known_agents.trust(agent.id, impostor)  # as if the pinned key were the real one
    try:
        completed = stack.run_tucdesk("exec", stack.agent_name, "--", "touch", str(marker))
        assert completed.returncode != 0
        error = completed.stderr.decode()
        assert "has changed" in error
        assert impostor.fingerprint in error and genuine.fingerprint in error
        assert f"tucdesk agents trust {agent.id}" in error or "agents trust" in error
        assert not marker.exists()
    finally:
        known_agents.trust(agent.id, genuine)
    assert stack.run_tucdesk("exec", stack.agent_name, "--", "true").returncode == 0


def test_a_grant_for_another_command_is_accepted_but_the_command_is_refused(
    stack: TappedStack,
) -> None:
    ticket = request_ticket(stack)
    grant = mint(issuer_key(stack), genuine_claims(ticket), command=["id"])
    output, ending = present_grant_and_end(stack, ticket, grant)
    assert b"the command ran" not in output
    assert isinstance(ending, Closed) and ending.reason is not None
    assert ending.reason.reason == "policy-denied"
