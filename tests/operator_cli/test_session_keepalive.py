"""The operator's keepalive: a silent agent is given up; a heartbeating one is kept; time the CLI
spends not reading does not count against the agent.

A dead agent host or a cut network sends nothing, not even a close, so without this the CLI
waited for the relay's idle timeout (ten minutes) with no word. The agent says it is still here
every 15 s of its own silence (agent/session_host.py HEARTBEAT_INTERVAL_SECONDS). ``keep_alive``
runs beside the receiving task, as connect and exec run it. Time is trio's MockClock, jumping
whenever every task waits; the sockets are real.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest
import trio
import trio.testing

from operator_cli.session_client import (
    KEEPALIVE_INTERVAL_SECONDS,
    KEEPALIVE_TIMEOUT_SECONDS,
    ConnectionLost,
    Exited,
    Output,
)
from protocol.control import ExitStatus, Keepalive, encode_control
from protocol.frames import FrameType, SecureChannel
from protocol.stream_framing import encode_stream_frame
from tests.operator_cli.test_sessions_client import _socket_session

HEARTBEAT = 15.0


def _frame(agent: SecureChannel, kind: FrameType, payload: bytes) -> bytes:
    return encode_stream_frame(agent.seal(kind, payload, time.monotonic()))


def test_a_silent_agent_is_given_up_after_the_keepalive_timeout() -> None:
    async def main() -> None:
        session, _agent, theirs = _socket_session()
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.keep_alive)
            with trio.fail_after(3 * KEEPALIVE_TIMEOUT_SECONDS):
                with pytest.raises(ConnectionLost) as lost:
                    await session.receive()
        waited = trio.current_time() - started
        latest = KEEPALIVE_TIMEOUT_SECONDS + KEEPALIVE_INTERVAL_SECONDS
        assert KEEPALIVE_TIMEOUT_SECONDS <= waited <= latest
        assert "the agent stopped answering" in str(lost.value)
        theirs.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_heartbeating_agent_keeps_a_quiet_session_for_as_long_as_it_lasts() -> None:
    quiet_for = 5 * KEEPALIVE_TIMEOUT_SECONDS

    async def main() -> None:
        session, agent, theirs = _socket_session()

        async def heartbeating_agent() -> None:
            until = trio.current_time() + quiet_for
            while trio.current_time() < until:
                await trio.sleep(HEARTBEAT)
                await theirs.send(
                    _frame(agent, FrameType.CONTROL, encode_control(Keepalive(reply=True)))
                )
            status = encode_control(ExitStatus(code=0))
            await theirs.send(_frame(agent, FrameType.CONTROL, status))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeating_agent)
            nursery.start_soon(session.keep_alive)
            started = trio.current_time()
            with trio.fail_after(2 * quiet_for):
                event = await session.receive()
            nursery.cancel_scope.cancel()
        assert isinstance(event, Exited)
        assert trio.current_time() - started >= quiet_for
        theirs.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_time_the_cli_spends_not_reading_does_not_count_against_the_agent() -> None:
    # Its output blocked by a paused pager, or the CLI suspended: the agent's bytes wait in the
    # socket meanwhile, and are read when the CLI comes back.
    async def main() -> None:
        session, agent, theirs = _socket_session()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.keep_alive)
            await theirs.send(_frame(agent, FrameType.STDOUT, b"first"))
            assert await session.receive() == Output("stdout", b"first")
            await trio.sleep(2 * KEEPALIVE_TIMEOUT_SECONDS)  # the CLI is busy elsewhere
            await theirs.send(_frame(agent, FrameType.STDOUT, b"second"))
            assert await session.receive() == Output("stdout", b"second")
            nursery.cancel_scope.cancel()
        theirs.close()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_time_the_cli_was_stopped_does_not_count_against_the_agent() -> None:
    # The CLI's process is stopped (Ctrl-Z, SIGSTOP: here its event loop is blocked) while it
    # waits for the agent; the agent's heartbeats pile up in the socket meanwhile. On resume the
    # keepalive task may run before the receiving task: it must not take the gap for silence.
    # Real time, short intervals; repeated, since which task runs first is trio's choice.
    interval, timeout, stopped_for = 0.1, 0.5, 1.2

    async def one_round() -> None:
        session, agent, theirs = _socket_session()
        session.keepalive_interval, session.keepalive_timeout = interval, timeout
        beat = encode_control(Keepalive(reply=True))
        done = threading.Event()

        plain = socket.socket(fileno=os.dup(theirs.fileno()))  # usable from a thread

        def heartbeats() -> None:  # the agent, unaffected by the CLI being stopped
            while not done.wait(interval):
                plain.sendall(_frame(agent, FrameType.CONTROL, beat))

        beating = threading.Thread(target=heartbeats)
        beating.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.keep_alive)
                nursery.start_soon(session.receive)
                await trio.sleep(3 * interval)
                time.sleep(stopped_for)  # noqa: ASYNC251 - the whole CLI stopped: no task runs
                await trio.sleep(3 * interval)
                assert session._lost_because is None, session._lost_because
                nursery.cancel_scope.cancel()
        finally:
            done.set()
            beating.join()
            plain.close()
            theirs.close()

    async def main() -> None:
        for _ in range(6):
            await one_round()

    trio.run(main)
