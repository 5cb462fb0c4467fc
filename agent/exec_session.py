"""A single command without a terminal: separate stdout and stderr, forwarded stdin, exit status.

The argv runs directly (no shell) unless the spec asks for the account's shell. The command
leads a new session. As under sshd, a session whose command exits goes on until its output
pipes reach end of file (a background process it started may still be writing), then ends with
the command's status, and what is left runs on; so it does after ``hang_up`` (the operator's
connection died: stdin closed, SIGHUP to the command's group); cancelling it (the operator
interrupts, the rendezvous ends it, the agent stops) tears down everything it started. With
``kill_leftover_processes`` the session ends when the command exits and everything is torn down.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from agent.login_records import check_login_uid, login_uid_applies
from agent.process_group import (
    DEFAULT_SESSION_UMASK,
    TEARDOWN_GRACE_SECONDS,
    Account,
    ExitStatus,
    OutputHandler,
    OutputPump,
    OutputStream,
    SessionLeader,
    SessionProcessError,
    child_start_options,
    close_fd,
    minimal_environment,
    signal_from_name,
    start_failure,
    write_all,
)

MAX_ARGUMENTS = 4096
MAX_COMMAND_BYTES = 128 * 1024
# The command's output pipes hold this much (Linux's default is 64 KiB), so it can run ahead
# while the agent seals and sends; still a bounded buffer, so a slow reader stalls the command.
OUTPUT_PIPE_SIZE = 1024 * 1024
# How much of that one read takes at most (split into frames of MAX_FRAME_PAYLOAD).
EXEC_OUTPUT_CHUNK_SIZE = 256 * 1024


@dataclass(frozen=True)
class ExecSessionSpec:
    """A command to run: an argv list, or with ``use_shell`` a single command line for ``sh -c``."""

    command: Sequence[str]
    user: str | None = None
    use_shell: bool = False
    environment: tuple[tuple[str, str], ...] = ()
    teardown_grace: float = TEARDOWN_GRACE_SECONDS
    # TUCDESK_SESSION_ID and TUCDESK_OPERATOR (process_group.session_variables).
    session_variables: tuple[tuple[str, str], ...] = ()
    kill_leftover_processes: bool = False
    umask: int = DEFAULT_SESSION_UMASK

    def __post_init__(self) -> None:
        if not self.command or isinstance(self.command, str):
            raise SessionProcessError("a command is a non-empty list of arguments")
        if len(self.command) > MAX_ARGUMENTS or sum(map(len, self.command)) > MAX_COMMAND_BYTES:
            raise SessionProcessError("the command is longer than the agent accepts")
        if any("\x00" in argument for argument in self.command):
            raise SessionProcessError("a command argument contains a NUL byte")
        if self.use_shell and len(self.command) != 1:
            raise SessionProcessError("a shell command is one command line")


class ExecSession:
    """A running command: stream stdout and stderr, feed and close its stdin, signal it."""

    def __init__(
        self,
        leader: SessionLeader,
        stdin_fd: int,
        stdout_fd: int,
        stderr_fd: int,
        *,
        wait_for_end_of_output: bool = True,
    ) -> None:
        self._leader = leader
        self._wait_for_end_of_output = wait_for_end_of_output
        self._exit_status: ExitStatus | None = None
        # Set once run() returned: the command exited (and its output ended) on its own.
        self.ended_normally = False
        # Set by hang_up: the operator's connection died, and the session ends as a hang-up.
        self.hung_up = False
        self._pumps: list[OutputPump] = []
        self._stdin_fd: int | None = stdin_fd
        self._stdout_fd = stdout_fd
        self._stderr_fd = stderr_fd
        self._input_lock = trio.StrictFIFOLock()

    @property
    def pid(self) -> int:
        """The command's pid (also its session and process group id)."""
        return self._leader.pid

    @property
    def exit_status(self) -> ExitStatus | None:
        """The command's exit code or signal, once it has exited."""
        return self._exit_status

    async def run(self, on_output: OutputHandler) -> ExitStatus:
        """Stream stdout and stderr until the command has exited and both reached end of file
        (only until it exits with ``kill_leftover_processes``); return its exit code or signal.

        Each chunk handed to ``on_output`` holds up to EXEC_OUTPUT_CHUNK_SIZE bytes (several
        frames' worth): what bulk output has ready goes on in one piece.
        """
        pumps = [
            OutputPump(self._stdout_fd, OutputStream.STDOUT, EXEC_OUTPUT_CHUNK_SIZE),
            OutputPump(self._stderr_fd, OutputStream.STDERR, EXEC_OUTPUT_CHUNK_SIZE),
        ]
        self._pumps = pumps
        async with trio.open_nursery() as nursery:
            for pump in pumps:
                nursery.start_soon(pump.run, on_output)
            status = await self._leader.wait_for_exit()
            self._exit_status = status
            if not self._wait_for_end_of_output:
                for pump in pumps:
                    pump.child_exited()
        self.ended_normally = True
        return status

    async def send_input(self, data: bytes) -> None:
        """Write ``data`` to the command's stdin; discarded once stdin is closed or unread."""
        async with self._input_lock:
            if self._stdin_fd is None:
                return
            try:
                if not await write_all(self._stdin_fd, data):
                    self._close_stdin()
            except trio.ClosedResourceError:
                return

    async def close_input(self) -> None:
        """Close the command's stdin, after any input still being written."""
        async with self._input_lock:
            self._close_stdin()

    def resize(self, rows: int, cols: int) -> None:
        """Nothing to do: an exec session has no terminal."""

    def hang_up(self) -> None:
        """The operator's connection died: close the command's stdin and send its process group
        SIGHUP and SIGCONT, as a hang-up would; ``run`` then returns once the command has exited,
        without waiting for output that leftover processes hold open (their writes fail once
        the pipes are closed, as after sshd). What ignores SIGHUP (nohup) runs on, unless
        ``kill_leftover_processes``."""
        self.hung_up = True
        self._close_stdin()  # wakes a write waiting for room with ClosedResourceError
        self._wait_for_end_of_output = False
        if self._exit_status is not None:
            for pump in self._pumps:
                pump.child_exited()
            return  # what it left behind is not hung up, as no terminal reaches it
        self._leader.signal_group(signal.SIGHUP)
        self._leader.signal_group(signal.SIGCONT)

    def signal(self, name: str) -> None:
        """Send an allowed signal to the command's process group."""
        self._leader.signal_group(signal_from_name(name))

    def _close_stdin(self) -> None:
        if self._stdin_fd is not None:
            close_fd(self._stdin_fd)
            self._stdin_fd = None

    def _close_all(self) -> None:
        self._close_stdin()
        close_fd(self._stdout_fd)
        close_fd(self._stderr_fd)


