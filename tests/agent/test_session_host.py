"""The agent's session host end to end through a real relay, with the operator side driven by hand.

The relay runs in-process (relay.server.Relay on loopback). Grants and relay tokens are minted
with test service keys exactly as the rendezvous mints them; the operator runs the real
OperatorHandshake and SecureChannel over relay.client.connect_tcp.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from agent import session_host
from agent.audit_events import SessionAuditor
from agent.config import AgentConfig
from agent.errors import OfferError
from agent.grant_policy import GrantPolicy
from agent.policy_cache import PolicyCache
from agent.session_host import (
    MAX_FRAMES_WITHOUT_YIELD,
    FrameLink,
    SessionHost,
    SessionIdentity,
    SessionOffer,
)
from audit.actions import Action
from audit.record import SignedEvent
from protocol.control import (
    Close,
    ExitStatus,
    Keepalive,
    Resize,
    SessionStart,
    Signal,
    decode_control,
    encode_control,
)
from protocol.errors import HandshakeError
from protocol.frames import MAX_FRAME_PAYLOAD, FrameType, SecureChannel
from protocol.handshake import HandshakeRefused, OperatorHandshake, pin_agent_key
from protocol.identity import SigningIdentity
from protocol.policy import PinnedPolicyTrust
from protocol.relay_token import Side
from protocol.session_grant import issue_session_grant
from protocol.stream_framing import encode_stream_frame
from relay.client import acquire_at_once, connect_tcp
from relay.server import Relay
from tests.agent.session_helpers import trio_test
from tests.relay.harness import make_token, running_relay

ISSUER = "tucdesk-rendezvous"
AGENT_ID = "agt_test1"
TEAM_ID = "tm_test1"
WAIT_SECONDS = 15
# The team has signed no policy, so only pinned admins may open sessions: this operator is one.
OPERATOR = SigningIdentity.generate()
POLICY_SIGNER = SigningIdentity.generate()


@dataclass
class Stack:
    """A relay, a session host for one agent, and the service keys that mint for them."""

    relay: Relay
    host: SessionHost
    agent: SigningIdentity
    grant_signer: SigningIdentity
    relay_signer: SigningIdentity
    control: list[dict[str, Any]] = field(default_factory=list)
    audit: list[SignedEvent] = field(default_factory=list)

    @property
    def relay_port(self) -> int:
        assert self.relay.tcp_address is not None
        return self.relay.tcp_address[1]

    def actions(self) -> list[Action]:
        return [event.event.action for event in self.audit]


def admin_only_cache(tmp_path: Path) -> PolicyCache:
    """No signed policy yet; OPERATOR is the pinned admin."""
    trust = PinnedPolicyTrust.at_enrollment(TEAM_ID, [OPERATOR.public], POLICY_SIGNER.public)
    return PolicyCache(trust, None, tmp_path / "policy.json", lambda trust: None)


@asynccontextmanager
async def session_stack(
    tmp_path: Path,
    *,
    cache: PolicyCache | None = None,
    grant_signer: SigningIdentity | None = None,
    **config: Any,
) -> AsyncIterator[Stack]:
    """A relay and a session host; ``cache`` is the agent's policy (default: admin-only)."""
    relay_signer = SigningIdentity.generate()
    grant_signer = grant_signer or SigningIdentity.generate()
    agent = SigningIdentity.generate()
    control: list[dict[str, Any]] = []
    audit: list[SignedEvent] = []
    host = SessionHost(
        AgentConfig(state_dir=tmp_path, **config),
        agent,
        SessionIdentity(AGENT_ID, TEAM_ID, {grant_signer.public.key_id: grant_signer.public}),
        SessionAuditor(agent, AGENT_ID, TEAM_ID, "web-1"),
        send_control=control.append,
        audit_sink=audit.append,
        issuer=lambda: ISSUER,
        policy=GrantPolicy(cache or admin_only_cache(tmp_path), AGENT_ID, TEAM_ID, "web-1"),
    )
    async with running_relay(relay_signer, idle_timeout=30.0) as relay:
        yield Stack(relay, host, agent, grant_signer, relay_signer, control, audit)


