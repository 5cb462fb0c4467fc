"""Every session ends in the list and in the audit log, with the real agent daemon, relay and
rendezvous: a shell running while the daemon is stopped with SIGTERM (as a service restart
does), a daemon killed with SIGKILL mid-session and started again, and a session the agent
refuses after it took the offer."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from agent.config import AgentConfig
from agent.enrollment import EnrollmentRequest, enroll
from agent.event_spool import EventSpool
from agent.main import run_daemon
from agent.session_host import FrameLink
from agent.state_file import AgentState
from protocol.control import SessionStart, encode_control
from protocol.errors import ProtocolError
from protocol.frames import FrameType
from protocol.handshake import OperatorHandshake, pin_agent_key
from protocol.identity import PublicIdentity, SigningIdentity, b64url_decode
from relay.client import connect_tcp
from rendezvous.service_keys import create_missing_keys, load_service_keys
from rendezvous.store import Store, open_store
from tests.agent.session_helpers import trio_test
from tests.agent.test_control_client import AGENT_COMMAND, MACHINE, daemon_options
from tests.relay.harness import RELAY_ID, running_relay
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness
from tests.rendezvous.sessions_support import served_instance

WAIT_SECONDS = 15


@dataclass
class Stack:
    """A rendezvous and a relay, agent ``web-1`` enrolled in ``agent_dir`` for MACHINE."""

    store: Store
    service: ServiceHarness
    admin: OperatorSession
    state: AgentState
    agent_dir: Path


@asynccontextmanager
async def agent_stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """A rendezvous on SQLite and a relay running, agent ``web-1`` enrolled (not started)."""
    create_missing_keys(tmp_path / "data")
    keys = load_service_keys(tmp_path / "data")
    async with (
        open_store(f"sqlite:///{tmp_path / 'rv.db'}") as store,
        running_relay(keys.relay_token) as relay,
    ):
        assert relay.tcp_address is not None
        relays = (f"{RELAY_ID}=127.0.0.1:{relay.tcp_address[1]}",)
        async with served_instance(store, tmp_path / "data", relays=relays) as (service, url):
            team = await service.team("ops")
            admin = await service.operator(team, "admin")
            key = (await service.registration_key(admin))["key"]
            agent_dir = tmp_path / "agent"
            state = await enroll(
                EnrollmentRequest(url, key, agent_dir / "agent.state", name="web-1"), MACHINE
            )
            yield Stack(store, service, admin, state, agent_dir)


@asynccontextmanager
async def daemon_process(tmp_path: Path, stack: Stack, log: Path) -> AsyncIterator[trio.Process]:
    """``tucdesk-agent run`` on the stack's agent, killed on the way out if still running."""
    common, environment = daemon_options(tmp_path, stack.agent_dir)
    with log.open("ab") as handle:
        process = await trio.lowlevel.open_process(
            [AGENT_COMMAND, "run", "--shell", "/bin/sh", *common],
            env=environment, stdout=subprocess.DEVNULL, stderr=handle,
        )  # fmt: skip
    try:
        await _wait_online(stack, process)
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def _wait_online(stack: Stack, process: trio.Process | None = None) -> None:
    with trio.fail_after(WAIT_SECONDS):
        while True:
            assert process is None or process.poll() is None, "the daemon exited"
            agent = await stack.store.get_agent(stack.state.team_id, stack.state.agent_id)
            if agent is not None and agent.online:
                return
            await trio.sleep(0.05)  # another process writes the row: nothing to wait on


async def _request(stack: Stack, mode: str = "shell") -> dict[str, Any]:
    body: dict[str, Any] = {"target": "web-1", "mode": mode}
    if mode == "exec":
        body["command"] = ["true"]
    response = await stack.service.call(stack.admin, "POST", "/v1/sessions", body)
    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def _open_shell(answer: dict[str, Any], operator: SigningIdentity) -> trio.abc.Stream:
    """The operator's side: relay, handshake, SessionStart for a shell; the open stream."""
    relay = answer["relay"]
    agent_key = PublicIdentity(b64url_decode(answer["agent"]["public_key"]))
    stream = await connect_tcp(relay["host"], relay["port"], answer["relay_token"])
    link = FrameLink(stream)
    handshake = OperatorHandshake(
        operator, answer["session_id"], answer["grant"], pin_agent_key(agent_key),
        deadline=time.monotonic() + WAIT_SECONDS,
    )  # fmt: skip
    with trio.fail_after(WAIT_SECONDS):
        await link.send(handshake.start(time.monotonic()))
        hello = await link.receive()
        assert hello is not None
        auth = handshake.receive(hello, time.monotonic())
        assert auth is not None
        await link.send(auth)
        result = await link.receive()
        assert result is not None
        handshake.receive(result, time.monotonic())
        channel = handshake.channel(time.monotonic())
        start = SessionStart("shell", (), "xterm", 24, 80)
        await link.send(channel.seal(FrameType.CONTROL, encode_control(start), time.monotonic()))
    return stream


