"""The agent daemon wired up (run_daemon) with a real rendezvous and relay: a session requested
through POST /v1/sessions reaches the agent, runs, and its agent-signed audit trail lands in the
team's log."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from agent.config import AgentConfig
from agent.enrollment import EnrollmentRequest, enroll
from agent.machine_identity import MachineIdentifiers
from agent.main import run_daemon
from agent.session_host import FrameLink
from agent.state_file import AgentState
from protocol.control import ExitStatus, SessionStart, decode_control, encode_control
from protocol.frames import FrameType
from protocol.handshake import OperatorHandshake, pin_agent_key
from protocol.identity import PublicIdentity, SigningIdentity, b64url_decode
from relay.client import connect_tcp
from rendezvous.service_keys import create_missing_keys, load_service_keys
from rendezvous.store import Store, open_store
from tests.agent.session_helpers import trio_test
from tests.relay.harness import RELAY_ID, running_relay
from tests.rendezvous.service_harness import OperatorSession, ServiceHarness
from tests.rendezvous.sessions_support import served_instance

WAIT_SECONDS = 15
MACHINE = MachineIdentifiers(machine_id="00112233445566778899aabbccddeeff")


@trio_test
async def test_session_requested_from_the_rendezvous_runs_on_the_daemon_and_is_audited(
    tmp_path: Path,
) -> None:
    async with enrolled_agent_stack(tmp_path) as stack:
        store, service, admin, state = stack.store, stack.service, stack.admin, stack.state
        team = state.team_id
        config = AgentConfig(state_dir=tmp_path / "agent", shell="/bin/sh")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_daemon, config, state, MACHINE)
            with trio.fail_after(WAIT_SECONDS):
                while not await _online(store, team, state.agent_id):  # noqa: ASYNC110
                    await trio.sleep(0.02)
            command = ["sh", "-c", "echo from-the-agent; exit 4"]
            body = {"target": "web-1", "mode": "exec", "command": command}
            response = await service.call(admin, "POST", "/v1/sessions", body)
            assert response.status_code == 201, response.text
            answer = response.json()
            agent_key = PublicIdentity(b64url_decode(answer["agent"]["public_key"]))
            assert agent_key == state.identity().public
            stdout, status = await _run_exec(answer, admin.identity, agent_key, command)
            assert stdout == b"from-the-agent\n"
            assert status == ExitStatus(code=4)

            session_id = answer["session_id"]
            expected = ["session.started", "session.command", "session.ended"]
            with trio.fail_after(WAIT_SECONDS):
                agent_events = await _agent_actions(store, team, session_id)
                while agent_events != expected:
                    await trio.sleep(0.05)
                    agent_events = await _agent_actions(store, team, session_id)
            nursery.cancel_scope.cancel()
        session = await store.get_session(team, session_id)
        assert session is not None and session.state.value == "ended"
    assert agent_events == expected


@dataclass
class EnrolledAgentStack:
    """A rendezvous (``service`` on ``store``) and a relay, with agent ``web-1`` of team ``ops``
    enrolled (``state``) and the team's ``admin``."""

    store: Store
    service: ServiceHarness
    admin: OperatorSession
    state: AgentState


@asynccontextmanager
async def enrolled_agent_stack(tmp_path: Path) -> AsyncIterator[EnrolledAgentStack]:
    """A rendezvous on SQLite and a relay running, agent ``web-1`` enrolled into
    ``tmp_path/agent`` (its daemon not started)."""
    # The relay trusts the rendezvous's relay-token key, made before either starts.
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
            state = await enroll(
                EnrollmentRequest(url, key, tmp_path / "agent" / "agent.state", name="web-1"),
                MACHINE,
            )
            yield EnrolledAgentStack(store, service, admin, state)


async def _online(store: Store, team_id: str, agent_id: str) -> bool:
    agent = await store.get_agent(team_id, agent_id)
    return agent is not None and agent.online


async def _run_exec(
    answer: dict[str, Any], operator: SigningIdentity, agent_key: PublicIdentity,
    command: list[str],
) -> tuple[bytes, ExitStatus | None]:
    """The operator's side of an exec session, by hand: handshake, start, read to CLOSE."""
    relay = answer["relay"]
    stream = await connect_tcp(relay["host"], relay["port"], answer["relay_token"])
    stdout = bytearray()
    status: ExitStatus | None = None
    async with stream:
        link = FrameLink(stream)
        handshake = OperatorHandshake(
            operator, answer["session_id"], answer["grant"], pin_agent_key(agent_key),
            deadline=time.monotonic() + WAIT_SECONDS,
        )
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
            start = SessionStart("exec", tuple(command), "xterm", 24, 80)
            await link.send(
                channel.seal(FrameType.CONTROL, encode_control(start), time.monotonic())
            )
            while (message := await link.receive()) is not None:
                frame = channel.open(message, time.monotonic())
                if frame.type is FrameType.STDOUT:
                    stdout += frame.payload
                elif frame.type is FrameType.CONTROL:
                    control = decode_control(frame.payload)
                    if isinstance(control, ExitStatus):
                        status = control
                elif frame.type is FrameType.CLOSE:
                    break
    return bytes(stdout), status


async def _agent_actions(store: Store, team_id: str, session_id: str) -> list[str]:
    """Actions the agent itself signed for ``session_id``, in log order."""
    records = await store.audit.read_records(team_id, 0, 10_000)
    events = [json.loads(record.canonical)["event"] for record in records]
    return [
        event["action"] for event in events
        if event["session_id"] == session_id and event["actor"]["kind"] == "agent"
    ]

