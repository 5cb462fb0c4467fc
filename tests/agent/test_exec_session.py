"""Exec sessions: one command, separate stdout and stderr, forwarded stdin, exit status."""

from __future__ import annotations

import pwd
from pathlib import Path

import pytest
import trio

from agent.exec_session import ExecSessionSpec, open_exec_session
from agent.process_group import CommandNotStarted, ExitStatus, SessionProcessError, session_members
from tests.agent.session_helpers import (
    Transcript,
    is_root,
    pid_is_gone,
    trio_test,
    wait_until,
)


async def run_command(
    spec: ExecSessionSpec, stdin: bytes | None = None
) -> tuple[ExitStatus, Transcript]:
    transcript = Transcript()
    async with open_exec_session(spec) as session:
        async with trio.open_nursery() as nursery:
            if stdin is not None:

                async def feed() -> None:
                    await session.send_input(stdin)
                    await session.close_input()

                nursery.start_soon(feed)
            else:
                await session.close_input()
            status = await session.run(transcript.on_output)
    return status, transcript


@trio_test
async def test_stdout_and_stderr_arrive_separately() -> None:
    script = "echo to-out; echo to-err >&2; echo more-out"
    status, transcript = await run_command(ExecSessionSpec(["sh", "-c", script]))
    assert status == ExitStatus(code=0)
    assert transcript.stdout == b"to-out\nmore-out\n"
    assert transcript.stderr == b"to-err\n"


@trio_test
async def test_stdin_is_forwarded_and_closing_it_ends_cat() -> None:
    status, transcript = await run_command(ExecSessionSpec(["cat"]), b"hello\nworld\n")
    assert status.code == 0
    assert transcript.stdout == b"hello\nworld\n"


@trio_test
async def test_large_input_is_written_with_backpressure() -> None:
    payload = b"x" * (3 * 1024 * 1024 + 7)
    status, transcript = await run_command(ExecSessionSpec(["wc", "-c"]), payload)
    assert status.code == 0
    assert transcript.stdout.strip() == str(len(payload)).encode()


@trio_test
async def test_large_output_is_streamed_completely() -> None:
    spec = ExecSessionSpec(["head", "-c", "5000000", "/dev/zero"])
    status, transcript = await run_command(spec)
    assert status.code == 0
    assert len(transcript.stdout) == 5_000_000


@pytest.mark.parametrize("code", [0, 1, 42])
@trio_test
async def test_exit_code_is_returned(code: int) -> None:
    status, _ = await run_command(ExecSessionSpec(["sh", "-c", f"exit {code}"]))
    assert status == ExitStatus(code=code)


@trio_test
async def test_a_command_killed_by_a_signal_reports_the_signal() -> None:
    status, _ = await run_command(ExecSessionSpec(["sh", "-c", "kill -KILL $$"]))
    assert status == ExitStatus(signal=9)
    assert status.signal_name == "KILL"


@trio_test
async def test_operator_signal_reaches_the_command() -> None:
    transcript = Transcript()
    spec = ExecSessionSpec(["sh", "-c", "echo ready; exec sleep 1000"])
    async with open_exec_session(spec) as session:
        async with trio.open_nursery() as nursery:

            async def interrupt() -> None:
                await transcript.wait_for(b"ready")
                await wait_until(lambda: b"sleep" in _command_line(session.pid))
                session.signal("SIGINT")

            nursery.start_soon(interrupt)
            status = await session.run(transcript.on_output)
    assert status == ExitStatus(signal=2)


@trio_test
async def test_argv_is_not_interpreted_by_a_shell() -> None:
    status, transcript = await run_command(ExecSessionSpec(["echo", "$HOME", "; rm -rf /", "*"]))
    assert status.code == 0
    assert transcript.stdout == b"$HOME ; rm -rf / *\n"


@trio_test
async def test_shell_command_line_runs_when_asked() -> None:
    spec = ExecSessionSpec(["echo one | tr o O"], use_shell=True)
    status, transcript = await run_command(spec)
    assert status.code == 0
    assert transcript.stdout == b"One\n"


@trio_test
async def test_input_after_the_command_stopped_reading_is_discarded() -> None:
    transcript = Transcript()
    async with open_exec_session(ExecSessionSpec(["true"])) as session:
        status = await session.run(transcript.on_output)
        await session.send_input(b"x" * 200_000)
        await session.close_input()
    assert status.code == 0


@trio_test
async def test_with_kill_leftover_processes_a_process_holding_stdout_does_not_keep_it_open(
) -> None:
    spec = ExecSessionSpec(
        ["sh", "-c", "sleep 1000 & echo started"], teardown_grace=0.2,
        kill_leftover_processes=True,
    )
    status, transcript = await run_command(spec)
    assert status.code == 0
    assert transcript.stdout == b"started\n"


@trio_test
async def test_cancelling_an_exec_session_kills_every_process_it_started() -> None:
    spec = ExecSessionSpec(["sh", "-c", "sleep 1000 & sleep 1000"], teardown_grace=0.2)
    members: list[int] = []
    with trio.CancelScope() as scope:
        async with open_exec_session(spec) as session:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run, Transcript().on_output)
                await wait_until(lambda: len(session_members(session.pid)) == 3)
                members = session_members(session.pid)
                scope.cancel()
    assert len(members) == 3
    assert all(pid_is_gone(pid) for pid in members)


@trio_test
async def test_missing_program_is_a_clear_error_with_the_shells_exit_code(
    tmp_path: Path,
) -> None:
    with pytest.raises(CommandNotStarted, match="cannot run '/nonexistent/prog'") as missing:
        async with open_exec_session(ExecSessionSpec(["/nonexistent/prog"])):
            pass
    assert missing.value.exit_code == 127
    text = tmp_path / "notes.txt"
    text.write_text("not a program\n")
    text.chmod(0o644)
    with pytest.raises(CommandNotStarted, match="Permission denied") as not_executable:
        async with open_exec_session(ExecSessionSpec([str(text)])):
            pass
    assert not_executable.value.exit_code == 126


def test_malformed_commands_are_refused() -> None:
    with pytest.raises(SessionProcessError):
        ExecSessionSpec([])
    with pytest.raises(SessionProcessError):
        ExecSessionSpec("ls -l")  # a string, not an argv list
    with pytest.raises(SessionProcessError):
        ExecSessionSpec(["a\x00b"])
    with pytest.raises(SessionProcessError):
        ExecSessionSpec(["echo", "two"], use_shell=True)


@pytest.mark.skipif(not is_root(), reason="switching users needs root")
@trio_test
async def test_command_runs_as_the_configured_user_with_its_groups() -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' account")
    status, transcript = await run_command(ExecSessionSpec(["id", "-u"], user="nobody"))
    assert status.code == 0
    assert transcript.stdout.strip() == str(nobody.pw_uid).encode()
    status, transcript = await run_command(ExecSessionSpec(["id", "-G"], user="nobody"))
    assert 0 not in [int(group) for group in transcript.stdout.split()]


def _command_line(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""
