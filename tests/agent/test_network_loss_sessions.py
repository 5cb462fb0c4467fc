"""A session whose operator link dies without a CLOSE ends as a hang-up, not a forced end.

The real session host and relay, with the operator driven by hand (tests/agent/test_session_host
.py): the link ends without the operator's CLOSE (the stream closed or reset, as the relay passes
on a dead connection's end after its dead-peer timeout, or a killed CLI) and the session ends as
sshd's dead connection does: SIGHUP to the shell or command, what ignores it (nohup) runs on, and
``session.ended`` says ``connection-lost``. The operator's own CLOSE still ends it as
``operator-disconnected`` and tears everything down (docs/sessions.md §4).
"""

from __future__ import annotations

import os
import re
import socket
import struct
from pathlib import Path

import pytest
import trio

from audit.actions import Action
from protocol.control import Close, ExitStatus, encode_control
from protocol.frames import FrameType
from tests.agent.session_helpers import pid_is_gone, trio_test, wait_until
from tests.agent.test_session_host import (
    OperatorSide,
    Stack,
    exec_start,
    operator_session,
    session_stack,
    shell_start,
    wait_for_sessions_to_end,
)

_PIDS = re.compile(rb"bg=(\d+) sh=(\d+)\b")
# Typed into the shell: a nohup job, and the pids of it and of the shell. The terminal echoes
# the line as typed ("bg=$!"), so only the shell's answer has digits there.
NOHUP_JOB = b"nohup sleep 1000 >/dev/null 2>&1 & echo bg=$! sh=$$\n"


async def _pids_from_shell(operator: OperatorSide) -> tuple[int, int]:
    with trio.fail_after(10):
        while (found := _PIDS.search(bytes(operator.stdout))) is None:
            assert await operator.next_frame() is not None, "the session ended"
    job = int(found.group(1))
    # nohup ignores SIGHUP and then runs sleep: until it has, a hang-up would still end it.
    await wait_until(lambda: _program(job) in ("sleep", ""))
    return job, int(found.group(2))


def _program(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as file:
            return file.read().strip()
    except OSError:
        return ""


def _reset(operator: OperatorSide) -> None:
    """Make the operator's socket close with a reset (SO_LINGER 0): a connection that died."""
    stream = operator.link._stream
    assert isinstance(stream, trio.SocketStream)
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _ended(stack: Stack) -> dict[str, object]:
    event = stack.audit[-1].event
    assert event.action is Action.SESSION_ENDED
    return dict(event.context)


@pytest.mark.parametrize(
    ("shell", "how"),
    [("/bin/sh", "end of stream"), ("/bin/sh", "reset"), ("/bin/bash", "end of stream")],
)
@trio_test
async def test_a_shell_whose_link_dies_is_hung_up_and_its_nohup_job_lives_on(
    tmp_path: Path, leftovers: list[int], shell: str, how: str
) -> None:
    if not os.access(shell, os.X_OK):
        pytest.skip(f"{shell} is not installed")
    async with session_stack(tmp_path, shell=shell) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, mode="shell") as operator:
            await operator.start(shell_start())
            await operator.send(FrameType.DATA, NOHUP_JOB)
            job, leader = await _pids_from_shell(operator)
            leftovers.append(job)
            if how == "reset":
                _reset(operator)
        # The link is gone without a CLOSE: the shell is hung up, the nohup job is not killed.
        await wait_for_sessions_to_end(stack)
        await wait_until(lambda: pid_is_gone(leader))
        assert not pid_is_gone(job), "the nohup job was killed with the session"
    ended = _ended(stack)
    assert ended["reason"] == "connection-lost"
    assert ended["signal"] == "HUP"


@trio_test
async def test_with_kill_leftover_processes_a_lost_link_kills_the_nohup_job_too(
    tmp_path: Path, leftovers: list[int]
) -> None:
    async with (
        session_stack(tmp_path, shell="/bin/sh", kill_leftover_processes=True) as stack,
        trio.open_nursery() as nursery,
    ):
        async with operator_session(stack, nursery, mode="shell") as operator:
            await operator.start(shell_start())
            await operator.send(FrameType.DATA, NOHUP_JOB)
            job, shell = await _pids_from_shell(operator)
            leftovers.append(job)
        await wait_for_sessions_to_end(stack)
        assert pid_is_gone(shell) and pid_is_gone(job)
    assert _ended(stack)["reason"] == "connection-lost"


