"""PTY shell sessions, driven from trio against real shells and real programs."""

from __future__ import annotations

import os
import pwd
import shutil
import sys
from pathlib import Path

import pyte
import pytest
import trio

from agent.process_group import (
    CommandNotStarted,
    ExitStatus,
    OutputStream,
    SessionProcessError,
    session_members,
)
from agent.pty_session import (
    MAX_PENDING_ENDS_OF_INPUT,
    PtySessionSpec,
    epoll_targets,
    open_pty_session,
    parse_syscall,
    select_read_set,
)
from tests.agent.session_helpers import (
    Transcript,
    is_root,
    pid_is_gone,
    trio_test,
    wait_until,
)
from tests.relay.lock_calls import lock_operations


class TolerantScreen(pyte.Screen):
    """pyte 0.8 chokes on xterm's private SGR (CSI > 4 ; m, sent by vim); ignore those."""

    def select_graphic_rendition(self, *attributes: int, private: bool = False) -> None:
        if not private:
            super().select_graphic_rendition(*attributes)


# A plain interactive shell with a fixed prompt and no user start-up files.
INTERACTIVE_SH = ("sh", "-i")
PROMPT_ENV = (("LANG", "C"),)


@trio_test
async def test_initial_window_size_is_seen_by_the_program() -> None:
    transcript = Transcript()
    spec = PtySessionSpec(command=["stty", "size"], rows=33, cols=101)
    async with open_pty_session(spec) as session:
        status = await session.run(transcript.on_output)
    assert status.code == 0
    assert transcript.stdout.strip() == b"33 101"


@trio_test
async def test_resize_changes_the_size_the_shell_reports() -> None:
    transcript = Transcript()
    async with open_pty_session(PtySessionSpec(command=INTERACTIVE_SH)) as session:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run, transcript.on_output)
            await session.send_input(b"stty size\n")
            offset = await transcript.wait_for(b"24 80")
            session.resize(40, 132)
            assert session.window_size() == (40, 132)
            await session.send_input(b"stty size\n")
            await transcript.wait_for(b"40 132", offset)
            await session.send_input(b"exit\n")


@trio_test
async def test_resize_delivers_sigwinch_to_the_foreground_program() -> None:
    transcript = Transcript()
    script = "trap 'echo WINCH-$(stty size)' WINCH; echo ready; while :; do read x || exit 0; done"
    async with open_pty_session(PtySessionSpec(command=["sh", "-c", script])) as session:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run, transcript.on_output)
            await transcript.wait_for(b"ready")
            session.resize(50, 60)
            await transcript.wait_for(b"WINCH-50 60")
            session.signal("KILL")


@trio_test
async def test_terminal_type_and_minimal_environment_reach_the_shell() -> None:
    os.environ["TUCDESK_AGENT_ONLY_SECRET"] = "do-not-leak"
    try:
        transcript = Transcript()
        spec = PtySessionSpec(command=["env"], term="vt220", environment=(("TZ", "UTC"),))
        async with open_pty_session(spec) as session:
            await session.run(transcript.on_output)
    finally:
        del os.environ["TUCDESK_AGENT_ONLY_SECRET"]
    variables = dict(
        line.split("=", 1) for line in transcript.stdout.decode().splitlines() if "=" in line
    )
    assert variables["TERM"] == "vt220"
    assert variables["TZ"] == "UTC"
    assert variables["HOME"] == pwd.getpwuid(os.getuid()).pw_dir
    assert "TUCDESK_AGENT_ONLY_SECRET" not in variables
    assert variables["TUCDESK_TTY"].startswith("/dev/pts/")
    assert set(variables) <= {"TERM", "TZ", "HOME", "USER", "LOGNAME", "SHELL", "PATH", "LANG",
                              "LC_ALL", "PWD", "OLDPWD", "SHLVL", "_", "TUCDESK_TTY"}


def test_operator_cannot_set_variables_that_change_what_runs() -> None:
    async def attempt() -> None:
        spec = PtySessionSpec(command=["true"], environment=(("LD_PRELOAD", "/tmp/x.so"),))
        async with open_pty_session(spec):
            pass

    with pytest.raises(SessionProcessError, match="LD_PRELOAD"):
        trio.run(attempt)