def mint_grant(
    stack: Stack,
    operator: SigningIdentity,
    session_id: str,
    *,
    mode: str = "exec",
    command: Sequence[str] | None = ("true",),
    signer: SigningIdentity | None = None,
    agent_id: str = AGENT_ID,
    now: float | None = None,
    thumbprint: str | None = None,
    policy_version: int | None = None,
    approval: dict[str, Any] | None = None,
    operator_email: str = "ops@example.test",
) -> str:
    return issue_session_grant(
        signer or stack.grant_signer,
        issuer=ISSUER,
        session_id=session_id,
        team_id=TEAM_ID,
        agent_id=agent_id,
        operator_id="op_1",
        operator_email=operator_email,
        role="operator",
        operator_key_thumbprint=thumbprint or operator.public.key_id,
        mode=mode,
        command=None if mode == "shell" else list(command or ()),
        policy_result="allow",
        policy_rule_id=None,
        policy_version=policy_version,
        approval=approval,
        now=time.time() if now is None else now,
    )


def offer_message(stack: Stack, session_id: str) -> dict[str, Any]:
    return {
        "type": "session_offer",
        "session_id": session_id,
        "expires_at": int(time.time()) + 60,
        "relay": {"id": "relay-test", "host": "127.0.0.1", "port": stack.relay_port,
                  "udp_port": None},
        "relay_token": make_token(stack.relay_signer, session_id, Side.AGENT),
    }


class OperatorSide:
    """The operator end of a session, over the relay, with the real handshake and frames."""

    def __init__(self, link: FrameLink, channel: SecureChannel) -> None:
        self.link = link
        self.channel = channel
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.controls: list[Any] = []
        self.closed = False

    async def send(self, kind: FrameType, payload: bytes) -> None:
        await self.link.send(self.channel.seal(kind, payload, time.monotonic()))

    async def start(self, start: SessionStart) -> None:
        await self.send(FrameType.CONTROL, encode_control(start))

    async def next_frame(self) -> tuple[FrameType, bytes] | None:
        message = await self.link.receive()
        if message is None:
            return None
        frame = self.channel.open(message, time.monotonic())
        if frame.type is FrameType.STDOUT:
            self.stdout += frame.payload
        elif frame.type is FrameType.STDERR:
            self.stderr += frame.payload
        elif frame.type is FrameType.CONTROL:
            self.controls.append(decode_control(frame.payload))
        elif frame.type is FrameType.CLOSE:
            self.closed = True
        return frame.type, frame.payload

    async def until_closed(self) -> None:
        with trio.fail_after(WAIT_SECONDS):
            while await self.next_frame() is not None and not self.closed:
                pass

    async def until_stdout_contains(self, needle: bytes) -> None:
        with trio.fail_after(WAIT_SECONDS):
            while needle not in self.stdout:
                if await self.next_frame() is None:
                    raise AssertionError(f"stream ended before {needle!r}: {bytes(self.stdout)!r}")

    def exit_status(self) -> ExitStatus | None:
        statuses = [c for c in self.controls if isinstance(c, ExitStatus)]
        assert len(statuses) <= 1
        return statuses[0] if statuses else None


