"""The operator's keepalive: an agent that goes silent is given up; one that answers is kept.

A dead agent host or a cut network sends nothing, not even a close, so without keepalives the
CLI waited for the relay's idle timeout (ten minutes) with no word. ``keep_alive`` runs beside
the receiving task, as connect and exec run it. Time is trio's MockClock, jumping whenever every
task waits; the sockets are real.
"""

from __future__ import annotations

import time

import pytest
import trio
import trio.testing

from operator_cli.session_client import (
    KEEPALIVE_INTERVAL_SECONDS,
    KEEPALIVE_TIMEOUT_SECONDS,
    ConnectionLost,
    Exited,
)
from protocol.control import ExitStatus, Keepalive, decode_control, encode_control
from protocol.frames import FrameType, SecureChannel
from protocol.stream_framing import StreamDecoder, encode_stream_frame
from tests.operator_cli.test_sessions_client import _socket_session


def _opened_controls(agent: SecureChannel, decoder: StreamDecoder, data: bytes) -> list[object]:
    frames = [agent.open(sealed, time.monotonic()) for sealed in decoder.feed(data)]
    return [decode_control(frame.payload) for frame in frames if frame.type is FrameType.CONTROL]


def test_a_silent_agent_is_asked_then_given_up_after_the_keepalive_timeout() -> None:
    async def main() -> None:
        session, agent, theirs = _socket_session()
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.keep_alive)
            with trio.fail_after(3 * KEEPALIVE_TIMEOUT_SECONDS):
                with pytest.raises(ConnectionLost) as lost:
                    await session.receive()
        waited = trio.current_time() - started
        assert KEEPALIVE_TIMEOUT_SECONDS <= waited < KEEPALIVE_TIMEOUT_SECONDS + 1
        assert "the agent stopped answering" in str(lost.value)
        asked = _opened_controls(agent, StreamDecoder(), await theirs.recv(1 << 16))
        expected = int(KEEPALIVE_TIMEOUT_SECONDS // KEEPALIVE_INTERVAL_SECONDS) - 1
        assert asked == [Keepalive(reply=False)] * expected
        theirs.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_an_agent_that_answers_keeps_an_idle_session_for_as_long_as_it_lasts() -> None:
    quiet_for = 5 * KEEPALIVE_TIMEOUT_SECONDS

    async def main() -> None:
        session, agent, theirs = _socket_session()

        async def answering_agent() -> None:
            decoder = StreamDecoder()
            answered_until = trio.current_time() + quiet_for
            while trio.current_time() < answered_until:
                for message in _opened_controls(agent, decoder, await theirs.recv(1 << 16)):
                    assert message == Keepalive(reply=False)
                    reply = encode_control(Keepalive(reply=True))
                    await theirs.send(encode_stream_frame(agent.seal(
                        FrameType.CONTROL, reply, time.monotonic()
                    )))  # fmt: skip
            status = encode_control(ExitStatus(code=0))
            await theirs.send(
                encode_stream_frame(agent.seal(FrameType.CONTROL, status, time.monotonic()))
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answering_agent)
            nursery.start_soon(session.keep_alive)
            started = trio.current_time()
            with trio.fail_after(2 * quiet_for):
                event = await session.receive()
            nursery.cancel_scope.cancel()
        assert isinstance(event, Exited)
        assert trio.current_time() - started >= quiet_for
        theirs.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
