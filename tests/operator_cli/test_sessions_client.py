"""The operator's session client against an agent peer speaking the real protocol in memory.

The peer runs protocol.handshake.AgentHandshake and SecureChannel over a trio memory stream, so
these tests pin the CLI's side of docs/sessions.md §4 (pinning, refusals, frames, exit codes)
without processes; tests/operator_cli/test_sessions_stack.py runs the same through the real
agent, relay and rendezvous.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from operator_cli import session_client
from operator_cli.connect import passed_environment, shell_start, terminal_type
from operator_cli.exec_command import ExecOptions, exec_start, should_read_stdin, stream_exec
from operator_cli.known_agents import AgentKeyChangedError, AgentNameKeyChangedError, KnownAgents
from operator_cli.session_client import (
    AgentKeyPin,
    ConnectionLost,
    SessionError,
    SessionRefused,
    SessionTicket,
    establish_session,
    exit_code_for,
)
from operator_cli.terminal import WindowSize
from protocol.control import (
    Close,
    ExitStatus,
    Resize,
    SessionStart,
    decode_control,
    encode_control,
)
from protocol.frames import MAX_FRAME_PAYLOAD, Frame, FrameType, SecureChannel
from protocol.handshake import AgentHandshake, HandshakeRefused
from protocol.identity import PublicIdentity, SigningIdentity, b64url
from protocol.session_keys import Role, SessionKeys
from protocol.stream_framing import StreamDecoder, StreamFrameBuffer, encode_stream_frame
from tests.relay.lock_calls import lock_operations

SESSION_ID = "ses_test"
AGENT_ID = "agt_test"
TEST_TIMEOUT_SECONDS = 10
AGENT_KEY = SigningIdentity.generate()
OTHER_KEY = SigningIdentity.generate()
OPERATOR_KEY = SigningIdentity.generate()


def response_body(agent_key: PublicIdentity = AGENT_KEY.public) -> dict[str, Any]:
    return {
        "session_id": SESSION_ID,
        "expires_at": time.time() + 60,
        "agent": {"id": AGENT_ID, "name": "web-1", "public_key": b64url(agent_key.raw),
                  "fingerprint": agent_key.fingerprint},
        "grant": "grant.jwt.value",
        "relay": {"id": "relay-1", "host": "127.0.0.1", "port": 7000, "udp_port": None},
        "relay_token": "relay.token.value",
    }


def make_ticket(agent_key: PublicIdentity = AGENT_KEY.public) -> SessionTicket:
    return SessionTicket.from_response(response_body(agent_key))


# ---- an agent peer speaking the real protocol ------------------------------------------------


@dataclass
class AgentPeer:
    """The agent's end after the handshake: sealed frames over the memory stream."""

    stream: trio.abc.Stream
    channel: SecureChannel
    next_frame: Callable[[], Awaitable[bytes]]
    start: SessionStart | None = None

    async def send(self, frame_type: FrameType, payload: bytes = b"") -> None:
        sealed = self.channel.seal(frame_type, payload, time.monotonic())
        await self.stream.send_all(encode_stream_frame(sealed))

    async def exit(self, status: ExitStatus) -> None:
        await self.send(FrameType.CONTROL, encode_control(status))
        await self.send(FrameType.CLOSE)

    async def receive(self) -> Frame:
        return self.channel.open(await self.next_frame(), time.monotonic())


Script = Callable[[AgentPeer], Awaitable[None]]


async def run_agent(
    stream: trio.abc.Stream,
    script: Script,
    *,
    identity: SigningIdentity = AGENT_KEY,
    grant_refusal: str | None = None,
) -> None:
    decoder = StreamDecoder()
    pending: list[bytes] = []

    async def next_frame() -> bytes:
        while not pending:
            data = await stream.receive_some(65536)
            if not data:
                raise EOFError("operator went away")
            pending.extend(decoder.feed(bytes(data)))
        return pending.pop(0)

    now = time.monotonic()
    handshake = AgentHandshake(
        identity, SESSION_ID, lambda grant, key: grant_refusal, now + TEST_TIMEOUT_SECONDS
    )
    try:
        await stream.send_all(encode_stream_frame(handshake.receive(await next_frame(), now)))
    except EOFError:
        return  # the operator gave up after message 2 (a key it refuses)
    try:
        reply = handshake.receive(await next_frame(), time.monotonic())
    except HandshakeRefused as refusal:
        assert refusal.reply is not None
        await stream.send_all(encode_stream_frame(refusal.reply))
        await stream.aclose()
        return
    except EOFError:
        return
    await stream.send_all(encode_stream_frame(reply))
    peer = AgentPeer(stream, handshake.channel(time.monotonic()), next_frame)
    first = await peer.receive()
    assert first.type is FrameType.CONTROL
    start = decode_control(first.payload)
    assert isinstance(start, SessionStart)
    peer.start = start
    await script(peer)


