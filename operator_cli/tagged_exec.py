"""`tucdesk exec --tag TAG -- CMD`: run one command on every agent carrying a tag, in parallel.

Like ``pssh -i`` or ``tsh ssh`` with labels: each agent's session is an ordinary `tucdesk exec`
(its own process, so pinning, approvals and refusals work exactly as for one agent), at most
``parallel`` at a time (``--parallel``, default PARALLEL_SESSIONS). Every line an agent prints
comes out prefixed with its name (stdout to stdout, stderr to stderr; with ``--json`` both to
stderr), whole lines only so agents never interleave inside one.
A line longer than MAX_LINE_BYTES is written in pieces as it comes (memory stays bounded): each
piece ends with a newline, and the pieces after the first carry ``NAME+ `` instead of ``NAME: ``.
A summary of each agent's exit status ends on stderr, and with ``--json`` one JSON document on
stdout (result_document) is the only thing there, for scripts, also when nothing could be run
(nothing_ran_document). Exit status: 0 if every agent ran the command and it succeeded, 1 if a
command failed or some agent's did not run (offline, refused, a lost session), 255 if nothing
could be set up (the service unreachable or refusing the listing, no agent with the tag, a
command too large).

Signals (as GNU parallel): the children run in a process group of their own, so SIGINT,
SIGTERM and SIGHUP reach this process alone, whoever sent them (a terminal's Ctrl-C, a job's
``timeout``, ``kill PID``), and it passes each one on to every child exactly once. A child
waiting for approval then withdraws its request (or, on Ctrl-C without --approval-timeout,
keeps it pending) and a running session passes the signal to its remote command. After
SIGINT no further agent is started and the exit status is 130. After SIGTERM or SIGHUP no
further agent is started, the children get STOP_WAIT_SECONDS to withdraw their requests and
end, and this process then ends by the same signal.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import IO, Any

from operator_cli.agent_listing import AgentFilter, AgentListError, fetch_agents
from operator_cli.client import ApiError, Session
from operator_cli.home import CliHome, HomeError
from operator_cli.http import CaFileError, ResponseTooLargeError, TransportError
from operator_cli.terminal_text import visible
from protocol.errors import ProtocolError
from protocol.exec_limits import CommandTooLargeError, check_exec_command

PARALLEL_SESSIONS = 8
EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_INTERRUPTED = 130  # the child's Ctrl-C (or a second signal that gave up the session)
EXIT_CONNECTION_FAILED = 255
# What a child writes on its status pipe, at most: "opened\n" then "exit N\n".
MAX_STATUS_REPORT_BYTES = 64
READ_SIZE = 64 * 1024
# A line without a newline is held back at most this long, then written as a piece.
MAX_LINE_BYTES = 64 * 1024
CLI_ENTRY_POINT = "import sys; from operator_cli.main import main; sys.exit(main())"
# Signals passed on to the children; after the stop ones this process ends by the signal.
PASSED_ON_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# The same signal again within this long is the same request: timeout(1) signals its command,
# then the command's process group, which this process is in.
DUPLICATE_SIGNAL_SECONDS = 1.0
# After SIGTERM/SIGHUP, how long the children get to withdraw their approval requests (one
# request each, over a connection already open) and end before this process ends anyway.
STOP_WAIT_SECONDS = 10.0


@dataclass(frozen=True)
class TaggedAgent:
    """An agent the tag selected: its id (to open the session by) and name (the prefix)."""

    agent_id: str
    name: str
    online: bool


@dataclass(frozen=True)
class StatusReport:
    """What a child `tucdesk exec` said on its status pipe: whether the session opened (the
    handshake was done) and the remote command's exit status, if it ended with one."""

    opened: bool = False
    exit_status: int | None = None


@dataclass(frozen=True)
class AgentOutcome:
    """How the command went on one agent: its exit status, or why it did not run."""

    agent: TaggedAgent
    status: int | None
    note: str = ""