@trio_test
async def test_default_is_the_accounts_login_shell() -> None:
    transcript = Transcript()
    shell = pwd.getpwuid(os.getuid()).pw_shell
    if not os.access(shell, os.X_OK):
        shell = "/bin/sh"
    async with open_pty_session(PtySessionSpec()) as session:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run, transcript.on_output)
            await session.send_input(b"echo \"zero=$0\"\n")
            await transcript.wait_for(f"zero=-{os.path.basename(shell)}".encode())
            await session.send_input(b"exit 3\n")


@trio_test
async def test_exit_code_of_the_shell_is_returned() -> None:
    async with open_pty_session(PtySessionSpec(command=["sh", "-c", "exit 42"])) as session:
        status = await session.run(Transcript().on_output)
    assert (status.code, status.signal) == (42, None)


@trio_test
async def test_a_shell_killed_by_a_signal_reports_the_signal() -> None:
    spec = PtySessionSpec(command=["sh", "-c", "kill -TERM $$"])
    async with open_pty_session(spec) as session:
        status = await session.run(Transcript().on_output)
    assert (status.code, status.signal, status.signal_name) == (None, 15, "TERM")


@trio_test
async def test_sigint_reaches_the_foreground_job_not_the_shell() -> None:
    transcript = Transcript()
    async with open_pty_session(PtySessionSpec(command=INTERACTIVE_SH)) as session:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run, transcript.on_output)
            await session.send_input(b"sleep 1000\n")
            await wait_until(lambda: session.foreground_process_group() != session.pid)
            sleeper = session.foreground_process_group()
            session.signal("INT")
            await wait_until(lambda: pid_is_gone(sleeper))
            await session.send_input(b"echo status=$?\n")
            await transcript.wait_for(b"status=130")
            await session.send_input(b"exit\n")


@trio_test
async def test_typed_control_c_interrupts_through_the_line_discipline() -> None:
    transcript = Transcript()
    async with open_pty_session(PtySessionSpec(command=INTERACTIVE_SH)) as session:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run, transcript.on_output)
            await session.send_input(b"sleep 1000\n")
            await wait_until(lambda: session.foreground_process_group() != session.pid)
            await session.send_input(b"\x03")
            await wait_until(lambda: session.foreground_process_group() == session.pid)
            await session.send_input(b"exit 5\n")


def test_signals_outside_the_allowlist_are_refused() -> None:
    async def attempt() -> None:
        async with open_pty_session(PtySessionSpec(command=["sh"])) as session:
            session.signal("SEGV")

    with pytest.raises(SessionProcessError, match="SEGV"):
        trio.run(attempt)


@trio_test
async def test_large_input_is_written_with_backpressure() -> None:
    transcript = Transcript()
    payload = b"x" * 1_000_000
    script = "stty raw -echo; echo ready; head -c 1000000 | wc -c"
    async with open_pty_session(PtySessionSpec(command=["sh", "-c", script])) as session:
        async with trio.open_nursery() as nursery:

            async def type_everything() -> None:
                await transcript.wait_for(b"ready")
                await session.send_input(payload)

            nursery.start_soon(type_everything)
            status = await session.run(transcript.on_output)
    assert status.code == 0
    assert transcript.stdout.split()[-1] == b"1000000"


@trio_test
async def test_a_keystroke_is_typed_without_taking_the_input_lock() -> None:
    transcript = Transcript()
    async with open_pty_session(PtySessionSpec(command=["cat"])) as session:
        async with trio.open_nursery() as nursery:

            async def type_a_key() -> None:
                with lock_operations() as called:
                    await session.send_input(b"k")
                assert called == []  # a write the terminal takes whole needs no turn
                await transcript.wait_for(b"k")
                # ^D twice: the first hands "k" to cat, the second (on an empty line) is EOF.
                await session.close_input()
                await session.close_input()

            nursery.start_soon(type_a_key)
            status = await session.run(transcript.on_output)
    assert status.code == 0