async def with_agent(
    tmp_path: Path,
    script: Script,
    operator: Callable[[Any], Awaitable[Any]],
    **agent_options: Any,
) -> Any:
    """Run the operator side (given the established session) against a scripted agent."""
    operator_end, agent_end = trio.testing.memory_stream_pair()
    known = KnownAgents.in_home(tmp_path / "cli")
    result: list[Any] = []
    try:
        with trio.fail_after(TEST_TIMEOUT_SECONDS):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: run_agent(agent_end, script, **agent_options))
                ticket = make_ticket()
                session = await establish_session(
                    operator_end, ticket, OPERATOR_KEY, known, exec_start(("cmd",))
                )
                result.append(await operator(session))
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    return result[0]


# ---- the rendezvous's answer -----------------------------------------------------------------


def test_ticket_reads_the_fields_of_the_contract() -> None:
    ticket = make_ticket()
    assert (ticket.session_id, ticket.agent_id) == (SESSION_ID, AGENT_ID)
    assert ticket.agent_name == "web-1"
    assert ticket.agent_key == AGENT_KEY.public
    assert (ticket.relay_host, ticket.relay_port, ticket.relay_id) == ("127.0.0.1", 7000, "relay-1")


@pytest.mark.parametrize("field", ["session_id", "grant", "relay_token", "agent", "relay"])
def test_a_ticket_missing_a_field_is_refused_as_a_session_error(field: str) -> None:
    body = response_body()
    del body[field]
    with pytest.raises(SessionError):
        SessionTicket.from_response(body)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_any_json_answer_parses_or_raises_session_error_only(body: Any) -> None:
    try:
        SessionTicket.from_response(body)
    except SessionError:
        pass


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["session_id", "grant", "relay_token"]), json_values)
def test_a_contract_field_of_the_wrong_type_is_refused(field: str, value: Any) -> None:
    body = response_body()
    body[field] = value
    if isinstance(value, str) and value:
        assert getattr(SessionTicket.from_response(body), field) == value
    else:
        with pytest.raises(SessionError):
            SessionTicket.from_response(body)


# ---- the agent's key -------------------------------------------------------------------------


def test_first_contact_pins_the_key_the_rendezvous_registered(tmp_path: Path) -> None:
    async def script(peer: AgentPeer) -> None:
        await peer.exit(ExitStatus(code=0))

    async def operator(session: Any) -> None:
        await session.close()

    trio.run(with_agent, tmp_path, script, operator)
    assert KnownAgents.in_home(tmp_path / "cli").pinned_key(AGENT_ID) == AGENT_KEY.public


def test_first_contact_with_a_key_other_than_the_registered_one_is_refused(
    tmp_path: Path,
) -> None:
    async def script(peer: AgentPeer) -> None:
        raise AssertionError("the session must not start")

    async def operator(session: Any) -> None:
        raise AssertionError("the session must not start")

    with pytest.raises(SessionError, match="registered"):
        trio.run(partial(with_agent, tmp_path, script, operator, identity=OTHER_KEY))
    assert KnownAgents.in_home(tmp_path / "cli").pinned_key(AGENT_ID) is None


def test_a_changed_agent_key_is_refused_loudly_and_the_pin_kept(tmp_path: Path) -> None:
    known = KnownAgents.in_home(tmp_path / "cli")
    known.trust(AGENT_ID, OTHER_KEY.public)

    async def script(peer: AgentPeer) -> None:
        raise AssertionError("the session must not start")

    async def operator(session: Any) -> None:
        raise AssertionError("the session must not start")

    with pytest.raises(AgentKeyChangedError) as caught:
        trio.run(with_agent, tmp_path, script, operator)
    assert AGENT_KEY.public.fingerprint in str(caught.value)
    assert OTHER_KEY.public.fingerprint in str(caught.value)
    assert known.pinned_key(AGENT_ID) == OTHER_KEY.public


