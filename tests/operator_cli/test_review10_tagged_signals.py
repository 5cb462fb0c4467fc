"""`exec --tag` passes SIGINT, SIGTERM and SIGHUP sent to the parent alone on to each child
exactly once (a repeat within a second is one signal), in a process group of their own, and
starts no child after one. Real child processes; the signals are real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from operator_cli.tagged_exec import _Children, _Stopped

# Counts the SIGINT/SIGTERM it gets over a second, then prints the count.
CHILD = """
import signal, sys, time
got = []
for number in (signal.SIGINT, signal.SIGTERM):
    signal.signal(number, lambda signum, frame: got.append(signum))
print("ready", flush=True)
time.sleep(1)
print(len(got), sorted(set(got)))
"""


def start_children(children: _Children, count: int = 2) -> list[subprocess.Popen[bytes]]:
    started = []
    for _ in range(count):
        process = children.start([sys.executable, "-c", CHILD], ())
        assert process is not None
        assert process.stdout is not None
        assert process.stdout.readline() == b"ready\n"
        started.append(process)
    return started


def test_sigint_to_the_parent_reaches_each_child_once_and_stops_new_ones() -> None:
    children = _Children()
    with children.passing_signals_on():
        started = start_children(children)
        for process in started:
            assert os.getpgid(process.pid) == process.pid != os.getpgrp()
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same request again: counted once
        outputs = [process.communicate(timeout=10)[0] for process in started]
        assert children.start([sys.executable, "-c", "pass"], ()) is None
    assert outputs == [f"1 [{int(signal.SIGINT)}]\n".encode()] * 2
    assert children.interrupted and children.stop_note == "not run: interrupted"


def test_sigterm_to_the_parent_reaches_each_child_once_and_is_raised_once() -> None:
    children = _Children()
    with children.passing_signals_on():
        started = start_children(children)
        with pytest.raises(_Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0)  # a checkpoint: the handler runs here at the latest
        assert stopped.value.signum == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # timeout(1) then signals the group: not again
        outputs = [process.communicate(timeout=10)[0] for process in started]
    assert outputs == [f"1 [{int(signal.SIGTERM)}]\n".encode()] * 2
    assert children.stop_note == "not run: SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # given back