def _enlarge_pipe(fd: int) -> None:
    """Grow a pipe to OUTPUT_PIPE_SIZE where the system allows it (best effort: the limit is
    /proc/sys/fs/pipe-max-size, and per-user quotas may refuse)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, OUTPUT_PIPE_SIZE)
    except OSError:
        pass


@asynccontextmanager
async def open_exec_session(spec: ExecSessionSpec) -> AsyncIterator[ExecSession]:
    """Start the command. On leaving the block after ``run`` returned, only the command is
    reaped (unless ``kill_leftover_processes``); any other way out (cancelled, an error) hangs
    up and kills everything it started."""
    account = Account.lookup(spec.user)
    start_options = child_start_options(account, spec.umask)
    shell = account.login_shell
    arguments = [shell, "-c", spec.command[0]] if spec.use_shell else list(spec.command)
    ours: list[int] = []
    theirs: list[int] = []
    try:
        for _ in range(3):
            read_end, write_end = os.pipe()
            ours.append(read_end)
            theirs.append(write_end)
        # stdin is the other way round: the child reads, we write.
        ours[0], theirs[0] = theirs[0], ours[0]
        try:
            process = await trio.lowlevel.open_process(
                arguments,
                stdin=theirs[0],
                stdout=theirs[1],
                stderr=theirs[2],
                start_new_session=True,
                env={
                    **minimal_environment(account, shell, None, spec.environment),
                    **dict(spec.session_variables),
                },
                cwd=account.working_directory,
                **start_options,
            )
        except OSError as error:
            raise start_failure(error, arguments[0]) from None
        except subprocess.SubprocessError as error:
            raise SessionProcessError(f"cannot run {arguments[0]!r}: {error}") from None
    except BaseException:
        for fd in ours:
            os.close(fd)
        raise
    finally:
        for fd in theirs:
            os.close(fd)
    for fd in ours:
        os.set_blocking(fd, False)
    for fd in ours[1:]:
        _enlarge_pipe(fd)
    if login_uid_applies():
        check_login_uid(process.pid, account.uid)
    leader = SessionLeader(process)
    session = ExecSession(
        leader, *ours, wait_for_end_of_output=not spec.kill_leftover_processes
    )
    forced = True
    try:
        yield session
        forced = False
    finally:
        hung_up_or_ended = session.ended_normally or session.hung_up
        if hung_up_or_ended and not (forced or spec.kill_leftover_processes):
            await leader.release()
        else:
            await leader.terminate(spec.teardown_grace)
        session._close_all()