@asynccontextmanager
async def operator_session(
    stack: Stack,
    nursery: trio.Nursery | CancellableTasks,
    grant_for: Any = None,
    *,
    session_id: str = "ses_1",
    operator: SigningIdentity | None = None,
    **grant_options: Any,
) -> AsyncIterator[OperatorSide]:
    """Offer a session to the host, connect the operator and finish the handshake."""
    operator = operator or OPERATOR
    grant = mint_grant(stack, operator, session_id, **grant_options)
    offer = stack.host.accept_offer(offer_message(stack, session_id))
    assert offer is not None
    nursery.start_soon(stack.host.run_offer, offer)
    token = make_token(stack.relay_signer, session_id, Side.OPERATOR)
    stream = await connect_tcp("127.0.0.1", stack.relay_port, token)
    async with stream:
        link = FrameLink(stream)
        handshake = OperatorHandshake(
            operator, session_id, grant, pin_agent_key(stack.agent.public),
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
            assert result is not None, "the agent closed without a handshake result"
            handshake.receive(result, time.monotonic())
        yield OperatorSide(link, handshake.channel(time.monotonic()))


async def refusal_for(stack: Stack, nursery: trio.Nursery, **grant_options: Any) -> str:
    """Run a session whose handshake the agent must refuse; the reason the operator sees."""
    with pytest.raises(HandshakeRefused) as refused:
        async with operator_session(stack, nursery, **grant_options):
            pass
    return refused.value.reason


async def wait_for_sessions_to_end(stack: Stack) -> None:
    with trio.fail_after(WAIT_SECONDS):
        while stack.host.active_sessions:  # noqa: ASYNC110 - the host's own tasks change it
            await trio.sleep(0.01)


def exec_start(*argv: str) -> SessionStart:
    return SessionStart("exec", tuple(argv), "xterm", 24, 80)


def shell_start(rows: int = 24, cols: int = 80) -> SessionStart:
    return SessionStart("shell", (), "xterm-256color", rows, cols)


# ---- exec sessions ------------------------------------------------------------------------


@trio_test
async def test_exec_returns_stdout_stderr_and_exit_code_separately(tmp_path: Path) -> None:
    command = ("sh", "-c", "echo out; echo err >&2; exit 3")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.until_closed()
        assert bytes(operator.stdout) == b"out\n"
        assert bytes(operator.stderr) == b"err\n"
        assert operator.exit_status() == ExitStatus(code=3)
        await wait_for_sessions_to_end(stack)
    assert stack.control == [{"type": "session_offer_ack", "session_id": "ses_1"}]
    assert stack.actions() == [
        Action.SESSION_STARTED, Action.SESSION_COMMAND, Action.SESSION_ENDED
    ]
    for event in stack.audit:
        event.verify(stack.agent.public)
    command_event, ended = stack.audit[1].event, stack.audit[2].event
    assert command_event.context["argv"] == list(command)
    assert ended.context["exit_code"] == 3
    assert ended.context["bytes_out"] == len(b"out\nerr\n")


@trio_test
async def test_bulk_exec_output_goes_out_in_frames_no_larger_than_the_maximum(
    tmp_path: Path,
) -> None:
    size = 5 * MAX_FRAME_PAYLOAD + 777
    command = ("head", "-c", str(size), "/dev/urandom")
    sizes: list[int] = []
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            with trio.fail_after(WAIT_SECONDS):
                while (frame := await operator.next_frame()) is not None:
                    if frame[0] is FrameType.STDOUT:
                        sizes.append(len(frame[1]))
                    if operator.closed:
                        break
        assert operator.exit_status() == ExitStatus(code=0)
        await wait_for_sessions_to_end(stack)
    assert sum(sizes) == len(operator.stdout) == size
    assert 0 < max(sizes) <= MAX_FRAME_PAYLOAD
    assert stack.audit[-1].event.context["bytes_out"] == size


@trio_test
async def test_exec_forwards_stdin_until_an_empty_data_frame_ends_it(tmp_path: Path) -> None:
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=("cat",)) as operator:
            await operator.start(exec_start("cat"))
            await operator.send(FrameType.DATA, b"hello through the relay\n")
            await operator.until_stdout_contains(b"hello through the relay\n")
            await operator.send(FrameType.DATA, b"")
            await operator.until_closed()
        assert operator.exit_status() == ExitStatus(code=0)
        await wait_for_sessions_to_end(stack)
    ended = stack.audit[-1].event
    assert ended.context["bytes_in"] == len(b"hello through the relay\n")