def test_a_new_agent_id_with_another_key_under_a_pinned_name_is_refused(tmp_path: Path) -> None:
    known = KnownAgents.in_home(tmp_path / "cli")
    known.trust("agt_before_reenrollment", OTHER_KEY.public, name="web-1")

    async def script(peer: AgentPeer) -> None:
        raise AssertionError("the session must not start")

    async def operator(session: Any) -> None:
        raise AssertionError("the session must not start")

    with pytest.raises(AgentNameKeyChangedError) as caught:
        trio.run(with_agent, tmp_path, script, operator)
    message = str(caught.value)
    assert AGENT_KEY.public.fingerprint in message and OTHER_KEY.public.fingerprint in message
    assert AGENT_ID in message and "agt_before_reenrollment" in message
    assert "tucdesk agents trust web-1" in message
    assert known.pinned_key(AGENT_ID) is None


def test_a_new_agent_id_with_the_pinned_key_of_its_name_is_accepted(tmp_path: Path) -> None:
    known = KnownAgents.in_home(tmp_path / "cli")
    known.trust("agt_before_reregistration", AGENT_KEY.public, name="web-1")

    async def script(peer: AgentPeer) -> None:
        await peer.exit(ExitStatus(code=0))

    async def operator(session: Any) -> None:
        await session.close()

    trio.run(with_agent, tmp_path, script, operator)
    assert known.pins_for_name("web-1") == {AGENT_ID: AGENT_KEY.public}


def test_a_refused_grant_reaches_the_operator_with_the_agents_reason(tmp_path: Path) -> None:
    async def script(peer: AgentPeer) -> None:
        raise AssertionError("the session must not start")

    async def operator(session: Any) -> None:
        raise AssertionError("the session must not start")

    with pytest.raises(SessionRefused, match="grant has expired"):
        trio.run(
            partial(with_agent, tmp_path, script, operator, grant_refusal="grant has expired")
        )


# ---- exec streams and exit codes -------------------------------------------------------------


def exec_through(tmp_path: Path, script: Script, stdin: bytes | None) -> tuple[int, bytes, bytes]:
    # Files, not pipes: nothing reads a pipe while the session writes to it.
    out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
    out_write = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    err_write = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    in_read = None
    if stdin is not None:
        # A regular file (read in a worker thread) for large input, a pipe for small input.
        if len(stdin) > 4096:
            path = tmp_path / "stdin"
            path.write_bytes(stdin)
            in_read = os.open(path, os.O_RDONLY)
        else:
            in_read, in_write = os.pipe()
            os.write(in_write, stdin)
            os.close(in_write)
    options = ExecOptions(
        command=("cmd",), read_stdin=stdin is not None, stdin_fd=in_read or 0,
        stdout_fd=out_write, stderr_fd=err_write,
    )

    async def operator(session: Any) -> int:
        try:
            return await stream_exec(session, options)
        finally:
            await session.close()

    try:
        code = trio.run(with_agent, tmp_path, script, operator)
    finally:
        os.close(out_write)
        os.close(err_write)
        if in_read is not None:
            os.close(in_read)
    return code, out_path.read_bytes(), err_path.read_bytes()


def test_exec_separates_stdout_and_stderr_and_returns_the_exit_code(tmp_path: Path) -> None:
    async def script(peer: AgentPeer) -> None:
        await peer.send(FrameType.STDOUT, b"to stdout\n")
        await peer.send(FrameType.STDERR, b"to stderr\n")
        await peer.exit(ExitStatus(code=7))

    assert exec_through(tmp_path, script, None) == (7, b"to stdout\n", b"to stderr\n")


def test_exec_pipes_stdin_and_ends_it_with_an_empty_data_frame(tmp_path: Path) -> None:
    async def script(peer: AgentPeer) -> None:
        received = b""
        while True:
            frame = await peer.receive()
            assert frame.type is FrameType.DATA
            if not frame.payload:
                break
            received += frame.payload
        for offset in range(0, len(received), 65536):
            await peer.send(FrameType.STDOUT, received[offset : offset + 65536])
        await peer.exit(ExitStatus(code=0))

    for data in (os.urandom(200_000), b"a few words\n"):
        assert exec_through(tmp_path, script, data) == (0, data, b"")


def test_exec_without_stdin_sends_end_of_input_at_once(tmp_path: Path) -> None:
    async def script(peer: AgentPeer) -> None:
        frame = await peer.receive()
        assert (frame.type, frame.payload) == (FrameType.DATA, b"")
        await peer.exit(ExitStatus(code=0))

    assert exec_through(tmp_path, script, None)[0] == 0