@trio_test
async def test_large_inputs_typed_at_once_go_in_whole_one_after_the_other() -> None:
    transcript = Transcript()
    size = 300_000
    # Squeezing repeats leaves two letters only if no part of one input got into the other.
    script = f"stty raw -echo; echo ready; head -c {2 * size} | tr -s ab; echo; echo done"
    async with open_pty_session(PtySessionSpec(command=["sh", "-c", script])) as session:
        async with trio.open_nursery() as nursery:

            async def type_both() -> None:
                await transcript.wait_for(b"ready")
                async with trio.open_nursery() as typists:
                    typists.start_soon(session.send_input, b"a" * size)
                    typists.start_soon(session.send_input, b"b" * size)

            nursery.start_soon(type_both)
            status = await session.run(transcript.on_output)
    assert status.code == 0
    # Either may go first (trio picks the order of tasks started together), but whole.
    assert transcript.stdout.split()[-2:] in ([b"ab", b"done"], [b"ba", b"done"])


@trio_test
async def test_close_input_sends_end_of_file() -> None:
    transcript = Transcript()
    async with open_pty_session(PtySessionSpec(command=["cat"])) as session:
        async with trio.open_nursery() as nursery:

            async def type_then_close() -> None:
                await session.send_input(b"hello\n")
                await transcript.wait_for(b"hello\r\nhello\r\n")
                await session.close_input()

            nursery.start_soon(type_then_close)
            status = await session.run(transcript.on_output)
    assert status.code == 0


@trio_test
async def test_cancelling_the_session_kills_its_whole_process_group() -> None:
    transcript = Transcript()
    spec = PtySessionSpec(command=["sh", "-c", "sleep 1000 & sleep 1000"], teardown_grace=0.2)
    members: list[int] = []
    with trio.CancelScope() as scope:
        async with open_pty_session(spec) as session:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run, transcript.on_output)
                await wait_until(lambda: len(session_members(session.pid)) == 3)
                members = session_members(session.pid)
                scope.cancel()
    assert len(members) == 3
    assert all(pid_is_gone(pid) for pid in members)


@trio_test
async def test_processes_that_ignore_hangup_are_killed_after_the_grace() -> None:
    spec = PtySessionSpec(
        command=["sh", "-c", "trap '' HUP; echo ready; sleep 1000"], teardown_grace=0.2
    )
    transcript = Transcript()
    with trio.CancelScope() as scope:
        async with open_pty_session(spec) as session:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(session.run, transcript.on_output)
                await transcript.wait_for(b"ready")
                await wait_until(lambda: len(session_members(session.pid)) == 2)
                members = session_members(session.pid)
                scope.cancel()
    assert all(pid_is_gone(pid) for pid in members)


@trio_test
async def test_with_kill_leftover_processes_background_jobs_of_the_shell_are_torn_down(
) -> None:
    transcript = Transcript()
    spec = PtySessionSpec(command=INTERACTIVE_SH, kill_leftover_processes=True)
    async with open_pty_session(spec) as session:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(session.run, transcript.on_output)
            # With job control on, the background job gets a process group of its own.
            await session.send_input(b"sleep 1000 & echo bg=$!\n")
            await transcript.wait_for(b"bg=")
            await wait_until(lambda: len(session_members(session.pid)) == 2)
            (background,) = [pid for pid in session_members(session.pid) if pid != session.pid]
            assert os.getpgid(background) != session.pid
            await session.send_input(b"exit\n")
    assert pid_is_gone(background)


@trio_test
async def test_output_after_the_shell_exits_is_not_lost() -> None:
    transcript = Transcript()
    script = "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done; echo LAST"
    async with open_pty_session(PtySessionSpec(command=["sh", "-c", script])) as session:
        await session.run(transcript.on_output)
    assert transcript.stdout.endswith(b"LAST\r\n")
    assert transcript.stdout.count(b"line-") == 2000


@trio_test
async def test_full_screen_output_renders_on_a_terminal_emulator() -> None:
    transcript = Transcript()
    script = "tput clear; tput cup 5 10; printf HELLO; tput cup 20 0; printf BOTTOM"
    spec = PtySessionSpec(command=["sh", "-c", script], term="xterm", rows=24, cols=80)
    async with open_pty_session(spec) as session:
        await session.run(transcript.on_output)
    screen = pyte.Screen(80, 24)
    pyte.ByteStream(screen).feed(transcript.stdout)
    assert screen.display[5][10:15] == "HELLO"
    assert screen.display[20].startswith("BOTTOM")