@trio_test
async def test_sessions_run_concurrently_each_with_its_own_output(tmp_path: Path) -> None:
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:

        async def one(number: int) -> None:
            command = ("sh", "-c", f"read line; echo session-{number}:$line")
            async with operator_session(
                stack, nursery, session_id=f"ses_{number}", command=command
            ) as operator:
                await operator.start(exec_start(*command))
                await operator.send(FrameType.DATA, b"hello\n")
                await operator.until_closed()
            assert bytes(operator.stdout) == f"session-{number}:hello\n".encode()

        async with trio.open_nursery() as operators:
            for number in range(4):
                operators.start_soon(one, number)
        await wait_for_sessions_to_end(stack)
    assert stack.actions().count(Action.SESSION_ENDED) == 4


@trio_test
async def test_signal_from_the_operator_reaches_the_command(tmp_path: Path) -> None:
    command = ("sh", "-c", "echo ready; exec sleep 60")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.until_stdout_contains(b"ready\n")
            await operator.send(FrameType.CONTROL, encode_control(Signal("TERM")))
            await operator.until_closed()
        assert operator.exit_status() == ExitStatus(signal=15)
        await wait_for_sessions_to_end(stack)


@trio_test
async def test_the_agent_answers_a_keepalive_and_the_session_goes_on(tmp_path: Path) -> None:
    command = ("sh", "-c", "echo ready; read line; echo got $line")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.until_stdout_contains(b"ready\n")
            await operator.send(FrameType.CONTROL, encode_control(Keepalive(reply=False)))
            with trio.fail_after(WAIT_SECONDS):
                while Keepalive(reply=True) not in operator.controls:
                    assert await operator.next_frame() is not None, "the session ended"
            # An answer is not asked about again, and the session carries on as before.
            await operator.send(FrameType.CONTROL, encode_control(Keepalive(reply=True)))
            await operator.send(FrameType.DATA, b"more\n")
            await operator.until_closed()
        assert operator.controls.count(Keepalive(reply=True)) == 1
        assert b"got more" in operator.stdout
        assert operator.exit_status() == ExitStatus(code=0)
        await wait_for_sessions_to_end(stack)


@trio_test
async def test_the_agent_says_it_is_still_here_while_its_command_reads_no_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The command sleeps with its stdin full: the frames behind the input wait, yet the agent's
    # heartbeats go on, so the operator's CLI does not take the quiet for a dead host.
    monkeypatch.setattr(session_host, "HEARTBEAT_INTERVAL_SECONDS", 0.2)
    command = ("sh", "-c", "echo ready; sleep 2; wc -c")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.until_stdout_contains(b"ready\n")
            for _ in range(4):  # far more than a pipe takes while nobody reads it
                await operator.send(FrameType.DATA, b"x" * 60_000)
            with trio.fail_after(1.5):
                while operator.controls.count(Keepalive(reply=True)) < 3:
                    assert await operator.next_frame() is not None, "the session ended"
            await operator.send(FrameType.DATA, b"")
            await operator.until_closed()
        assert operator.exit_status() == ExitStatus(code=0)
        assert operator.stdout.split()[-1] == b"240000"
        await wait_for_sessions_to_end(stack)


@trio_test
async def test_start_that_differs_from_the_grant_is_refused_with_policy_denied(
    tmp_path: Path,
) -> None:
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=("true",)) as operator:
            await operator.start(exec_start("rm", "-rf", "/tmp/nothing-here"))
            await operator.until_closed()
        closes = [c for c in operator.controls if isinstance(c, Close)]
        assert closes and closes[0].reason == "policy-denied"
        assert "command differs" in closes[0].message
        assert operator.exit_status() is None
        await wait_for_sessions_to_end(stack)
    assert stack.actions() == [Action.SESSION_REFUSED]