def test_a_command_killed_by_a_signal_exits_128_plus_the_signal(tmp_path: Path) -> None:
    async def script(peer: AgentPeer) -> None:
        await peer.exit(ExitStatus(signal=15))

    assert exec_through(tmp_path, script, None)[0] == 143


def test_an_agent_close_without_exit_status_is_an_error_with_its_reason(tmp_path: Path) -> None:
    async def script(peer: AgentPeer) -> None:
        await peer.send(FrameType.CONTROL, encode_control(Close("policy-denied", "not allowed")))
        await peer.send(FrameType.CLOSE)

    with pytest.raises(SessionRefused, match="not allowed"):
        exec_through(tmp_path, script, None)


def test_a_connection_lost_before_the_exit_status_is_reported(tmp_path: Path) -> None:
    async def script(peer: AgentPeer) -> None:
        await peer.send(FrameType.STDOUT, b"partial")
        await peer.stream.aclose()

    with pytest.raises(ConnectionLost):
        exec_through(tmp_path, script, None)


def test_exit_codes_follow_the_shell_convention() -> None:
    assert exit_code_for(ExitStatus(code=0)) == 0
    assert exit_code_for(ExitStatus(code=255)) == 255
    assert exit_code_for(ExitStatus(signal=9)) == 137


# ---- what the session start carries ----------------------------------------------------------


def test_only_locale_time_zone_and_colour_variables_are_passed() -> None:
    environ = {"LANG": "C.UTF-8", "LC_ALL": "C", "TZ": "UTC", "COLORTERM": "truecolor",
               "PATH": "/evil", "LD_PRELOAD": "x.so", "HOME": "/root"}
    assert dict(passed_environment(environ)) == {
        "LANG": "C.UTF-8", "LC_ALL": "C", "TZ": "UTC", "COLORTERM": "truecolor",
    }


def test_an_implausible_term_falls_back_to_xterm_256color() -> None:
    assert terminal_type({"TERM": "screen-256color"}) == "screen-256color"
    assert terminal_type({"TERM": "x; rm -rf /"}) == "xterm-256color"
    assert terminal_type({}) == "xterm-256color"


def test_a_shell_start_carries_the_window_size() -> None:
    start = shell_start(WindowSize(50, 132), {"TERM": "xterm"})
    assert (start.mode, start.rows, start.cols, start.terminal_type) == ("shell", 50, 132, "xterm")


def test_stdin_is_read_from_pipes_but_not_from_a_terminal_unless_asked() -> None:
    read_end, write_end = os.pipe()
    try:
        assert should_read_stdin(False, False, read_end)
        assert not should_read_stdin(True, False, read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    primary, secondary = os.openpty()
    try:
        assert not should_read_stdin(False, False, secondary)
        assert should_read_stdin(False, True, secondary)
    finally:
        os.close(primary)
        os.close(secondary)


# ---- an agent that refuses the offer -----------------------------------------------------------


def test_an_offer_the_agent_refused_is_reported_without_waiting_for_the_relay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_client, "REFUSAL_POLL_SECONDS", 0.05)
    answers = iter([None, "at its session limit (64)"])

    async def probe() -> str | None:
        return next(answers)

    async def main() -> None:
        # A "relay" that accepts and never pairs: only the probe can end the wait early.
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        body = response_body()
        body["relay"]["port"] = port
        ticket = SessionTicket.from_response(body)
        async def hold(stream: trio.SocketStream) -> None:
            await trio.sleep_forever()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, hold, listeners)
            with trio.fail_after(TEST_TIMEOUT_SECONDS):
                with pytest.raises(SessionRefused, match="session limit"):
                    await session_client.open_session(
                        ticket, OPERATOR_KEY, KnownAgents.in_home(tmp_path), exec_start(("x",)),
                        refusal_probe=probe,
                    )
            nursery.cancel_scope.cancel()

    trio.run(main)


# ---- sending over a real socket (the relay connection) -------------------------------------


def _socket_session() -> tuple[
    session_client.OperatorSession, SecureChannel, trio.socket.SocketType
]:
    """An OperatorSession on one end of a socketpair with a small send buffer, and the agent's
    channel and socket at the other end."""
    ours, theirs = trio.socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    keys = SessionKeys(SESSION_ID.encode(), os.urandom(32), os.urandom(32), os.urandom(32))
    now = time.monotonic()
    session = session_client.OperatorSession(
        trio.SocketStream(ours), SecureChannel(keys, Role.OPERATOR, now), StreamFrameBuffer(),
        make_ticket(),
    )
    return session, SecureChannel(keys, Role.AGENT, now), theirs


