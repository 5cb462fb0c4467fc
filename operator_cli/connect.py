"""`tucdesk connect AGENT`: an interactive shell on an agent, like ``ssh host``.

Our terminal goes into raw mode for the session and is restored on every way out
(operator_cli/terminal.py); keystrokes are forwarded as DATA frames, except the ssh escapes
after a newline (``~.`` disconnects, ``~^Z`` suspends, ``~?`` lists them;
operator_cli/escape.py). Window size changes (SIGWINCH) are sent as Resize. We exit with the
remote shell's status, or 255 when the connection fails or ``~.`` ends it, as ssh does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import trio

from operator_cli.escape import (
    DEFAULT_ESCAPE_CHARACTER,
    EscapeAction,
    EscapeScanner,
    escape_help,
)
from operator_cli.known_agents import KnownAgents
from operator_cli.session_client import (
    Closed,
    ConnectionLost,
    Exited,
    OperatorSession,
    RefusalProbe,
    SessionError,
    SessionNotices,
    SessionTicket,
    exit_code_for,
    open_session,
    output_runs,
)
from operator_cli.stdio import InputReader, OutputWriter
from operator_cli.terminal import RawTerminal, WindowSize, send_window_size_changes
from protocol.control import (
    MAX_ENV_ENTRIES,
    MAX_ENV_VALUE_LENGTH,
    MAX_TERMINAL_TYPE_LENGTH,
    SessionStart,
)
from protocol.identity import SigningIdentity

EXIT_CONNECTION_FAILED = 255
DEFAULT_TERMINAL_TYPE = "xterm-256color"
RESIZE_QUEUE_SIZE = 16
# The AcceptEnv-style subset protocol.control accepts: locale, time zone, colour support.
_PASSED_ENV_NAME = re.compile(r"LANG|LANGUAGE|LC_[A-Z]{1,32}|TZ|COLORTERM")
_TERMINAL_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def terminal_type(environ: Mapping[str, str]) -> str:
    """$TERM when it is a plausible terminal name, else xterm-256color."""
    value = environ.get("TERM", "")
    if _TERMINAL_TYPE.fullmatch(value) and len(value) <= MAX_TERMINAL_TYPE_LENGTH:
        return value
    return DEFAULT_TERMINAL_TYPE


def passed_environment(environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """The locale, time zone and colour variables sent to the remote shell (like SendEnv)."""
    chosen = [
        (name, value)
        for name, value in sorted(environ.items())
        if _PASSED_ENV_NAME.fullmatch(name)
        and len(value) <= MAX_ENV_VALUE_LENGTH
        and "\x00" not in value
    ]
    return tuple(chosen[:MAX_ENV_ENTRIES])


def shell_start(size: WindowSize, environ: Mapping[str, str]) -> SessionStart:
    """The SessionStart of a shell session for a terminal of ``size``."""
    return SessionStart(
        mode="shell", command=(), terminal_type=terminal_type(environ), rows=size.rows,
        cols=size.cols, env=passed_environment(environ),
    )


def exec_terminal_start(
    command: Sequence[str], size: WindowSize, environ: Mapping[str, str]
) -> SessionStart:
    """The SessionStart of ``exec -t``: ``command`` on a terminal of ``size``."""
    return SessionStart(
        mode="exec", command=tuple(command), terminal_type=terminal_type(environ),
        rows=size.rows, cols=size.cols, env=passed_environment(environ), pty=True,
    )


@dataclass
class ConnectOutcome:
    """How the session ended, reported once the terminal is back to normal."""

    exit_code: int = EXIT_CONNECTION_FAILED
    message: str | None = None
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ConnectOptions:
    """The descriptors the session uses (the tests give a PTY's)."""

    stdin_fd: int = 0
    stdout_fd: int = 1
    stderr_fd: int = 2
    escape_character: int | None = DEFAULT_ESCAPE_CHARACTER  # None: escapes off
    # False (-n, as ssh -n): stdin is /dev/null. Nothing is read from stdin_fd (its terminal
    # stays as it is, no escapes) and the end of input is sent at once.
    read_input: bool = True


async def run_connect(
    ticket: SessionTicket,
    identity: SigningIdentity,
    known_agents: KnownAgents,
    start: SessionStart,
    options: ConnectOptions,
    refusal_probe: RefusalProbe | None = None,
    notices: SessionNotices | None = None,
) -> ConnectOutcome:
    """Open the shell session and run it with the terminal in raw mode; report how it ended."""
    session = await open_session(
        ticket, identity, known_agents, start, refusal_probe=refusal_probe,
        notices=notices,
    )
    outcome = ConnectOutcome()
    terminal = RawTerminal(options.stdin_fd)
    entered: AbstractContextManager[RawTerminal] = (
        terminal if options.read_input else nullcontext(terminal)
    )
    try:
        with entered:
            await _run(session, options, outcome, terminal)
    finally:
        with trio.CancelScope(shield=True):
            await session.close()
    return outcome


async def _run(
    session: OperatorSession,
    options: ConnectOptions,
    outcome: ConnectOutcome,
    terminal: RawTerminal,
) -> None:
    stdout = OutputWriter(options.stdout_fd)
    stderr = OutputWriter(options.stderr_fd)
    try:
        await _carry(session, options, outcome, terminal, stdout, stderr)
    finally:
        stdout.close()
        stderr.close()


async def _carry(
    session: OperatorSession,
    options: ConnectOptions,
    outcome: ConnectOutcome,
    terminal: RawTerminal,
    stdout: OutputWriter,
    stderr: OutputWriter,
) -> None:
    status: int | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(session.keep_alive)
        if options.read_input:
            nursery.start_soon(_pump_keystrokes, session, options, terminal, stdout, outcome,
                               nursery.cancel_scope)
            size_fd = window_fd(options.stdin_fd, options.stdout_fd)
        else:
            nursery.start_soon(_send_end_of_input, session)
            size_fd = options.stdout_fd
        await nursery.start(_forward_resizes, session, size_fd)
        try:
            ended = False
            while not ended:
                events = await session.receive_batch()
                if not events:
                    break
                for stream, chunks, event in output_runs(events):
                    if stream is not None:
                        # Waits in trio while the terminal is slow: keystrokes and ~. go on.
                        await (stdout if stream == "stdout" else stderr).write_many(chunks)
                    elif isinstance(event, Exited):
                        status = exit_code_for(event.status)
                    elif isinstance(event, Closed):
                        if status is None:
                            outcome.message = _close_message(event)
                        ended = True
                        break
        except ConnectionLost as error:
            if status is None:
                outcome.message = str(error)
        except SessionError as error:
            outcome.message = str(error)
        nursery.cancel_scope.cancel()
    if status is not None:
        outcome.exit_code = status
        outcome.notes.append(f"Connection to {session.ticket.agent_name} closed.")


def _close_message(event: Closed) -> str:
    if event.reason is None:
        return "the agent ended the session"
    detail = event.reason.message or event.reason.reason
    if event.reason.reason == "policy-denied":
        return f"the agent refused the session: {detail}"
    return f"the agent ended the session ({event.reason.reason}): {detail}"


async def _send_end_of_input(session: OperatorSession) -> None:
    """-n: the input is /dev/null, so its end is all there is to send."""
    try:
        await session.send_eof()
    except SessionError:
        return  # the connection is gone; the receiving side reports it


async def _pump_keystrokes(
    session: OperatorSession,
    options: ConnectOptions,
    terminal: RawTerminal,
    stdout: OutputWriter,
    outcome: ConnectOutcome,
    scope: trio.CancelScope,
) -> None:
    try:
        await _forward_keystrokes(session, options, terminal, stdout, outcome, scope)
    except SessionError:
        return  # the connection is gone; the receiving side reports it


async def _forward_keystrokes(
    session: OperatorSession,
    options: ConnectOptions,
    terminal: RawTerminal,
    stdout: OutputWriter,
    outcome: ConnectOutcome,
    scope: trio.CancelScope,
) -> None:
    reader = InputReader(options.stdin_fd)
    scanner = EscapeScanner(options.escape_character)
    while True:
        data = await reader.read()
        if not data:
            await session.send_eof()
            return
        result = scanner.feed(data)
        if result.forward:
            await session.send_data(result.forward)
        for action in result.actions:
            if action is EscapeAction.SHOW_HELP:
                assert options.escape_character is not None
                await stdout.write(escape_help(options.escape_character).encode())
            elif action is EscapeAction.SUSPEND:
                # The whole process stops (the loop too) until `fg`; the session waits.
                terminal.suspend()
            elif action is EscapeAction.DISCONNECT:
                outcome.exit_code = EXIT_CONNECTION_FAILED
                outcome.notes.append(f"Connection to {session.ticket.agent_name} closed.")
                outcome.message = None
                scope.cancel()
                return


async def _forward_resizes(
    session: OperatorSession,
    fd: int,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    send, receive = trio.open_memory_channel[WindowSize](RESIZE_QUEUE_SIZE)
    async with trio.open_nursery() as nursery:
        await nursery.start(send_window_size_changes, fd, send)
        task_status.started()
        async for size in receive:
            try:
                await session.resize(size.rows, size.cols)
            except SessionError:
                return  # the connection is gone; the receiving side reports it


def window_fd(stdin_fd: int = 0, stdout_fd: int = 1) -> int:
    """The descriptor whose terminal size we report: stdin's terminal, else stdout's."""
    return stdin_fd if os.isatty(stdin_fd) else stdout_fd