@trio_test
async def test_operator_leaving_tears_down_the_whole_process_session(tmp_path: Path) -> None:
    command = ("sh", "-c", "sleep 60 & echo $! $$; wait")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.until_stdout_contains(b"\n")
            pids = [int(pid) for pid in bytes(operator.stdout).split()]
            assert all(_alive(pid) for pid in pids)
            # The operator leaves as the CLI does (a link that dies without this is a hang-up:
            # tests/agent/test_network_loss_sessions.py).
            await operator.send(FrameType.CLOSE, b"")
        # The operator closed the session: the agent must end it and kill everything.
        await wait_for_sessions_to_end(stack)
        assert not any(_alive(pid) for pid in pids)
    assert stack.audit[-1].event.action is Action.SESSION_ENDED
    assert stack.audit[-1].event.context["reason"] == "operator-disconnected"


@trio_test
async def test_output_a_command_left_behind_reaches_the_operator_before_its_exit_status(
    tmp_path: Path,
) -> None:
    command = ("sh", "-c", "(sleep 0.3; echo late) & echo early; exit 2")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.until_closed()
        await wait_for_sessions_to_end(stack)
    assert bytes(operator.stdout) == b"early\nlate\n"
    assert operator.exit_status() == ExitStatus(code=2)
    assert stack.audit[-1].event.context["exit_code"] == 2


@trio_test
async def test_operator_leaving_while_leftover_output_is_read_kills_it_and_records_the_exit_code(
    tmp_path: Path,
) -> None:
    command = ("sh", "-c", "sleep 60 & echo $! $$; exit 5")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.until_stdout_contains(b"\n")
            leftover, main = (int(pid) for pid in bytes(operator.stdout).split())
            with trio.fail_after(WAIT_SECONDS):
                while _alive(main):  # noqa: ASYNC110 - a process's exit has no event here
                    await trio.sleep(0.01)
            assert _alive(leftover)
            await operator.send(FrameType.CLOSE, b"")
        await wait_for_sessions_to_end(stack)
        assert not _alive(leftover)
    ended = stack.audit[-1].event
    assert ended.action is Action.SESSION_ENDED
    assert ended.context["reason"] == "operator-disconnected"
    assert ended.context["exit_code"] == 5


@trio_test
async def test_the_session_environment_names_the_session_and_the_operator(
    tmp_path: Path,
) -> None:
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=("env",)) as operator:
            await operator.start(exec_start("env"))
            await operator.until_closed()
        async with operator_session(
            stack, nursery, command=("env",), session_id="ses_2",
            operator_email="ops@example.test\nLD_PRELOAD=/tmp/x.so",
        ) as second:
            await second.start(exec_start("env"))
            await second.until_closed()
        await wait_for_sessions_to_end(stack)
    variables = dict(line.split("=", 1) for line in bytes(operator.stdout).decode().splitlines())
    assert variables["TUCDESK_SESSION_ID"] == "ses_1"
    assert variables["TUCDESK_OPERATOR"] == "ops@example.test"
    # An email that is not plain text never reaches the environment: the operator id does.
    lines = bytes(second.stdout).decode().splitlines()
    assert "TUCDESK_OPERATOR=op_1" in lines and "TUCDESK_SESSION_ID=ses_2" in lines
    assert not any(line.startswith("LD_PRELOAD") for line in lines)


@trio_test
async def test_relay_dying_mid_session_ends_it_and_kills_the_command(tmp_path: Path) -> None:
    command = ("sh", "-c", "echo $$; exec sleep 60")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.until_stdout_contains(b"\n")
            pid = int(bytes(operator.stdout).split()[0])
            stack.relay.shutdown()
            with trio.fail_after(WAIT_SECONDS):
                while await operator.next_frame() is not None:
                    pass
            await wait_for_sessions_to_end(stack)
        assert not _alive(pid)


