"""When the relay's pairing times out, the CLI asks the rendezvous whether the agent ever took the
offer, and says so instead of blaming a healthy relay.

The agent is listed online with its channel alive but does not answer (its process is stopped
with SIGSTOP, as when its network is cut and the rendezvous has not yet timed its heartbeat out):
a real rendezvous, relay and ``tucdesk-agent`` process, and the CLI's own session code (with a
short pairing wait instead of 30 s).
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import trio

from operator_cli import session_client
from operator_cli.client import ApiError
from operator_cli.known_agents import KnownAgents
from operator_cli.session_client import (
    PairingTimedOut,
    SessionError,
    SessionNotices,
    SessionTicket,
    open_session,
)
from operator_cli.session_commands import pairing_timeout_explainer, untaken_offer
from protocol.control import SessionStart
from protocol.identity import SigningIdentity
from tests.agent.session_helpers import trio_test
from tests.agent.test_session_endings_daemon import Stack, _request, agent_stack, daemon_process
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness

SHORT_PAIRING_SECONDS = 2.0
SHELL_START = SessionStart("shell", (), "xterm", 24, 80)


class HarnessApi:
    """The CLI's API session (operator_cli.paged_list.ApiSession) over the test rendezvous, for
    use from a worker thread as the CLI's blocking client is."""

    def __init__(self, service: ServiceHarness, operator: OperatorSession) -> None:
        self._service = service
        self._operator = operator

    def request(self, method: str, path: str, body: Any = None) -> Any:
        response = trio.from_thread.run(self._service.call, self._operator, method, path, body)
        if response.status_code >= 400:
            error = response.json()
            raise ApiError(response.status_code, error.get("error", ""), error.get("message", ""))
        return response.json()


async def _open(stack: Stack, answer: dict[str, Any], tmp_path: Path) -> None:
    ticket = SessionTicket.from_response(answer)
    notices = SessionNotices(
        explain_pairing_timeout=pairing_timeout_explainer(
            HarnessApi(stack.service, stack.admin), ticket
        )
    )
    known = KnownAgents(tmp_path / "known_agents.json")
    session = await open_session(ticket, stack.admin.identity, known, SHELL_START, notices=notices)
    await session.close()


@trio_test
async def test_an_agent_that_never_took_the_offer_is_named_instead_of_the_relay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_client, "RELAY_PAIR_TIMEOUT_SECONDS", SHORT_PAIRING_SECONDS)
    async with agent_stack(tmp_path) as stack:
        async with daemon_process(tmp_path, stack, tmp_path / "daemon.log") as process:
            process.send_signal(signal.SIGSTOP)
            try:
                answer = await _request(stack)
                with pytest.raises(SessionError) as failed:
                    await _open(stack, answer, tmp_path)
            finally:
                process.send_signal(signal.SIGCONT)
    message = str(failed.value)
    assert not isinstance(failed.value, PairingTimedOut), message
    assert message.startswith("agent web-1 did not take the session "), message
    assert "its connection to the rendezvous may be down; last heard from " in message
    assert "relay" not in message


class _Answers:
    """A rendezvous that answers the session view and the agent list as given."""

    def __init__(self, session: dict[str, Any], agents: list[dict[str, Any]]) -> None:
        self.session = session
        self.agents = agents

    def request(self, method: str, path: str, body: Any = None) -> Any:
        if path.startswith("/v1/sessions/"):
            return self.session
        return {"agents": self.agents, "next_after": None, "policy_version": 0}


def _ticket() -> SessionTicket:
    return SessionTicket(
        "ses_1",
        0.0,
        "agt_1",
        "web-1",
        SigningIdentity.generate().public,
        "grant",
        "relay-1",
        "127.0.0.1",
        7000,
        "token",
    )


@pytest.mark.parametrize("state", ["accepted", "ended", "refused"])
def test_an_agent_that_took_the_offer_leaves_the_relays_message(state: str) -> None:
    api = _Answers({"state": state, "created_at": 100.0}, [])
    assert untaken_offer(api, _ticket(), 30.0) is None


def test_how_long_ago_the_agent_was_heard_from_is_by_the_rendezvous_clock() -> None:
    agents = [
        {"id": "agt_1", "name": "web-1", "last_seen_at": 1000.0},
        {"id": "agt_2", "name": "web-1", "last_seen_at": 1044.0},
    ]
    api = _Answers({"state": "offered", "created_at": 1040.0}, agents)
    assert untaken_offer(api, _ticket(), 30.4) == (
        "agent web-1 did not take the session (its connection to the rendezvous may be down; "
        "last heard from 70 s ago)"
    )
    never = _Answers({"state": "offered", "created_at": 1040.0}, [])
    assert untaken_offer(never, _ticket(), 1.0) == (
        "agent web-1 did not take the session (its connection to the rendezvous may be down)"
    )