def tagged_agents(home: CliHome, tags: Sequence[str]) -> list[TaggedAgent]:
    """The team's agents carrying every tag (lower-cased, as stored), by name."""
    session = Session.from_home(home)
    try:
        listed = fetch_agents(session, AgentFilter(tags=tuple(tag.lower() for tag in tags)))
    finally:
        session.close()
    # Names come from whoever enrolled the agents: escaped before they prefix any line.
    agents = [TaggedAgent(str(agent["id"]), visible(str(agent.get("name") or agent["id"])),
                          bool(agent.get("online"))) for agent in listed.agents]
    return sorted(agents, key=lambda agent: (agent.name, agent.agent_id))


def exec_on_tagged(
    home: CliHome,
    tags: Sequence[str],
    command: Sequence[str],
    *,
    global_options: Sequence[str] = (),
    parallel: int = PARALLEL_SESSIONS,
    as_json: bool = False,
    approval_timeout: float | None = None,
) -> int:
    """Run ``command`` on every agent carrying ``tags``; print prefixed output and a summary
    (``as_json``: the output all on stderr, and result_document on stdout at the end)."""
    try:
        check_exec_command(command)  # once here, not once per agent
    except CommandTooLargeError as error:
        return _nothing_ran(f"{error}; send a long script on stdin to one agent at a time "
                            "instead: tucdesk exec AGENT -- sh -s < script.sh", as_json)
    try:
        agents = tagged_agents(home, tags)
    except ApiError as error:
        return _nothing_ran(f"the server refused: {visible(error.message)} "
                            f"({visible(error.code)})", as_json, debug="--debug" in global_options)
    except TransportError as error:
        return _nothing_ran(error.describe(), as_json, debug="--debug" in global_options)
    except (HomeError, ProtocolError, OSError, ResponseTooLargeError, AgentListError,
            CaFileError) as error:
        return _nothing_ran(str(error), as_json, debug="--debug" in global_options)
    if not agents:
        which = f"every tag: {', '.join(tags)}" if len(tags) > 1 else f"the tag {tags[0]}"
        return _nothing_ran(f"no agent of your team carries {which} "
                            "(see tucdesk agents --tag TAG)", as_json)
    exec_options = [] if approval_timeout is None else [
        "--approval-timeout", f"{approval_timeout:.0f}s"]
    width = max(len(agent.name) for agent in agents)
    output = _PrefixedOutput(width, stdout_fd=2 if as_json else 1)
    online = [agent for agent in agents if agent.online]
    outcomes = {agent: AgentOutcome(agent, None, "offline: not run")
                for agent in agents if not agent.online}
    children = _Children()
    futures: list[Future[AgentOutcome]] = []
    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        with children.passing_signals_on():
            try:
                for agent in online:
                    futures.append(pool.submit(_run_one, home, agent, command, global_options,
                                               output, exec_options, children))
                for future in futures:
                    outcome = future.result()
                    outcomes[outcome.agent] = outcome
                children.collecting = False  # a signal from now on is only passed on
            except _Stopped as stopped:
                _end_by_signal(stopped.signum, futures, children)
        if children.stopped_by is not None:  # came as the last child ended
            _end_by_signal(children.stopped_by, futures, children)
    finally:
        pool.shutdown(wait=True)
    ordered = [outcomes[agent] for agent in agents]
    for line in summary_lines(ordered, width):
        print(line, file=sys.stderr)
    if as_json:
        print(json.dumps(result_document(ordered), indent=2))
    if children.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if all(outcome.status == 0 for outcome in ordered) else EXIT_SOME_FAILED


def _end_by_signal(
    signum: int, futures: Sequence[Future[AgentOutcome]], children: _Children
) -> None:
    """SIGTERM/SIGHUP: wait (bounded) for the children, told already, then end by ``signum``
    as a job's supervisor expects (a shell sees 128+N)."""
    name = _signal_name(signum)
    _say_if_possible(f"tucdesk: {name}: passed on to {children.running} agent session(s); "
                     f"waiting up to {STOP_WAIT_SECONDS:g}s for them to withdraw their requests "
                     "and end")
    _, not_done = wait(futures, timeout=STOP_WAIT_SECONDS)
    if not_done:
        _say_if_possible(f"tucdesk: {children.running} agent session(s) still running; "
                         "ending anyway")
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _say_if_possible(line: str) -> None:
    """One line on stderr, unless it is gone (SIGHUP: the terminal hung up)."""
    try:
        print(line, file=sys.stderr, flush=True)
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


