"""`tucdesk demo [--exec CMD] [--keep]`: a whole TucDesk on this machine, with one command.

In a fresh temporary directory it starts a rendezvous (SQLite, TLS under a local CA made for
this run), a relay and an agent on 127.0.0.1, enrolls an operator and the agent, then opens a
shell on the agent through the relay (``tucdesk connect``) or runs CMD there (``tucdesk exec``)
and exits with its status. Progress goes to stderr so ``--exec`` output stays clean. Every way
out (the session ending, an error, Ctrl-C while starting, SIGTERM, SIGHUP) stops the processes
and removes the directory, unless ``--keep``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from operator_cli.local_stack import LocalStack, LocalStackError

EXIT_SETUP_FAILED = 1
DEMO_DIRECTORY_PREFIX = "tucdesk-demo-"
DEMO_AGENT_NAME = "demo-agent"
REMOTE_SHELL = "/bin/sh"
_TERMINATING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class _Terminated(Exception):
    """SIGTERM or SIGHUP arrived: unwind so everything is cleaned up, then exit 128 + N."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _say(message: str) -> None:
    print(f"tucdesk demo: {message}", file=sys.stderr, flush=True)


def run_demo(command: str | None, *, keep: bool = False, debug: bool = False) -> int:
    """Start the local stack, run the session, clean up; return the exit status to use."""
    base = Path(tempfile.mkdtemp(prefix=DEMO_DIRECTORY_PREFIX))
    stack = LocalStack(base, progress=_say)
    try:
        with _terminating_signals_raise():
            _say(f"starting a local TucDesk in {base}")
            try:
                stack.start(DEMO_AGENT_NAME)
            except LocalStackError as error:
                _say(f"could not start: {error}")
                return EXIT_SETUP_FAILED
            _describe(stack, hint_exec=command is None)
            return _run_session(stack, command)
    except _Terminated as terminated:
        _say(f"{terminated}: stopping")
        return 128 + terminated.signum
    except KeyboardInterrupt:
        _say("interrupted: stopping")
        return 128 + signal.SIGINT
    finally:
        with _signals_ignored():
            stack.close()
            if keep:
                _say(f"kept {base} (logs in {stack.log_dir})")
            else:
                shutil.rmtree(base, ignore_errors=True)
            _say("stopped everything" + ("" if keep else " and removed the directory"))


def _describe(stack: LocalStack, *, hint_exec: bool) -> None:
    agent = stack.agent
    assert agent is not None and stack.relay_address is not None
    lines = [
        f"rendezvous  {stack.server_url}  (TLS, CA {stack.ca_file})",
        f"relay       {stack.relay_address[0]}:{stack.relay_address[1]}  (id {stack.relay_id})",
        f"agent       {agent.name}  id {agent.id}",
        f"agent key   {agent.fingerprint}",
        f"operator    CLI home {stack.cli_home}",
    ]
    if hint_exec:  # only while the stack runs for the shell: --exec stops it right after
        lines.append(f"try also    tucdesk --home {stack.cli_home} exec {agent.name} -- uname -a")
    for line in lines:
        _say(line)


def _run_session(stack: LocalStack, command: str | None) -> int:
    agent = stack.agent_name
    if command is None:
        _say(f"opening a shell on {agent} through the relay; type exit or ~. to leave")
        argv = stack.tucdesk_command("connect", agent)
    else:
        _say(f"running on {agent}: {command}")
        argv = stack.tucdesk_command("exec", "-n", agent, "--", REMOTE_SHELL, "-c", command)
    # The session runs in a child with our terminal; Ctrl-C belongs to it (and the remote side).
    child = subprocess.Popen(argv, env=stack.cli_env())
    try:
        with _interrupts_passed_to_child():
            return child.wait()
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(5)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(signum)


@contextmanager
def _terminating_signals_raise() -> Iterator[None]:
    previous = {signum: signal.signal(signum, _raise_terminated) for signum in _TERMINATING_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _do_nothing(signum: int, frame: FrameType | None) -> None:
    """A Python-level no-op: unlike SIG_IGN it is not inherited by children we start."""


@contextmanager
def _interrupts_passed_to_child() -> Iterator[None]:
    previous = signal.signal(signal.SIGINT, _do_nothing)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """While cleaning up, a second Ctrl-C or SIGTERM must not leave processes behind."""
    handled = (signal.SIGINT, *_TERMINATING_SIGNALS)
    previous = {signum: signal.signal(signum, _do_nothing) for signum in handled}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
