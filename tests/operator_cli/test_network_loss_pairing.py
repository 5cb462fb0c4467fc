"""When the relay's pairing times out, the CLI asks the rendezvous whether the agent ever took the
offer, and says so instead of blaming a healthy relay.

The agent is listed online with its channel alive but does not answer (its process is stopped
with SIGSTOP, as when its network is cut and the rendezvous has not yet timed its heartbeat out):
a real rendezvous, relay and ``tucdesk-agent`` process, and the CLI's own session code (with a
short pairing wait instead of 30 s).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from operator_cli import session_client, session_commands
from operator_cli.client import ApiError
from operator_cli.http import TransportError
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
            # The rendezvous's clock (settable here) moves on; the stopped agent's heartbeats
            # no longer come (one already sent is taken first), so it is not heard from after
            # the session is created.
            await trio.sleep(0.2)
            stack.service.clock.now += 5.0
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


def test_an_agent_heard_from_since_the_session_was_created_is_called_connected() -> None:
    # Its heartbeat came 1 s before the lookup: it is connected, it just did not take the offer.
    agents = [{"id": "agt_1", "name": "web-1", "last_seen_at": 1029.0}]
    api = _Answers({"state": "offered", "created_at": 1000.0}, agents)
    assert untaken_offer(api, _ticket(), 30.2) == (
        "agent web-1 is connected but did not take the session within 30 s"
    )
    at_creation = _Answers(
        {"state": "offered", "created_at": 1000.0},
        [{"id": "agt_1", "name": "web-1", "last_seen_at": 1000.0}],
    )
    assert "is connected" in (untaken_offer(at_creation, _ticket(), 30.0) or "")


class _ManyPages:
    """A rendezvous with 20 pages of agents whose names start with "web-1"; the target (named
    exactly so) sorts first."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def request(self, method: str, path: str, body: Any = None) -> Any:
        self.paths.append(path)
        if path.startswith("/v1/sessions/"):
            return {"state": "offered", "created_at": 1000.0}
        page = len(self.paths) - 2
        agents = [
            {"id": f"agt_{page}_{i}", "name": f"web-1{page}{i}", "last_seen_at": 990.0}
            for i in range(1000)
        ]
        if page == 0:
            agents[0] = {"id": "agt_1", "name": "web-1", "last_seen_at": 990.0}
        next_after = None if page == 19 else f"cursor-{page}"
        return {"agents": agents, "next_after": next_after, "policy_version": 0}


def test_the_agent_is_looked_up_in_one_page_of_its_name() -> None:
    api = _ManyPages()
    assert untaken_offer(api, _ticket(), 30.0) == (
        "agent web-1 did not take the session (its connection to the rendezvous may be down; "
        "last heard from 40 s ago)"
    )
    assert len(api.paths) == 2, api.paths
    assert "name=web-1" in api.paths[1]


class _Slow:
    """A rendezvous that does not answer for a long while (the CLI's read timeout is 30 s)."""

    def request(self, method: str, path: str, body: Any = None) -> Any:
        time.sleep(3.0)
        raise TransportError("read timed out")


@trio_test
async def test_a_slow_rendezvous_is_not_waited_for_past_the_lookup_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_commands, "PAIRING_TIMEOUT_LOOKUP_SECONDS", 0.3)
    explain = pairing_timeout_explainer(_Slow(), _ticket())
    started = time.monotonic()
    assert await explain() is None  # the relay's message stands
    assert time.monotonic() - started < 2.0


@trio_test
async def test_a_lookup_in_flight_does_not_hold_up_a_cancellation() -> None:
    # Ctrl-C cancels the CLI's session: the request's thread is abandoned, not waited for.
    explain = pairing_timeout_explainer(_Slow(), _ticket())
    started = time.monotonic()
    with trio.move_on_after(0.2):
        await explain()
    assert time.monotonic() - started < 2.0