class _Stopped(BaseException):
    """SIGTERM or SIGHUP arrived (raised once, in the main thread, by _Children's handler)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Children:
    """The running children and the signals passed on to them (see the module docstring)."""

    def __init__(self) -> None:
        # Reentrant: the signal handler takes it on the main thread, which may hold it already.
        self._lock = threading.RLock()
        self._running: set[subprocess.Popen[bytes]] = set()
        self._last_seen: dict[int, float] = {}
        self.stopped_by: int | None = None  # SIGTERM/SIGHUP: no child starts from then on
        self.interrupted = False  # SIGINT: no child starts from then on
        self.collecting = True  # the main thread waits for outcomes: SIGTERM/SIGHUP raise there

    @property
    def running(self) -> int:
        """How many children are running."""
        with self._lock:
            return len(self._running)

    def start(self, argv: Sequence[str], pass_fds: Sequence[int]) -> subprocess.Popen[bytes] | None:
        """Start a child in its own process group, or None once a signal stopped the run."""
        with self._lock:
            if self.stopped_by is not None or self.interrupted:
                return None
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=pass_fds, process_group=0,
            )
            self._running.add(process)
            return process

    def ended(self, process: subprocess.Popen[bytes]) -> None:
        """``process`` has been waited for: no signal goes to its (reusable) pid any more."""
        with self._lock:
            self._running.discard(process)

    @property
    def stop_note(self) -> str:
        """Why an agent was not run after a signal."""
        if self.stopped_by is not None:
            return f"not run: {_signal_name(self.stopped_by)}"
        return "not run: interrupted"

    @contextmanager
    def passing_signals_on(self) -> Iterator[None]:
        """Take PASSED_ON_SIGNALS while the children run: only signals at their default (not
        one ignored under nohup), only on the main thread (where Python delivers them)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        defaults = {signal.SIGINT: signal.default_int_handler}
        taken = {signum: signal.getsignal(signum) for signum in PASSED_ON_SIGNALS
                 if signal.getsignal(signum) == defaults.get(signum, signal.SIG_DFL)}
        for signum in taken:
            signal.signal(signum, self._pass_on)
        try:
            yield
        finally:
            for signum, previous in taken.items():
                signal.signal(signum, previous)

    def _pass_on(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if now - self._last_seen.get(signum, -DUPLICATE_SIGNAL_SECONDS) < DUPLICATE_SIGNAL_SECONDS:
            return
        self._last_seen[signum] = now
        first_stop = signum in STOP_SIGNALS and self.stopped_by is None and self.collecting
        with self._lock:
            if signum in STOP_SIGNALS:
                self.stopped_by = self.stopped_by or signum
            else:
                self.interrupted = True
            for process in self._running:
                try:
                    process.send_signal(signum)
                except OSError:
                    pass  # it has just ended
        if first_stop:
            raise _Stopped(signum)


def _nothing_ran(message: str, as_json: bool, *, debug: bool = False) -> int:
    """Say why no agent could be run (one line on stderr; with --json also the document on
    stdout, which scripts count on) and return EXIT_CONNECTION_FAILED."""
    if debug:
        traceback.print_exc()
    print(f"tucdesk: {message}", file=sys.stderr)
    if as_json:
        print(json.dumps(nothing_ran_document(message), indent=2))
    return EXIT_CONNECTION_FAILED


def nothing_ran_document(error: str) -> dict[str, Any]:
    """The ``--json`` result when nothing could be set up: no agent ran, and why."""
    return {"succeeded": 0, "total": 0, "agents": [], "error": error}


def result_document(outcomes: Sequence[AgentOutcome]) -> dict[str, Any]:
    """The ``--json`` result: how many succeeded, then each agent's exit status (null when it
    did not run or ended without one) and note (why, when the status is not the command's)."""
    return {
        "succeeded": sum(1 for outcome in outcomes if outcome.status == 0),
        "total": len(outcomes),
        "agents": [
            {"name": outcome.agent.name, "id": outcome.agent.agent_id,
             "online": outcome.agent.online, "exit_status": outcome.status,
             "note": outcome.note or None}
            for outcome in outcomes
        ],
    }


def summary_lines(outcomes: Sequence[AgentOutcome], width: int) -> list[str]:
    """The closing summary: how many succeeded, then each agent's status or why it did not run."""
    succeeded = sum(1 for outcome in outcomes if outcome.status == 0)
    lines = [f"tucdesk: {succeeded} of {len(outcomes)} agents succeeded"]
    for outcome in outcomes:
        shown = outcome.note if outcome.status is None else f"exit {outcome.status}"
        if outcome.status is not None and outcome.note:
            shown += f" ({outcome.note})"
        lines.append(f"  {outcome.agent.name:<{width}}  {shown}")
    return lines


def _run_one(
    home: CliHome,
    agent: TaggedAgent,
    command: Sequence[str],
    global_options: Sequence[str],
    output: _PrefixedOutput,
    exec_options: Sequence[str] = (),
    children: _Children | None = None,
) -> AgentOutcome:
    # The child reports on this pipe that the session opened, then the remote exit status: 255
    # from the command itself, 255 for a session that never opened and 255 for one that lost
    # its connection look alike on the exit status alone.
    try:
        status_reader, status_writer = os.pipe()
    except OSError as error:
        return AgentOutcome(agent, None, f"could not start: {error.strerror or error}")
    argv = [sys.executable, "-c", CLI_ENTRY_POINT, "--home", str(home.path), *global_options,
            "exec", "-n", *exec_options, "--status-fd", str(status_writer), agent.agent_id,
            "--", *command]
    children = children or _Children()
    try:
        try:
            process = children.start(argv, (status_writer,))
        finally:
            os.close(status_writer)  # the child's copy alone: EOF once it exits
        if process is None:
            return AgentOutcome(agent, None, children.stop_note)
        assert process.stdout is not None and process.stderr is not None
        try:
            output.relay(agent.name, process.stdout, process.stderr)
            status = process.wait()
        finally:
            children.ended(process)
        reported = _read_status_report(status_reader)
    except OSError as error:
        return AgentOutcome(agent, None, f"could not start: {error.strerror or error}")
    finally:
        os.close(status_reader)
    if status < 0:
        return AgentOutcome(agent, 128 - status, f"tucdesk killed by {_signal_name(-status)}")
    return AgentOutcome(agent, status, outcome_note(status, reported))


def outcome_note(status: int, reported: StatusReport) -> str:
    """Why a child ended as it did, when its exit status is not the remote command's own."""
    if reported.exit_status is not None or status == EXIT_OK:
        return ""
    if status == EXIT_INTERRUPTED:
        return "interrupted"
    if reported.opened:
        return "ended without an exit status"
    return "the session could not be set up"


def _read_status_report(fd: int) -> StatusReport:
    """What the child CLI wrote on its status pipe: ``opened`` once the handshake was done,
    ``exit N`` once the remote command ended; nothing if the session never opened."""
    report = bytearray()
    while chunk := os.read(fd, MAX_STATUS_REPORT_BYTES):
        report += chunk
        if len(report) > MAX_STATUS_REPORT_BYTES:
            return StatusReport()  # not what the CLI writes
    return parse_status_report(bytes(report))


def parse_status_report(report: bytes) -> StatusReport:
    """``opened`` and ``exit N`` lines, in that order, each at most once."""
    opened = False
    exit_status: int | None = None
    for line in report.splitlines():
        words = line.split()
        if words == [b"opened"] and not opened and exit_status is None:
            opened = True
        elif (len(words) == 2 and words[0] == b"exit" and words[1].isdigit()
              and exit_status is None):
            exit_status = int(words[1])
        else:
            return StatusReport()  # not what the CLI writes
    return StatusReport(opened, exit_status)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class _PrefixedOutput:
    """Writes whole lines of every agent, each prefixed with the agent's name, one at a time."""

    def __init__(self, width: int, stdout_fd: int = 1) -> None:
        self._width = width
        self._stdout_fd = stdout_fd  # where agents' stdout lines go (2 with --json)
        self._lock = threading.Lock()
        self._closed_stdout = False

    def relay(self, name: str, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        """Copy both pipes until they end, line by line with the prefix."""
        prefix = f"{name:<{self._width}}: ".encode()
        continued = f"{name:<{self._width}}+ ".encode()
        lines = {stdout.fileno(): LineCutter(prefix, continued),
                 stderr.fileno(): LineCutter(prefix, continued)}
        targets = {stdout.fileno(): self._stdout_fd, stderr.fileno(): 2}
        with selectors.DefaultSelector() as selector:
            for pipe in (stdout, stderr):
                selector.register(pipe, selectors.EVENT_READ)
            while selector.get_map():
                for key, _ in selector.select():
                    fd = key.fd
                    data = os.read(fd, READ_SIZE)
                    if not data:
                        selector.unregister(key.fileobj)
                        block = lines[fd].finish()
                    else:
                        block = lines[fd].feed(data)
                    if block:
                        self._write(targets[fd], block)
        stdout.close()
        stderr.close()

    def _write(self, fd: int, block: bytes) -> None:
        with self._lock:
            if fd == 1 and self._closed_stdout:
                return
            try:
                _write_all(fd, block)
            except BrokenPipeError:
                if fd != 1:
                    raise
                self._closed_stdout = True  # the reader left; the sessions still finish


class LineCutter:
    """One pipe's bytes as prefixed whole lines; a line longer than MAX_LINE_BYTES goes out in
    pieces, each ended with a newline, the later ones with the ``continued`` prefix."""

    def __init__(self, prefix: bytes, continued: bytes, max_line: int = MAX_LINE_BYTES) -> None:
        self._prefix = prefix
        self._continued = continued
        self._max_line = max_line
        self._pending = bytearray()
        self._in_line = False  # the pending bytes continue a piece already written

    def feed(self, data: bytes) -> bytes:
        """The prefixed lines ``data`` completes (only ``data`` is searched for a newline)."""
        blocks: list[bytes] = []
        cut = data.rfind(b"\n") + 1
        if cut:
            whole = data if cut == len(data) else data[:cut]
            if self._pending:
                whole = bytes(self._pending) + whole
                self._pending.clear()
            first = self._continued if self._in_line else self._prefix
            self._in_line = False
            blocks.append(self._prefixed(first, whole))
            data = data[cut:]
        self._pending += data
        if len(self._pending) >= self._max_line:
            blocks.append(self._piece())
        return b"".join(blocks)

    def _prefixed(self, first: bytes, lines: bytes) -> bytes:
        """Whole ``lines`` (ending with a newline), ``first`` before the first, the prefix before
        each other one."""
        if b"\r" in lines:  # a lone CR starts a line too (progress meters): split as bytes do
            split = lines.splitlines(keepends=True)
            return first + split[0] + b"".join(self._prefix + line for line in split[1:])
        # The usual case in one pass over the bytes, not one object per line.
        return first + lines[:-1].replace(b"\n", b"\n" + self._prefix) + b"\n"

    def finish(self) -> bytes:
        """The last line, if the pipe ended without a newline."""
        return self._piece() if self._pending else b""

    def _piece(self) -> bytes:
        piece = (self._continued if self._in_line else self._prefix) + self._pending + b"\n"
        self._pending.clear()
        self._in_line = True
        return bytes(piece)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def global_options_of(args: Any) -> list[str]:
    """Every global flag the parent got, for each agent's `tucdesk exec` (the home is passed
    separately)."""
    options: list[str] = []
    if getattr(args, "debug", False):
        options.append("--debug")
    if getattr(args, "server", None):
        options += ["--server", args.server]
    if getattr(args, "ca_file", None):
        options += ["--ca-file", args.ca_file]
    return options
