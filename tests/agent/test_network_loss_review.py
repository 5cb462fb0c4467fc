"""A lost link's hang-up: what wins over it, how it is noticed, what it leaves and reaps.

The real session host and relay, with the operator driven by hand (as in
test_network_loss_sessions.py): the rendezvous's end request during the hang-up is a forced end;
a lost link is noticed by a heartbeat while the input side is stuck writing to a full stdin; a
command that already exited gets no SIGHUP for what it left; and a main process left running
after a hang-up is reaped by the agent once it exits (docs/sessions.md §4).
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
import trio

import agent.session_host as session_host
from protocol.frames import FrameType
from tests.agent.session_helpers import pid_is_gone, trio_test, wait_until
from tests.agent.test_network_loss_sessions import _ended, _pids_from_shell, _reset
from tests.agent.test_session_host import (
    exec_start,
    operator_session,
    session_stack,
    shell_start,
    wait_for_sessions_to_end,
)

END_FOR_DISABLED = {"type": "end_sessions", "ids": ["ses_1"], "reason": "operator_disabled"}
# A main process that ignores SIGHUP (the operator asked for it with nohup) and prints its pid.
NOHUP_MAIN = ("nohup", "sh", "-c", "echo bg=$$ sh=$$; exec sleep 1000")


def _state(pid: int) -> str:
    """The process's state letter in /proc (Z: a zombie), or "gone"."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"


@pytest.mark.parametrize("kill_leftover", [False, True])
@trio_test
async def test_an_end_request_during_the_hang_up_of_an_exec_is_a_forced_end(
    tmp_path: Path, leftovers: list[int], kill_leftover: bool
) -> None:
    async with (
        session_stack(tmp_path, kill_leftover_processes=kill_leftover) as stack,
        trio.open_nursery() as nursery,
    ):
        async with operator_session(stack, nursery, command=NOHUP_MAIN) as operator:
            await operator.start(exec_start(*NOHUP_MAIN))
            main, _ = await _pids_from_shell(operator)
            leftovers.append(main)
        # The link ended without a CLOSE: the hang-up waits for the main process, which
        # ignores SIGHUP; an admin disables the operator meanwhile.
        await trio.sleep(0.5)
        assert stack.host.end_sessions(END_FOR_DISABLED) == 1
        with trio.fail_after(10):
            await wait_for_sessions_to_end(stack)
        await wait_until(lambda: _state(main) in ("gone", "Z"))
    assert _ended(stack)["reason"] == "operator_disabled"


@trio_test
async def test_an_end_request_during_the_hang_up_of_a_shell_is_a_forced_end(
    tmp_path: Path, leftovers: list[int]
) -> None:
    async with session_stack(tmp_path, shell="/bin/sh") as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, mode="shell") as operator:
            await operator.start(shell_start())
            # A shell that ignores SIGHUP (as a user's trap would), and a plain background job.
            await operator.send(FrameType.DATA, b"trap '' HUP; sleep 1000 & echo bg=$! sh=$$\n")
            job, shell = await _pids_from_shell(operator)
            leftovers += [job, shell]
        await trio.sleep(0.5)
        assert stack.host.end_sessions(END_FOR_DISABLED) == 1
        with trio.fail_after(10):
            await wait_for_sessions_to_end(stack)
        await wait_until(lambda: _state(shell) in ("gone", "Z") and _state(job) in ("gone", "Z"))
    assert _ended(stack)["reason"] == "operator_disabled"


@trio_test
async def test_a_lost_link_is_noticed_while_the_input_side_waits_on_a_full_stdin(
    tmp_path: Path, leftovers: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A command that neither reads its stdin nor prints: only a heartbeat finds the link dead.
    monkeypatch.setattr(session_host, "HEARTBEAT_INTERVAL_SECONDS", 1.0)
    command = ("sh", "-c", "echo bg=$$ sh=$$; exec sleep 1000")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            main, _ = await _pids_from_shell(operator)
            leftovers.append(main)
            for _ in range(8):  # more than the pipe takes: the agent's input side blocks
                await operator.send(FrameType.DATA, b"x" * 60000)
            await trio.sleep(0.5)
            _reset(operator)
        with trio.fail_after(8):
            await wait_for_sessions_to_end(stack)
        assert stack.host.active_sessions == 0
        await wait_until(lambda: _state(main) in ("gone", "Z"))  # hung up
    ended = _ended(stack)
    assert ended["reason"] == "connection-lost"
    assert ended["signal"] == "HUP"


@trio_test
async def test_what_an_exited_command_left_gets_no_sighup_when_the_link_is_lost(
    tmp_path: Path, leftovers: list[int]
) -> None:
    # As after sshd: only the pipes are closed under a leftover holding the output open.
    command = ("sh", "-c", "sleep 1000 & echo bg=$! sh=$$")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            with trio.fail_after(10):
                while (found := re.search(rb"bg=(\d+) sh=(\d+)", bytes(operator.stdout))) is None:
                    await operator.next_frame()
            job, main = int(found.group(1)), int(found.group(2))
            leftovers.append(job)
            await wait_until(lambda: _state(main) in ("gone", "Z"))
            await trio.sleep(0.3)  # the session is still open: the job holds its output
        with trio.fail_after(10):
            await wait_for_sessions_to_end(stack)
        await trio.sleep(0.5)
        assert not pid_is_gone(job), "the leftover was hung up"
        assert _state(job) in ("S", "R")
    ended = _ended(stack)
    assert ended["reason"] == "connection-lost"
    assert ended["exit_code"] == 0


@trio_test
async def test_a_main_process_left_by_a_hang_up_is_reaped_once_it_exits(
    tmp_path: Path, leftovers: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_host, "HANG_UP_WAIT_SECONDS", 0.5)
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=NOHUP_MAIN) as operator:
            await operator.start(exec_start(*NOHUP_MAIN))
            main, _ = await _pids_from_shell(operator)
            leftovers.append(main)
        lost_at = time.monotonic()
        with trio.fail_after(10):
            await wait_for_sessions_to_end(stack)
        # The session ends after the hang-up's wait, not that plus another wait.
        assert time.monotonic() - lost_at < 1.8
        assert _state(main) == "S", "the main process that ignored SIGHUP was not left running"
        os.kill(main, signal.SIGTERM)
        await wait_until(lambda: _state(main) != "S")
        await trio.sleep(0.3)
        assert _state(main) == "gone", f"the left main process is {_state(main)} under the agent"
    assert _ended(stack)["reason"] == "connection-lost"
