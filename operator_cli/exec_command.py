"""`tucdesk exec AGENT -- CMD [ARGS…]`: run one command on an agent, like ``ssh host cmd``.

Remote stdout goes to our stdout and remote stderr to our stderr, byte for byte; our stdin is
piped through (not read when it is a terminal, unless ``--stdin``; never with ``-n``), its end
sent as an empty DATA frame; the exit status is the remote command's (128 + N when a signal N
ended it). Failures to set the session up exit 255, as ssh does.

SIGINT, SIGTERM and SIGHUP are forwarded to the remote command the first time; a second one
ends the session from this side.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from operator_cli.known_agents import KnownAgents
from operator_cli.session_client import (
    Closed,
    ConnectionLost,
    Exited,
    OperatorSession,
    RefusalProbe,
    SessionError,
    SessionNotices,
    SessionRefused,
    SessionTicket,
    exit_code_for,
    open_session,
    output_runs,
)
from operator_cli.stdio import InputReader, OutputWriter
from protocol.control import SessionStart
from protocol.identity import SigningIdentity

EXIT_CONNECTION_FAILED = 255
EXIT_STDOUT_CLOSED = 128 + signal.SIGPIPE
FORWARDED_SIGNALS = {signal.SIGINT: "INT", signal.SIGTERM: "TERM", signal.SIGHUP: "HUP"}
EXEC_TERMINAL_TYPE = "dumb"
EXEC_ROWS, EXEC_COLS = 24, 80


@dataclass(frozen=True)
class ExecOptions:
    """What the exec command needs besides the session itself."""

    command: tuple[str, ...]
    read_stdin: bool
    stdin_fd: int = 0
    stdout_fd: int = 1
    stderr_fd: int = 2


def should_read_stdin(no_stdin: bool, force_stdin: bool, stdin_fd: int = 0) -> bool:
    """Read stdin unless -n, or unless it is a terminal and --stdin was not given."""
    if no_stdin:
        return False
    if force_stdin:
        return True
    try:
        return not os.isatty(stdin_fd)
    except OSError:
        return False


def exec_start(command: tuple[str, ...]) -> SessionStart:
    """The SessionStart of an exec session for ``command``."""
    return SessionStart(
        mode="exec", command=command, terminal_type=EXEC_TERMINAL_TYPE, rows=EXEC_ROWS,
        cols=EXEC_COLS,
    )


async def run_exec(
    ticket: SessionTicket,
    identity: SigningIdentity,
    known_agents: KnownAgents,
    options: ExecOptions,
    refusal_probe: RefusalProbe | None = None,
    notices: SessionNotices | None = None,
    on_opened: Callable[[], None] | None = None,
) -> int:
    """Open the session, tell ``on_opened`` (if given) once the handshake is done, stream it,
    and return the exit code to exit with."""
    session = await open_session(
        ticket, identity, known_agents, exec_start(options.command), refusal_probe=refusal_probe,
        notices=notices,
    )
    try:
        if on_opened is not None:
            on_opened()
        return await stream_exec(session, options)
    finally:
        with trio.CancelScope(shield=True):
            await session.close()


class _Interruption:
    """The signal that made the operator give up on the session, if any."""

    signum: int | None = None


async def stream_exec(session: OperatorSession, options: ExecOptions) -> int:
    """Carry an open exec session: stdin out, stdout/stderr in; return the exit code."""
    stdout = OutputWriter(options.stdout_fd)
    stderr = OutputWriter(options.stderr_fd)
    try:
        return await _carry(session, options, stdout, stderr)
    finally:
        stdout.close()
        stderr.close()


async def _carry(
    session: OperatorSession, options: ExecOptions, stdout: OutputWriter, stderr: OutputWriter
) -> int:
    status: int | None = None
    failure: SessionError | None = None
    interruption = _Interruption()
    async with trio.open_nursery() as nursery:
        if options.read_stdin:
            nursery.start_soon(_pump_stdin, session, InputReader(options.stdin_fd))
        else:
            await _quietly(session.send_eof())
        nursery.start_soon(_forward_signals, session, nursery.cancel_scope, interruption)
        nursery.start_soon(session.keep_alive)
        try:
            ended = False
            while not ended:
                events = await session.receive_batch()
                if not events:
                    break
                for stream, chunks, event in output_runs(events):
                    if stream is not None:
                        writer = stdout if stream == "stdout" else stderr
                        if not await writer.write_many(chunks) and writer is stdout:
                            # Like a pipeline stage whose reader left: stop, as SIGPIPE would.
                            status = EXIT_STDOUT_CLOSED
                            ended = True
                            break
                    elif isinstance(event, Exited):
                        status = exit_code_for(event.status)
                    elif isinstance(event, Closed):
                        if status is None:
                            failure = _close_failure(event)
                        ended = True
                        break
        except SessionError as error:
            # After the exit status, a connection that just drops has lost nothing.
            if status is None or not isinstance(error, ConnectionLost):
                failure = error
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if status is None and interruption.signum is not None:
        return 128 + interruption.signum
    if status is None:
        raise SessionError("the session ended without an exit status from the agent")
    return status


async def _quietly(sending: Awaitable[None]) -> None:
    """Send without failing: a lost connection is reported by the receiving side instead."""
    try:
        await sending
    except SessionError:
        pass


def _close_failure(event: Closed) -> SessionError:
    if event.reason is None:
        return SessionError("the agent ended the session without an exit status")
    detail = event.reason.message or event.reason.reason
    if event.reason.reason == "policy-denied":
        return SessionRefused(f"the agent refused the session: {detail}")
    return SessionError(f"the agent ended the session ({event.reason.reason}): {detail}")


async def _pump_stdin(session: OperatorSession, reader: InputReader) -> None:
    try:
        while True:
            data = await reader.read()
            if not data:
                await session.send_eof()
                return
            await session.send_data(data)
    except SessionError:
        return  # the connection is gone; the receiving side reports it


async def _forward_signals(
    session: OperatorSession, scope: trio.CancelScope, interruption: _Interruption
) -> None:
    with trio.open_signal_receiver(*FORWARDED_SIGNALS) as signals:
        forwarded = False
        async for signum in signals:
            if forwarded:
                print(f"tucdesk: {signal.Signals(signum).name} again; disconnecting",
                      file=sys.stderr)
                interruption.signum = signum
                scope.cancel()
                return
            forwarded = True
            await _quietly(session.signal(FORWARDED_SIGNALS[signal.Signals(signum)]))
