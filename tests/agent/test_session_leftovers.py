"""What a session leaves behind when it ends, and what its processes start with: as under sshd.

A session whose main process exits on its own kills nothing it left behind: an exec session reads
its output to the end first, a PTY session hangs up the terminal (docs/sessions.md, "What happens
to processes when a session ends"). A forced end, or ``kill_leftover_processes``, tears the whole
session down. Children start with every signal at its default and none blocked, and with
TUCDESK_SESSION_ID, TUCDESK_OPERATOR and (PTY) TUCDESK_TTY set.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import trio

from agent.exec_session import ExecSessionSpec, open_exec_session
from agent.process_group import ExitStatus, session_variables
from agent.pty_session import PtySessionSpec, open_pty_session
from tests.agent.session_helpers import Transcript, pid_is_gone, trio_test, wait_until

INTERACTIVE_SH = ("sh", "-i")
_BACKGROUND_PID = re.compile(rb"bg=(\d+)")
REPOSITORY = Path(__file__).resolve().parents[2]


async def run_exec(spec: ExecSessionSpec) -> tuple[ExitStatus, Transcript]:
    transcript = Transcript()
    async with open_exec_session(spec) as session:
        await session.close_input()
        status = await session.run(transcript.on_output)
    return status, transcript


# ---- exec: output is read to its end, leftovers live on ----------------------------------


@trio_test
async def test_output_of_a_background_process_is_read_until_every_holder_closed_it() -> None:
    status, transcript = await run_exec(ExecSessionSpec(["sh", "-c", "seq 1 200000 & exit 0"]))
    assert status == ExitStatus(code=0)
    assert transcript.stdout.count(b"\n") == 200000
    assert transcript.stdout.endswith(b"\n200000\n")


@trio_test
async def test_late_output_of_a_background_process_is_not_lost() -> None:
    script = "(sleep 0.3; echo late; echo late-err >&2) & echo early; exit 4"
    status, transcript = await run_exec(ExecSessionSpec(["sh", "-c", script]))
    assert status == ExitStatus(code=4)
    assert transcript.stdout == b"early\nlate\n"
    assert transcript.stderr == b"late-err\n"


@trio_test
async def test_a_nohup_process_started_by_a_command_outlives_the_session(
    tmp_path: Path, leftovers: list[int]
) -> None:
    done = tmp_path / "done"
    script = f'nohup sh -c "sleep 0.5; echo done > {done}" >/dev/null 2>&1 & echo $!'
    status, transcript = await run_exec(ExecSessionSpec(["sh", "-c", script]))
    leftovers.append(int(transcript.stdout))
    assert status == ExitStatus(code=0)
    assert not done.exists()  # the session ended before the process did
    # The redirection creates the file before echo writes to it: wait for the line itself.
    await wait_until(lambda: done.exists() and done.read_text() == "done\n")


@trio_test
async def test_cancelling_while_leftover_output_is_read_kills_it_and_keeps_the_exit_status(
    leftovers: list[int],
) -> None:
    spec = ExecSessionSpec(["sh", "-c", "sleep 1000 & echo $!; exit 3"], teardown_grace=0.2)
    transcript = Transcript()
    with trio.CancelScope() as scope:
        async with open_exec_session(spec) as session:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run, transcript.on_output)
                await transcript.wait_for(b"\n")
                leftovers.append(int(transcript.stdout))
                await wait_until(lambda: session.exit_status is not None)
                scope.cancel()
    assert session.exit_status == ExitStatus(code=3)
    assert pid_is_gone(leftovers[0])


@trio_test
async def test_with_kill_leftover_processes_the_session_ends_with_the_command_and_kills_the_rest(
    leftovers: list[int],
) -> None:
    spec = ExecSessionSpec(
        ["sh", "-c", "sleep 1000 & echo $!"], teardown_grace=0.2, kill_leftover_processes=True
    )
    status, transcript = await run_exec(spec)
    leftovers.append(int(transcript.stdout))
    assert status.code == 0
    assert pid_is_gone(leftovers[0])


# ---- PTY: the terminal is hung up, what ignores that lives on ---------------------------


@trio_test
async def test_a_nohup_job_outlives_the_shell_that_exited(tmp_path: Path) -> None:
    done = tmp_path / "done"
    transcript = Transcript()
    async with open_pty_session(PtySessionSpec(command=INTERACTIVE_SH)) as session:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run, transcript.on_output)
            await session.send_input(
                f'nohup sh -c "sleep 0.5; touch {done}" >/dev/null 2>&1 &\n'.encode()
            )
            await session.send_input(b"exit\n")
    assert not done.exists()
    await wait_until(done.exists)


@trio_test
async def test_a_background_job_left_by_the_shell_lives_on_as_after_ssh(
    leftovers: list[int],
) -> None:
    transcript = Transcript()
    async with open_pty_session(PtySessionSpec(command=INTERACTIVE_SH)) as session:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run, transcript.on_output)
            # The terminal echoes the line typed ("bg=$!") before the shell answers it.
            await session.send_input(b"sleep 1000 & echo bg=$!\n")
            await wait_until(lambda: _BACKGROUND_PID.search(transcript.stdout) is not None)
            found = _BACKGROUND_PID.search(transcript.stdout)
            assert found is not None
            leftovers.append(int(found.group(1)))
            await session.send_input(b"exit\n")
    assert not pid_is_gone(leftovers[0])


@trio_test
async def test_processes_left_in_the_foreground_are_hung_up_with_the_terminal(
    leftovers: list[int],
) -> None:
    # Without job control the background sleep shares the shell's (foreground) group: the
    # kernel's hang-up of the terminal when the shell exits ends it, as under sshd (the agent
    # adds nothing: see the next test).
    transcript = Transcript()
    spec = PtySessionSpec(command=["sh", "-c", "sleep 1000 & echo bg=$!"])
    async with open_pty_session(spec) as session:
        await session.run(transcript.on_output)
        leftovers.append(int(transcript.stdout.rpartition(b"bg=")[2].split()[0]))
    await wait_until(lambda: pid_is_gone(leftovers[0]))


@trio_test
async def test_once_the_shell_exited_no_process_keeps_the_terminal_to_be_hung_up(
    leftovers: list[int],
) -> None:
    # A job-control background job (its own group, so not hung up by the kernel) had the
    # terminal as controlling terminal; the shell's exit took it away (tty_nr 0), so there is
    # nothing left for the agent to hang up, and the job runs on (process_group.release).
    transcript = Transcript()
    async with open_pty_session(PtySessionSpec(command=INTERACTIVE_SH)) as session:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run, transcript.on_output)
            await session.send_input(b"sleep 1000 & echo bg=$!\n")
            await wait_until(lambda: _BACKGROUND_PID.search(transcript.stdout) is not None)
            found = _BACKGROUND_PID.search(transcript.stdout)
            assert found is not None
            leftovers.append(int(found.group(1)))
            assert _controlling_terminal(leftovers[0]) != 0
            await session.send_input(b"exit\n")
    assert _controlling_terminal(leftovers[0]) == 0
    assert not pid_is_gone(leftovers[0])


def _controlling_terminal(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[4])  # tty_nr


# ---- what a session's processes start with ------------------------------------------------

# Runs the agent's session start paths in a process that ignores SIGQUIT and SIGHUP and blocks
# SIGINT (an agent started from such a shell, or under nohup), printing each child's status.
_START_UNDER_IGNORED_SIGNALS = textwrap.dedent("""
    import signal, sys, trio
    from agent.exec_session import ExecSessionSpec, open_exec_session
    from agent.pty_session import PtySessionSpec, open_pty_session

    if sys.argv[1] == "ignored-and-blocked":
        signal.signal(signal.SIGQUIT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    async def main():
        output = bytearray()
        async def collect(stream, data):
            output.extend(data)
        # The session's main process itself reads its status (a shell waiting for a child
        # blocks every signal meanwhile, so its own status would say nothing).
        status = ["grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"]
        async with open_exec_session(ExecSessionSpec(status)) as session:
            await session.run(collect)
        async with open_pty_session(PtySessionSpec(command=status)) as session:
            await session.run(collect)
        print(output.decode().replace("\\r", ""), end="")

    trio.run(main)
""")


@pytest.mark.parametrize("agent_signals", ["ignored-and-blocked", "blocked"])
def test_children_start_with_default_signal_dispositions_and_an_empty_mask(
    agent_signals: str,
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _START_UNDER_IGNORED_SIGNALS, agent_signals],
        cwd=REPOSITORY, capture_output=True, text=True, timeout=60, check=True,
    )
    lines = result.stdout.split()
    # One SigBlk and one SigIgn line per session kind, values after each name.
    assert lines.count("SigIgn:") == 2 and lines.count("SigBlk:") == 2, result.stdout
    for name, value in zip(lines[::2], lines[1::2], strict=True):
        assert int(value, 16) == 0, f"{name} {value} in a session's process"


# ---- the session's own variables --------------------------------------------------------


@trio_test
async def test_sessions_name_themselves_in_the_environment() -> None:
    variables = session_variables("ses_42", "ops@example.test")
    _, transcript = await run_exec(ExecSessionSpec(["env"], session_variables=variables))
    exec_environment = dict(
        line.split("=", 1) for line in transcript.stdout.decode().splitlines()
    )
    assert exec_environment["TUCDESK_SESSION_ID"] == "ses_42"
    assert exec_environment["TUCDESK_OPERATOR"] == "ops@example.test"
    assert "TUCDESK_TTY" not in exec_environment

    pty_transcript = Transcript()
    spec = PtySessionSpec(
        command=["sh", "-c", 'echo "tty=$TUCDESK_TTY real=$(tty) id=$TUCDESK_SESSION_ID"'],
        session_variables=variables,
    )
    async with open_pty_session(spec) as session:
        await session.run(pty_transcript.on_output)
    words = dict(word.split("=", 1) for word in pty_transcript.stdout.decode().split())
    assert words["tty"].startswith("/dev/pts/") and words["tty"] == words["real"]
    assert words["id"] == "ses_42"


@pytest.mark.parametrize(
    "value",
    ["ops@example.test\nLD_PRELOAD=/tmp/x.so", "a\x1b]0;title\x07", "with space", "", "é@x.test"],
)
def test_a_value_that_is_not_plain_printable_text_is_left_out_of_the_environment(
    value: str,
) -> None:
    assert session_variables("ses_1", value) == (("TUCDESK_SESSION_ID", "ses_1"),)
    assert session_variables(value, "op_1") == (("TUCDESK_OPERATOR", "op_1"),)