async def _session(stack: Stack, session_id: str) -> tuple[str, str | None]:
    session = await stack.store.get_session(stack.state.team_id, session_id)
    assert session is not None
    return session.state.value, session.state_reason


async def _wait_state(stack: Stack, session_id: str, state: str) -> tuple[str, str | None]:
    with trio.fail_after(WAIT_SECONDS):
        while (found := await _session(stack, session_id))[0] != state:  # noqa: ASYNC110 - a row
            await trio.sleep(0.05)
    return found


async def _events(stack: Stack, session_id: str, action: str) -> list[dict[str, Any]]:
    events = await stack.service.audit_events(stack.state.team_id, action)
    return [event for event in events if event["session_id"] == session_id]


async def _wait_event(stack: Stack, session_id: str, action: str) -> None:
    with trio.fail_after(WAIT_SECONDS):
        while not await _events(stack, session_id, action):  # noqa: ASYNC110 - a log record
            await trio.sleep(0.05)


@trio_test
async def test_a_shell_running_when_the_daemon_gets_sigterm_ends_in_the_log_and_the_list(
    tmp_path: Path,
) -> None:
    async with agent_stack(tmp_path) as stack:
        log = tmp_path / "daemon.log"
        async with daemon_process(tmp_path, stack, log) as process:
            answer = await _request(stack)
            session_id = answer["session_id"]
            stream = await _open_shell(answer, stack.admin.identity)
            async with stream:
                await _wait_event(stack, session_id, "session.started")
                assert await _session(stack, session_id) == ("accepted", None)
                process.send_signal(signal.SIGTERM)
                with trio.fail_after(WAIT_SECONDS):
                    assert await process.wait() == 0
        # Without a restart: the stopping daemon delivered the end before it closed.
        ended = await _events(stack, session_id, "session.ended")
        assert [event["actor"]["kind"] for event in ended] == ["agent"], log.read_text()
        assert ended[0]["context"]["reason"] == "shutdown"
        assert await _session(stack, session_id) == ("ended", "shutdown")
        assert EventSpool(stack.agent_dir / "audit-spool").load() == []


@trio_test
async def test_a_shell_a_killed_daemon_left_ends_as_agent_lost_when_the_daemon_comes_back(
    tmp_path: Path,
) -> None:
    async with agent_stack(tmp_path) as stack:
        log = tmp_path / "daemon.log"
        async with daemon_process(tmp_path, stack, log) as process:
            answer = await _request(stack)
            session_id = answer["session_id"]
            stream = await _open_shell(answer, stack.admin.identity)
            async with stream:
                await _wait_event(stack, session_id, "session.started")
                process.send_signal(signal.SIGKILL)
                await process.wait()
        assert await _session(stack, session_id) == ("accepted", None)
        async with daemon_process(tmp_path, stack, log):
            found = await _wait_state(stack, session_id, "ended")
            assert found == ("ended", "agent_lost")
            # The restarted daemon's own sessions are untouched by its report.
            answer = await _request(stack)
            stream = await _open_shell(answer, stack.admin.identity)
            async with stream:
                await _wait_event(stack, answer["session_id"], "session.started")
                assert await _session(stack, answer["session_id"]) == ("accepted", None)
        ended = await _events(stack, session_id, "session.ended")
        assert len(ended) == 1
        assert ended[0]["actor"]["kind"] == "service"
        assert ended[0]["context"]["reason"] == "agent_lost"


@trio_test
async def test_a_session_the_agent_refuses_after_taking_the_offer_is_refused_in_the_list(
    tmp_path: Path,
) -> None:
    async with agent_stack(tmp_path) as stack:
        config = AgentConfig(state_dir=stack.agent_dir, shell="/bin/sh")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_daemon, config, stack.state, MACHINE)
            await _wait_online(stack)
            answer = await _request(stack, "exec")
            session_id = answer["session_id"]
            # Someone else's key with the admin's grant: the agent's grant check refuses it.
            try:
                stream = await _open_shell(answer, SigningIdentity.generate())
                await stream.aclose()
            except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            state, reason = await _wait_state(stack, session_id, "refused")
            nursery.cancel_scope.cancel()
        assert reason is not None and "grant" in reason, reason
        refused = await _events(stack, session_id, "session.refused")
        assert [event["actor"]["kind"] for event in refused] == ["agent"]