class CancellableTasks:
    """Starts tasks in a nursery under one cancel scope, to stop the agent's side alone."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.nursery = nursery
        self.scope = trio.CancelScope()

    def start_soon(self, function: Any, *args: Any) -> None:
        async def run() -> None:
            with self.scope:
                await function(*args)

        self.nursery.start_soon(run)


@trio_test
async def test_agent_shutting_down_tells_the_operator_and_kills_the_command(
    tmp_path: Path,
) -> None:
    command = ("sh", "-c", "echo $$; exec sleep 60")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        agent_side = CancellableTasks(nursery)
        async with operator_session(stack, agent_side, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.until_stdout_contains(b"\n")
            pid = int(bytes(operator.stdout).split()[0])
            agent_side.scope.cancel()  # what SIGTERM does to the daemon's sessions
            await operator.until_closed()
        await wait_for_sessions_to_end(stack)
    closes = [c for c in operator.controls if isinstance(c, Close)]
    assert closes and closes[0].reason == "shutdown"
    assert not _alive(pid)
    assert stack.audit[-1].event.context["reason"] == "shutdown"


# ---- shell sessions -----------------------------------------------------------------------


@trio_test
async def test_shell_runs_on_a_pty_sees_resizes_and_returns_its_exit_status(
    tmp_path: Path,
) -> None:
    async with session_stack(tmp_path, shell="/bin/sh") as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, mode="shell") as operator:
            await operator.start(shell_start(rows=30, cols=100))
            await operator.send(FrameType.DATA, b"stty size; tty\n")
            await operator.until_stdout_contains(b"30 100")
            await operator.until_stdout_contains(b"/dev/pts/")
            await operator.send(FrameType.CONTROL, encode_control(Resize(rows=50, cols=132)))
            await operator.send(FrameType.DATA, b"stty size\n")
            await operator.until_stdout_contains(b"50 132")
            await operator.send(FrameType.DATA, b"exit 7\n")
            await operator.until_closed()
        assert operator.exit_status() == ExitStatus(code=7)
        await wait_for_sessions_to_end(stack)
    assert stack.actions() == [Action.SESSION_STARTED, Action.SESSION_ENDED]


# ---- refused grants and handshakes --------------------------------------------------------


@trio_test
async def test_grant_signed_by_an_unpinned_key_is_refused_with_a_reason(tmp_path: Path) -> None:
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        reason = await refusal_for(stack, nursery, signer=SigningIdentity.generate())
        await wait_for_sessions_to_end(stack)
    assert "unknown key" in reason
    assert stack.actions() == [Action.SESSION_REFUSED]


@trio_test
async def test_expired_grant_is_refused_with_a_reason(tmp_path: Path) -> None:
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        reason = await refusal_for(stack, nursery, now=time.time() - 600)
        await wait_for_sessions_to_end(stack)
    assert "expired" in reason


@trio_test
async def test_grant_for_another_agent_is_refused_with_a_reason(tmp_path: Path) -> None:
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        reason = await refusal_for(stack, nursery, agent_id="agt_someone_else")
        await wait_for_sessions_to_end(stack)
    assert "another agent" in reason


@trio_test
async def test_grant_bound_to_another_operator_key_is_refused(tmp_path: Path) -> None:
    other = SigningIdentity.generate()
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        reason = await refusal_for(stack, nursery, thumbprint=other.public.key_id)
        await wait_for_sessions_to_end(stack)
    assert "another operator key" in reason
    refused = stack.audit[0].event
    assert refused.action is Action.SESSION_REFUSED
    assert refused.context["code"] == "grant-refused"


@trio_test
async def test_grant_for_another_session_is_refused(tmp_path: Path) -> None:
    operator = OPERATOR
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        grant = mint_grant(stack, operator, "ses_other")
        offer = stack.host.accept_offer(offer_message(stack, "ses_1"))
        assert offer is not None
        nursery.start_soon(stack.host.run_offer, offer)
        stream = await connect_tcp(
            "127.0.0.1", stack.relay_port, make_token(stack.relay_signer, "ses_1", Side.OPERATOR)
        )
        async with stream:
            link = FrameLink(stream)
            handshake = OperatorHandshake(
                operator, "ses_1", grant, pin_agent_key(stack.agent.public),
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
                with pytest.raises(HandshakeRefused, match="another session"):
                    handshake.receive(result, time.monotonic())
        await wait_for_sessions_to_end(stack)


@trio_test
async def test_operator_pinning_another_agent_key_gives_up_before_sending_the_grant(
    tmp_path: Path,
) -> None:
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        stack.agent = SigningIdentity.generate()  # the operator pins a key the agent lacks
        with pytest.raises(HandshakeError, match="wrong agent key"):
            async with operator_session(stack, nursery):
                pass
        await wait_for_sessions_to_end(stack)
    assert stack.actions() == [Action.SESSION_REFUSED]


@trio_test
async def test_a_session_id_is_accepted_only_once(tmp_path: Path) -> None:
    operator = OPERATOR
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, operator=operator) as first:
            await first.start(exec_start("true"))
            await first.until_closed()
        await wait_for_sessions_to_end(stack)
        reason = await refusal_for(stack, nursery, operator=operator)
        await wait_for_sessions_to_end(stack)
    assert "already used" in reason


# ---- offers -------------------------------------------------------------------------------


@trio_test
async def test_expired_or_duplicate_offers_are_refused_on_the_control_channel(
    tmp_path: Path,
) -> None:
    async with session_stack(tmp_path, max_sessions=1) as stack:
        stale = offer_message(stack, "ses_stale")
        stale["expires_at"] = int(time.time()) - 600
        assert stack.host.accept_offer(stale) is None
        assert stack.host.accept_offer(offer_message(stack, "ses_a")) is not None
        other_relay = offer_message(stack, "ses_a")
        other_relay["relay"]["port"] = 1
        assert stack.host.accept_offer(other_relay) is None
        assert stack.host.accept_offer(offer_message(stack, "ses_b")) is None
        assert stack.host.accept_offer({"type": "session_offer", "session_id": "ses_c"}) is None
    kinds = [(m["type"], m["session_id"]) for m in stack.control]
    assert kinds == [
        ("session_offer_refused", "ses_stale"),
        ("session_offer_ack", "ses_a"),
        ("session_offer_refused", "ses_a"),
        ("session_offer_refused", "ses_b"),
        ("session_offer_refused", "ses_c"),
    ]
    assert "already offered" in stack.control[2]["reason"]
    assert "maximum of 1" in stack.control[3]["reason"]


@trio_test
async def test_an_offer_sent_again_is_acknowledged_again_and_runs_once(tmp_path: Path) -> None:
    # The rendezvous may send an offer twice when the first ack was lost with its channel.
    async with session_stack(tmp_path, max_sessions=1) as stack:
        first = offer_message(stack, "ses_a")
        again = {**first, "relay_token": ""}
        again["relay_token"] = make_token(stack.relay_signer, "ses_a", Side.AGENT)
        assert stack.host.accept_offer(first) is not None
        assert stack.host.accept_offer(again) is None  # not run a second time
        assert stack.host.active_sessions == 1
        assert stack.host.live_session_ids() == {"ses_a"}
    assert [(m["type"], m["session_id"]) for m in stack.control] == [
        ("session_offer_ack", "ses_a"),
        ("session_offer_ack", "ses_a"),
    ]


@trio_test
async def test_a_repeat_of_a_running_offer_arriving_after_its_expiry_is_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another instance's catch-up may send it again long after: the session runs regardless.
    async with session_stack(tmp_path, max_sessions=1) as stack:
        first = offer_message(stack, "ses_a")
        first["expires_at"] = int(time.time()) + 2
        again = {**first, "relay_token": make_token(stack.relay_signer, "ses_a", Side.AGENT)}
        assert stack.host.accept_offer(first) is not None
        later = time.time() + 2 + session_host.OFFER_EXPIRY_LEEWAY_SECONDS + 10
        monkeypatch.setattr(stack.host, "_wall_clock", lambda: later)
        assert stack.host.accept_offer(again) is None  # not run a second time
        assert stack.host.live_session_ids() == {"ses_a"}
    assert [(m["type"], m["session_id"]) for m in stack.control] == [
        ("session_offer_ack", "ses_a"),
        ("session_offer_ack", "ses_a"),
    ]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "session_id": json_values,
            "expires_at": json_values,
            "relay": json_values
            | st.fixed_dictionaries(
                {}, optional={"id": json_values, "host": json_values, "port": json_values}
            ),
            "relay_token": json_values,
        },
    )
)
def test_any_offer_message_parses_or_is_refused_with_an_offer_error(message: Any) -> None:
    try:
        offer = SessionOffer.from_message(message)
    except OfferError:
        return
    assert 0 < offer.relay_port < 65536 and offer.session_id and offer.relay_token


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes once it has exited.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@trio_test
async def test_a_free_lock_is_taken_at_once_and_a_held_one_is_waited_for() -> None:
    lock = trio.Lock()
    others_ran: list[str] = []
    async with trio.open_nursery() as nursery:

        async def other() -> None:
            others_ran.append("other")

        nursery.start_soon(other)
        await acquire_at_once(lock)
        # Taken without a trip through the scheduler: the other task has not run yet.
        assert lock.locked() and others_ran == []

        async def waiter() -> None:
            await acquire_at_once(lock)
            others_ran.append("waiter")
            lock.release()

        nursery.start_soon(waiter)
        await trio.sleep(0.01)
        assert others_ran == ["other"]  # the waiter is still waiting for the lock
        lock.release()
    assert others_ran == ["other", "waiter"]


@trio_test
async def test_a_burst_of_buffered_frames_still_lets_other_tasks_run() -> None:
    ours, theirs = trio.socket.socketpair()
    burst = 4 * MAX_FRAMES_WITHOUT_YIELD
    await theirs.send(b"".join(encode_stream_frame(b"key %d" % index) for index in range(burst)))
    link = FrameLink(trio.SocketStream(ours))
    ticks: list[int] = []
    received: list[bytes] = []
    async with trio.open_nursery() as nursery:

        async def ticker() -> None:
            while True:
                ticks.append(len(received))
                await trio.lowlevel.checkpoint()

        nursery.start_soon(ticker)
        await trio.lowlevel.checkpoint()
        for _ in range(burst):
            received.append(await link.receive() or b"")
        nursery.cancel_scope.cancel()
    theirs.close()
    ours.close()
    assert received == [b"key %d" % index for index in range(burst)]
    # The other task ran in the middle of the burst, not only before and after it.
    assert any(0 < count < burst for count in ticks)


@trio_test
async def test_the_host_signals_when_its_last_session_ends(tmp_path: Path) -> None:
    # The control channel's stop drain waits on this instead of polling the sessions.
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        with trio.fail_after(1):
            await stack.host.wait_all_ended()  # none runs: at once
        ended = trio.Event()

        async def watch() -> None:
            await stack.host.wait_all_ended()
            ended.set()

        command = ("sh", "-c", "sleep 0.3")
        async with operator_session(stack, nursery, command=command) as operator:
            nursery.start_soon(watch)
            await operator.start(exec_start(*command))
            await trio.sleep(0.1)
            assert not ended.is_set() and stack.host.live_session_ids() == {"ses_1"}
            await operator.until_closed()
        with trio.fail_after(WAIT_SECONDS):
            await ended.wait()
        assert not stack.host.live_session_ids()