@pytest.mark.skipif(shutil.which("vi") is None, reason="no vi installed")
@trio_test
async def test_vi_draws_the_file_and_quits_on_command(tmp_path: Path) -> None:
    document = tmp_path / "notes.txt"
    document.write_text("first line\nsecond line\n")
    screen = TolerantScreen(80, 24)
    stream = pyte.ByteStream(screen)
    spec = PtySessionSpec(command=["vi", "-u", "NONE", "-N", str(document)], term="xterm")
    statuses: list[ExitStatus] = []

    async def on_output(stream_id: OutputStream, data: bytes) -> None:
        stream.feed(data)

    async def run() -> None:
        statuses.append(await session.run(on_output))

    async with open_pty_session(spec) as session:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await wait_until(lambda: screen.display[1].startswith("second line"))
            assert screen.display[0].startswith("first line")
            assert screen.display[2].startswith("~")
            await session.send_input(b"\x1b:q!\r")
    assert statuses[0].code == 0


@trio_test
async def test_missing_program_is_a_clear_error_with_a_shells_status() -> None:
    # An operator's command (exec -t) that cannot run: 127, as from a shell and as on pipes.
    with pytest.raises(CommandNotStarted, match="cannot run '/nonexistent/prog'") as refused:
        async with open_pty_session(PtySessionSpec(command=["/nonexistent/prog"])):
            pass
    assert refused.value.exit_code == 127


@trio_test
async def test_a_missing_shell_is_the_agents_error() -> None:
    with pytest.raises(SessionProcessError, match="cannot start '/nonexistent/shell'") as failed:
        async with open_pty_session(PtySessionSpec(shell="/nonexistent/shell")):
            pass
    assert not isinstance(failed.value, CommandNotStarted)


def test_bad_terminal_type_and_window_size_are_refused() -> None:
    with pytest.raises(SessionProcessError):
        PtySessionSpec(term="xterm; rm -rf /")
    with pytest.raises(SessionProcessError):
        PtySessionSpec(rows=0)
    with pytest.raises(SessionProcessError):
        PtySessionSpec(cols=10_001)


@pytest.mark.skipif(not is_root(), reason="switching users needs root")
@trio_test
async def test_session_runs_as_the_configured_user_and_owns_its_terminal() -> None:
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' account")
    transcript = Transcript()
    script = 'echo "uid=$(id -u) gid=$(id -g) tty-owner=$(stat -c %u "$(tty)")"'
    spec = PtySessionSpec(command=["/bin/sh", "-c", script], user="nobody")
    async with open_pty_session(spec) as session:
        status = await session.run(transcript.on_output)
    assert status.code == 0
    expected = f"uid={nobody.pw_uid} gid={nobody.pw_gid} tty-owner={nobody.pw_uid}"
    assert expected.encode() in transcript.stdout


@trio_test
async def test_input_ended_before_a_readline_shell_starts_still_ends_it() -> None:
    # Piped input: the commands and the end of input arrive before bash has switched the
    # terminal to readline's mode; a ^D typed then would reach bash as NUL and be lost.
    transcript = Transcript()
    async with open_pty_session(PtySessionSpec(shell="/bin/bash")) as session:
        await session.send_input(b"echo hi-$((40+2))\n")
        await session.close_input()
        with trio.fail_after(15):
            status = await session.run(transcript.on_output)
    assert status.code == 0
    assert b"hi-42" in transcript.stdout


# Seconds an end of input may take to end a program waiting for it (a hang is the failure).
END_OF_INPUT_DEADLINE = 6


def _python(program: str) -> PtySessionSpec:
    return PtySessionSpec(command=[sys.executable, "-c", program])


async def _run_until_input_ends(spec: PtySessionSpec, typed: bytes = b"") -> Transcript:
    transcript = Transcript()
    async with open_pty_session(spec) as session:
        if typed:
            await session.send_input(typed)
        await session.close_input()
        with trio.fail_after(END_OF_INPUT_DEADLINE):
            status = await session.run(transcript.on_output)
    assert status.code == 0
    return transcript


@trio_test
async def test_input_ended_at_a_bash_prompt_ends_it() -> None:
    transcript = await _run_until_input_ends(
        PtySessionSpec(command=["/bin/bash", "--norc", "--noprofile", "-i"]), b"echo hi\n")
    assert b"hi\r\n" in transcript.stdout