async def _frames_from(sock: trio.socket.SocketType, count: int) -> list[bytes]:
    decoder, frames = StreamDecoder(), []
    while len(frames) < count:
        data = await sock.recv(1 << 20)
        assert data, "the operator closed early"
        frames += decoder.feed(data)
    return frames


def test_a_keystroke_frame_is_sent_without_taking_the_send_lock() -> None:
    async def main() -> None:
        session, agent, theirs = _socket_session()
        with lock_operations() as called:
            await session.send_data(b"k")
        assert called == []  # the socket took the frame whole: no turn was needed
        [sealed] = await _frames_from(theirs, 1)
        frame = agent.open(sealed, time.monotonic())
        assert (frame.type, frame.payload) == (FrameType.DATA, b"k")
        theirs.close()

    trio.run(main)


def test_frames_sent_together_arrive_whole_and_in_order_when_the_socket_is_full() -> None:
    big = os.urandom(MAX_FRAME_PAYLOAD)

    async def main() -> None:
        session, agent, theirs = _socket_session()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.send_data, big * 4)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(session.resize, 30, 100)
            nursery.start_soon(session.send_data, b"k")
            frames = await _frames_from(theirs, 6)
        # Each frame is whole and opens in counter order (sealing order is writing order); the
        # other senders' frames may come between the big input's frames, never inside one.
        opened = [agent.open(sealed, time.monotonic()) for sealed in frames]
        data = [frame.payload for frame in opened if frame.type is FrameType.DATA]
        assert [payload for payload in data if payload != b"k"] == [big] * 4
        assert data.count(b"k") == 1
        [control] = [frame for frame in opened if frame.type is FrameType.CONTROL]
        assert decode_control(control.payload) == Resize(rows=30, cols=100)
        theirs.close()

    trio.run(main)


class _LyingRendezvous:
    """A rendezvous that answers a session request with a ticket for whatever agent it likes
    (what a compromised one could do to sidestep the pin kept for the name asked for)."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def request_with_status(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        return 201, self.body


@pytest.mark.parametrize("target", ["web-1", AGENT_ID])
def test_a_ticket_for_the_agent_asked_for_by_name_or_id_is_taken(target: str) -> None:
    api: Any = _LyingRendezvous(response_body())
    assert session_client.request_session(api, target, "shell").agent_id == AGENT_ID


def test_a_ticket_for_another_agent_than_the_one_asked_for_is_refused() -> None:
    api: Any = _LyingRendezvous(response_body())
    with pytest.raises(SessionError, match="answered for agent 'web-1'.*not 'db-1'"):
        session_client.request_session(api, "db-1", "exec", ["true"])


@pytest.mark.parametrize("through_request", [True, False], ids=["requested", "ticket-only"])
def test_a_ticket_whose_id_is_the_typed_name_cannot_skip_that_names_pin(
    tmp_path: Path, through_request: bool
) -> None:
    # The operator pinned agent "web-1" earlier; a rendezvous then answers "web-1" with an agent
    # whose id is "web-1" (never pinned) and whose name is another, with the attacker's key.
    known = KnownAgents.in_home(tmp_path / "cli", "https://rv.example")
    assert known.verify_or_pin(AGENT_ID, AGENT_KEY.public, name="web-1") is not None
    attacker = SigningIdentity.generate().public
    body = response_body(attacker)
    body["agent"].update(id="web-1", name="other")
    api: Any = _LyingRendezvous(body)
    ticket = (session_client.request_session(api, "web-1", "shell") if through_request
              else SessionTicket.from_response(body))  # fmt: skip
    pin = AgentKeyPin(known, ticket)
    reason = pin(attacker)
    assert reason is not None and "web-1" in reason and attacker.fingerprint in reason
    assert isinstance(pin.key_changed, AgentNameKeyChangedError)
    assert known.pinned_key("web-1") is None  # nothing was pinned for the impostor


def test_a_ticket_asked_for_by_id_with_the_named_agents_key_is_taken(tmp_path: Path) -> None:
    known = KnownAgents.in_home(tmp_path / "cli", "https://rv.example")
    known.verify_or_pin(AGENT_ID, AGENT_KEY.public, name="web-1")
    api: Any = _LyingRendezvous(response_body())
    ticket = session_client.request_session(api, AGENT_ID, "shell")
    assert AgentKeyPin(known, ticket)(AGENT_KEY.public) is None