@trio_test
async def test_the_operator_closing_ends_the_shell_as_disconnected_and_tears_it_down(
    tmp_path: Path, leftovers: list[int]
) -> None:
    # What the CLI sends on ~., a second Ctrl-C of exec, or any other end it chose.
    async with session_stack(tmp_path, shell="/bin/sh") as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, mode="shell") as operator:
            await operator.start(shell_start())
            await operator.send(FrameType.DATA, NOHUP_JOB)
            job, shell = await _pids_from_shell(operator)
            leftovers.append(job)
            await operator.send(FrameType.CONTROL, encode_control(Close("normal")))
            await operator.send(FrameType.CLOSE, b"")
        await wait_for_sessions_to_end(stack)
        assert pid_is_gone(shell) and pid_is_gone(job)
    assert _ended(stack)["reason"] == "operator-disconnected"


@trio_test
async def test_a_bare_close_frame_is_the_operator_disconnecting_too(tmp_path: Path) -> None:
    command = ("sleep", "1000")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.send(FrameType.CLOSE, b"")
        await wait_for_sessions_to_end(stack)
    assert _ended(stack)["reason"] == "operator-disconnected"


@pytest.mark.parametrize("output", ["redirected", "held open"])
@trio_test
async def test_an_exec_whose_link_dies_gets_sighup_and_its_nohup_child_lives_on(
    tmp_path: Path, leftovers: list[int], output: str
) -> None:
    # "held open": nohup keeps a pipe as stdout, so the job holds the session's output open;
    # the session still ends once the command has exited (the job's writes fail afterwards).
    redirect = ">/dev/null 2>&1" if output == "redirected" else ""
    script = f"nohup sleep 1000 {redirect} & echo bg=$! sh=$$; sleep 1000"
    command = ("sh", "-c", script)
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            job, main = await _pids_from_shell(operator)
            leftovers.append(job)
        with trio.fail_after(8):
            await wait_for_sessions_to_end(stack)
        assert pid_is_gone(main)
        assert not pid_is_gone(job), "the nohup child was killed with the session"
    ended = _ended(stack)
    assert ended["reason"] == "connection-lost"
    assert ended["signal"] == "HUP"


@trio_test
async def test_an_exec_whose_command_ignores_sighup_is_left_running(
    tmp_path: Path, leftovers: list[int]
) -> None:
    # `tucdesk exec HOST -- nohup JOB`: the operator asked for it to survive a hang-up.
    command = ("nohup", "sh", "-c", "echo bg=$$ sh=$$; exec sleep 1000")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            main, _ = await _pids_from_shell(operator)
            leftovers.append(main)
        with trio.fail_after(10):
            await wait_for_sessions_to_end(stack)
        assert not pid_is_gone(main)
    ended = _ended(stack)
    assert ended["reason"] == "connection-lost"
    assert ended["exit_code"] is None and ended["signal"] is None


@trio_test
async def test_an_exec_ended_by_itself_before_the_link_died_keeps_its_status(
    tmp_path: Path,
) -> None:
    command = ("sh", "-c", "echo bg=1 sh=$$; exit 7")
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            await operator.until_closed()
        await wait_for_sessions_to_end(stack)
    assert operator.exit_status() == ExitStatus(code=7)
    assert _ended(stack)["reason"] == "normal"


@trio_test
async def test_a_link_that_dies_while_output_is_being_sent_hangs_the_session_up_too(
    tmp_path: Path, leftovers: list[int]
) -> None:
    # The agent learns of the loss from a failed send as often as from a receive.
    script = "nohup sleep 1000 >/dev/null 2>&1 & echo bg=$! sh=$$; exec yes"
    command = ("sh", "-c", script)
    async with session_stack(tmp_path) as stack, trio.open_nursery() as nursery:
        async with operator_session(stack, nursery, command=command) as operator:
            await operator.start(exec_start(*command))
            job, main = await _pids_from_shell(operator)
            leftovers.append(job)
            _reset(operator)
        with trio.fail_after(8):
            await wait_for_sessions_to_end(stack)
        assert pid_is_gone(main)
        assert not pid_is_gone(job), "the nohup child was killed with the session"
    ended = _ended(stack)
    assert ended["reason"] == "connection-lost"
    assert ended["signal"] in ("HUP", "PIPE")