@trio_test
async def test_input_ended_reaches_a_program_waiting_in_epoll_on_stdin() -> None:
    program = ("import os, selectors; s = selectors.EpollSelector(); "
               "s.register(0, selectors.EVENT_READ); s.select(); print('GOT', os.read(0, 100))")
    transcript = await _run_until_input_ends(_python(program))
    assert b"GOT b''" in transcript.stdout


@trio_test
async def test_input_ended_reaches_a_program_selecting_on_stdin_and_a_pipe() -> None:
    program = ("import os, select; r, w = os.pipe(); select.select([0, r], [], []); "
               "print('GOT', os.read(0, 100))")
    transcript = await _run_until_input_ends(_python(program))
    assert b"GOT b''" in transcript.stdout


@trio_test
async def test_input_ended_reaches_a_program_reading_dev_tty_on_another_fd() -> None:
    program = ("import os; fd = os.open('/dev/tty', os.O_RDONLY); assert fd == 3; "
               "print('GOT', os.read(fd, 100))")
    transcript = await _run_until_input_ends(_python(program))
    assert b"GOT b''" in transcript.stdout


@trio_test
async def test_input_ended_while_a_command_polls_a_socket_is_not_lost() -> None:
    # Like curl waiting for a server: poll() on a socket, in canonical mode. A ^D typed then
    # would reach bash's readline, later, as NUL: the shell would never end.
    poller = ("import socket, select; a, b = socket.socketpair(); p = select.poll(); "
              "p.register(a, select.POLLIN); p.poll(1500)")
    typed = f"{sys.executable} -c '{poller}'; echo after-poll\n".encode()
    transcript = await _run_until_input_ends(
        PtySessionSpec(command=["/bin/bash", "--norc", "--noprofile", "-i"]), typed)
    assert b"after-poll\r\n" in transcript.stdout


@trio_test
async def test_ends_of_input_asked_for_are_bounded() -> None:
    async with open_pty_session(PtySessionSpec(command=["cat"])) as session:
        for _ in range(10_000):
            await session.close_input()
        assert session._ends_pending == MAX_PENDING_ENDS_OF_INPUT
        with trio.fail_after(END_OF_INPUT_DEADLINE):
            status = await session.run(Transcript().on_output)
    assert status.code == 0


SYSCALL_ARGUMENTS = "0x3 0x7f45338fb000 0x20000 0x7f453398eb60 0xffffffff 0x0"


@pytest.mark.parametrize("line", [
    "running",
    "-1 0x7ffeee6e69d8 0x7f4533a772ad",
    "",
    "0",
    "0 0x3",
    "x 0x0 0x0 0x0 0x0 0x0 0x0 0x0 0x0",
    "0 zz 0x0 0x0 0x0 0x0 0x0 0x0 0x0",
])
def test_syscall_lines_of_threads_not_blocked_in_a_call_name_no_call(line: str) -> None:
    assert parse_syscall(line) is None


def test_syscall_line_gives_the_call_and_its_arguments() -> None:
    line = f"0 {SYSCALL_ARGUMENTS} 0x7ffeee6e69d8 0x7f4533a772ad\n"
    assert parse_syscall(line) == (
        0, (3, 0x7F45338FB000, 0x20000, 0x7F453398EB60, 0xFFFFFFFF, 0))


def test_select_read_set_is_decoded_bit_by_bit() -> None:
    assert select_read_set(4, bytes([0b1001])) == [0, 3]
    assert select_read_set(3, bytes([0b1001])) == [0]  # beyond nfds is not watched
    assert select_read_set(13, bytes([0, 0b10000])) == [8 + 4]
    assert select_read_set(64, b"") == []


def test_epoll_targets_are_read_from_fdinfo() -> None:
    fdinfo = ("pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\n"
              "tfd:        0 events:       19 data:                0  pos:0 ino:3 sdev:18\n"
              "tfd:       12 events:       19 data:                c  pos:0 ino:9 sdev:8\n")
    assert epoll_targets(fdinfo) == [0, 12]
    assert epoll_targets("pos:\t0\nflags:\t02\n") == []
