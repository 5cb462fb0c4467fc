"""Login records and session starts hold up against what a host's users and crashes do to them:
a lock any user can take on utmp, a terminal number reused at once, a daemon killed with
sessions open, a privilege switch the kernel refuses, long names, and tables of other tools.

Login records go to throwaway files, never the host's own."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from agent import login_records
from agent.config import ConfigError, load_config
from agent.exec_session import ExecSessionSpec, open_exec_session
from agent.login_records import (
    DEAD_PROCESS,
    USER_PROCESS,
    LoginEntry,
    LoginRecordError,
    LoginRecordFiles,
    read_logins,
    write_records,
)
from agent.process_group import Account, child_start_options, signals_need_reset
from agent.pty_session import PtySessionSpec, open_pty_session
from tests.agent.session_helpers import trio_test

SESSION_USER = "nobody"
LOCK_HOLDER = """
import fcntl, sys
with open(sys.argv[1], "rb") as utmp:
    fcntl.lockf(utmp, fcntl.LOCK_SH)
    print("locked", flush=True)
    sys.stdin.read()
"""


def _require(*programs: str) -> None:
    missing = [name for name in programs if shutil.which(name) is None]
    if missing:
        message = f"{', '.join(missing)} not installed (util-linux / coreutils)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (another user's lock, login uids, utmp as the agent writes it)")


@pytest.fixture
def files() -> Iterator[LoginRecordFiles]:
    """utmp and wtmp as a host has them: world-readable (0664) in a directory anyone may enter."""
    directory = Path(tempfile.mkdtemp(prefix="tucdesk-utmp-"))
    try:
        directory.chmod(0o755)
        utmp, wtmp = directory / "utmp", directory / "wtmp"
        for path in (utmp, wtmp):
            path.touch()
            path.chmod(0o664)
        yield LoginRecordFiles(utmp, wtmp)
    finally:
        shutil.rmtree(directory)


@pytest.fixture(autouse=True)
def _fresh_daemon_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # "logged once per daemon", and files locked out: each test is a daemon of its own.
    monkeypatch.setattr(login_records, "_warned", set())
    monkeypatch.setattr(login_records, "_locked_out", set())
    yield
    login_records.use_audit_login_uid(True)


def who(files: LoginRecordFiles) -> str:
    return subprocess.run(
        ["who", str(files.utmp)], capture_output=True, text=True, check=True
    ).stdout


def utmpdump(path: Path) -> list[str]:
    result = subprocess.run(["utmpdump", str(path)], capture_output=True, text=True, check=True)
    return [line for line in result.stdout.splitlines() if line.startswith("[")]


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# --- a lock on utmp held by any user ---------------------------------------------------------


@contextlib.contextmanager
def _read_lock_held_by_another_user(path: Path) -> Iterator[None]:
    """What any local user can do to the world-readable utmp: hold a read lock on it."""
    holder = subprocess.Popen(
        ["/usr/bin/python3", "-c", LOCK_HOLDER, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, user=SESSION_USER,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)


@pytest.fixture
def locked_utmp(files: LoginRecordFiles) -> Iterator[LoginRecordFiles]:
    """``files`` whose utmp an unprivileged user holds a read lock on, until the test ends."""
    _require_root()
    with _read_lock_held_by_another_user(files.utmp):
        yield files


@trio_test
async def test_a_users_lock_on_utmp_neither_delays_sessions_nor_takes_the_daemons_threads(
    locked_utmp: LoginRecordFiles,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _require("who")
    files = locked_utmp
    monkeypatch.setattr(login_records, "LOCK_WAIT_SECONDS", 1.0)
    caplog.set_level(logging.WARNING, "tucdesk.agent.login_records")
    # glibc's pututxline waited for such a lock for ever, in a thread of trio's default
    # limiter (which getaddrinfo needs too), and each session start and end waited 15 s.
    spec = PtySessionSpec(
        command=["/bin/sh", "-c", "echo fine"], login_records=files, operator="ann@x"
    )
    for _ in range(3):
        started = time.monotonic()
        output = bytearray()
        async with open_pty_session(spec) as session:
            await session.run(lambda stream, data, output=output: _append(output, data))
        assert b"fine" in output
        assert time.monotonic() - started < 0.9  # before the lock wait could have ended
    assert trio.to_thread.current_default_thread_limiter().borrowed_tokens == 0
    with trio.fail_after(5):
        await trio.socket.getaddrinfo("localhost", 443)
    with trio.fail_after(10):
        await login_records.wait_for_login_records()
    locked = [record for record in caplog.records if "holds a lock" in record.message]
    assert len(locked) == 1, caplog.text  # one wait, then skipped without waiting
    assert str(files.utmp) in locked[0].message
    assert who(files).strip() == ""  # nothing written past the lock


def test_records_are_written_again_once_the_lock_is_released(
    files: LoginRecordFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    _require_root()
    _require("who")
    monkeypatch.setattr(login_records, "LOCK_WAIT_SECONDS", 0.2)
    entry = LoginEntry.for_terminal("/dev/pts/40", SESSION_USER, "ann@x", os.getpid())
    with _read_lock_held_by_another_user(files.utmp):
        for _ in range(2):  # the first waits, the next is skipped at once
            started = time.monotonic()
            with pytest.raises(login_records.LoginRecordsLocked):
                write_records(files, entry, USER_PROCESS, 1_800_000_000.0)
        assert time.monotonic() - started < 0.15
    write_records(files, entry, USER_PROCESS, 1_800_000_000.0)
    assert "(tucdesk:ann@x)" in who(files)


async def _append(output: bytearray, data: bytes) -> None:
    output.extend(data)


def test_a_lock_held_past_the_deadline_is_reported_with_the_file_and_who_can_hold_it(
    files: LoginRecordFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    _require_root()
    monkeypatch.setattr(login_records, "LOCK_WAIT_SECONDS", 0.2)
    with _read_lock_held_by_another_user(files.wtmp):
        entry = LoginEntry.for_terminal("/dev/pts/41", "ops", "ann@x", 41)
        started = time.monotonic()
        with pytest.raises(login_records.LoginRecordsLocked, match=str(files.wtmp)):
            write_records(files, entry, USER_PROCESS, 1_800_000_000.0)
        assert time.monotonic() - started < 5
        assert len(utmpdump(files.utmp)) == 1  # utmp was not locked: written


# --- a terminal number reused at once --------------------------------------------------------


def test_a_late_logout_leaves_the_next_login_on_the_same_terminal_alone(
    files: LoginRecordFiles,
) -> None:
    _require("who", "utmpdump")
    first = LoginEntry.for_terminal("/dev/pts/3", "ann", "ann@example.com", 1000)
    second = LoginEntry.for_terminal("/dev/pts/3", "bob", "bob@example.com", 2000)
    write_records(files, first, USER_PROCESS, 1_800_000_000.0)
    write_records(files, second, USER_PROCESS, 1_800_000_010.0)
    write_records(files, first, DEAD_PROCESS, 1_800_000_020.0)  # late: pts/3 is bob's now
    listed = who(files)
    assert "bob " in listed and "pts/3" in listed and "ann " not in listed
    (slot,) = utmpdump(files.utmp)
    assert slot.startswith("[7] [02000]")
    # Nor does wtmp get it: `last` would end bob's login at the time of ann's logout.
    assert [line[:11] for line in utmpdump(files.wtmp)] == ["[7] [01000]", "[7] [02000]"]


def test_a_logout_replaces_its_own_login_and_keeps_other_terminals(
    files: LoginRecordFiles,
) -> None:
    _require("who", "utmpdump")
    ann = LoginEntry.for_terminal("/dev/pts/3", "ann", "ann@example.com", 1000)
    bob = LoginEntry.for_terminal("/dev/pts/4", "bob", "bob@example.com", 2000)
    for entry in (ann, bob):
        write_records(files, entry, USER_PROCESS, 1_800_000_000.0)
    write_records(files, ann, DEAD_PROCESS, 1_800_000_020.0)
    assert [line[:11] for line in utmpdump(files.utmp)] == ["[8] [01000]", "[7] [02000]"]
    assert len(utmpdump(files.wtmp)) == 3


# --- a daemon killed with sessions open ------------------------------------------------------


def test_stale_tucdesk_logins_are_ended_and_others_left_alone(files: LoginRecordFiles) -> None:
    _require("who", "utmpdump", "last")
    dead = _dead_pid()
    stale = LoginEntry.for_terminal("/dev/pts/5", "ann", "ann@example.com", dead)
    live = LoginEntry.for_terminal("/dev/pts/6", "bob", "bob@example.com", os.getpid())
    sshd = LoginEntry("pts/7", "eve", "192.0.2.1", dead)  # not ours, even with its shell gone
    for entry in (stale, live, sshd):
        write_records(files, entry, USER_PROCESS, 1_800_000_000.0)
    assert login_records.end_stale_logins(files, 1_800_000_100.0) == 1
    listed = who(files)
    assert "ann " not in listed and "bob " in listed and "eve " in listed
    logout = utmpdump(files.wtmp)[-1]
    assert logout.startswith(f"[8] [{dead:05d}] [ts/5]")
    assert login_records.end_stale_logins(files, 1_800_000_200.0) == 0


@trio_test
async def test_the_daemons_start_ends_stale_logins_before_new_ones_and_says_how_many(
    files: LoginRecordFiles, caplog: pytest.LogCaptureFixture
) -> None:
    _require("who")
    caplog.set_level(logging.WARNING, "tucdesk.agent.login_records")
    dead = _dead_pid()
    for number in (8, 9):
        entry = LoginEntry.for_terminal(f"/dev/pts/{number}", "ann", "ann@x", dead + number)
        write_records(files, entry, USER_PROCESS, 1_800_000_000.0)
    login_records.end_stale_logins_in_background(files)
    # The next session got pts/8 again: its login is written after the sweep.
    login_records.record_login(
        files, LoginEntry.for_terminal("/dev/pts/8", "bob", "bob@x", os.getpid())
    )
    with trio.fail_after(10):
        await login_records.wait_for_login_records()
    listed = who(files)
    assert "bob " in listed and "ann " not in listed
    (message,) = [record.message for record in caplog.records if "ended" in record.message]
    assert "ended 2 login(s)" in message and str(files.utmp) in message


# --- names that do not fit ---------------------------------------------------------------------


def test_a_long_host_keeps_a_nul_and_is_cut_between_characters(files: LoginRecordFiles) -> None:
    _require("last")
    entry = LoginEntry.for_terminal("/dev/pts/7", SESSION_USER, "ö" * 200 + "@example.com", 4242)
    assert len(entry.host.encode()) <= login_records.HOST_SIZE - 1
    write_records(files, entry, USER_PROCESS, 1_800_000_000.25)
    shown = subprocess.run(
        ["last", "-w", "-f", str(files.wtmp)], capture_output=True, check=True
    ).stdout
    row = shown.splitlines()[0].decode()  # a character cut in two would not decode
    assert "tucdesk:" + "ö" * 20 in row


def test_a_long_user_is_cut_between_characters() -> None:
    entry = LoginEntry.for_terminal("/dev/pts/1", "é" * 40, "ann@x", 1)
    assert len(entry.user.encode()) <= login_records.USER_SIZE
    assert entry.user == "é" * 16


# --- the audit_login_uid setting -------------------------------------------------------------


def test_audit_login_uid_is_on_by_default_and_can_be_turned_off() -> None:
    assert load_config({}, {}).audit_login_uid is True
    assert load_config({}, {"TUCDESK_AGENT_AUDIT_LOGIN_UID": "false"}).audit_login_uid is False


@trio_test
async def test_with_audit_login_uid_off_a_root_session_starts_without_python_in_the_child() -> None:
    _require_root()
    if not login_records.PROC_SELF_LOGIN_UID.exists():
        pytest.skip("this kernel has no /proc/self/loginuid")
    root = Account.lookup("root")
    if not signals_need_reset():
        assert "preexec_fn" in child_start_options(root, 0o022)  # on: the child writes it
    login_records.use_audit_login_uid(False)
    options = child_start_options(root, 0o022)
    if not signals_need_reset():
        assert "preexec_fn" not in options  # vfork: no Python code runs in the child
    own = login_records.PROC_SELF_LOGIN_UID.read_text()
    spec = ExecSessionSpec(command=["cat", "/proc/self/loginuid"], user=SESSION_USER)
    output = bytearray()
    async with open_exec_session(spec) as session:
        with trio.fail_after(20):
            await session.run(lambda stream, data: _append(output, data))
    assert output.decode().strip() == own  # the agent's, not the session user's


def test_check_shows_the_audit_login_uid_setting(tmp_path: Path) -> None:
    for value, shown in (("true", "Login uid:     on"), ("false", "Login uid:     off")):
        environment = {**os.environ, "TUCDESK_AGENT_AUDIT_LOGIN_UID": value}
        environment.pop("TUCDESK_AGENT_CONFIG", None)
        result = subprocess.run(
            [sys.executable, "-m", "agent.main", "check", "--state-dir", str(tmp_path / "s")],
            capture_output=True, text=True, env=environment, timeout=60, check=False,
        )
        assert shown in result.stdout, result.stdout
        assert "(audit_login_uid)" in result.stdout


# --- a privilege switch the kernel refuses ---------------------------------------------------

REFUSED_SWITCH = """
import sys, trio
from agent.exec_session import ExecSessionSpec, open_exec_session

async def main():
    output = bytearray()
    async def keep(stream, data):
        output.extend(data)
    spec = ExecSessionSpec(command=["true"], user="nobody")
    async with open_exec_session(spec) as session:
        status = await session.run(keep)
    print("status", status)
    print("output", output.decode().strip())

trio.run(main)
"""


def test_a_refused_privilege_switch_tells_the_operator_why() -> None:
    _require("unshare")
    # In a user namespace where this process is root, setgroups is denied (as the reviewer's
    # setup): the session must fail closed and say why, not "Exception occurred in preexec_fn".
    result = subprocess.run(
        ["unshare", "-U", "-r", sys.executable, "-c", REFUSED_SWITCH],
        capture_output=True, text=True, timeout=60, check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    if result.stderr.startswith("unshare:"):
        pytest.skip(f"no user namespaces here: {result.stderr.strip()}")
    uid = pwd.getpwnam(SESSION_USER).pw_uid
    assert (
        f"tucdesk-agent: cannot switch to uid {uid}: Operation not permitted" in result.stdout
    ), (result.stdout, result.stderr)
    assert "126" in result.stdout
    assert "preexec_fn" not in result.stdout + result.stderr


# --- tables of other tools in a shared config file --------------------------------------------


@pytest.mark.parametrize("table", ["reagent", "magenta", "tucdesk-agent", "relay", "age"])
def test_other_tools_tables_beside_agent_are_accepted(table: str, tmp_path: Path) -> None:
    path = tmp_path / "shared.toml"
    path.write_text(f"[agent]\nmax_sessions = 4\n[{table}]\nx = 1\n")
    assert load_config({}, {"TUCDESK_AGENT_CONFIG": str(path)}).max_sessions == 4


@pytest.mark.parametrize("table", ["agentt", "agents", "agentd", "Agent", "AGENT"])
def test_a_table_one_letter_or_the_case_away_from_agent_is_refused(
    table: str, tmp_path: Path
) -> None:
    path = tmp_path / "shared.toml"
    path.write_text(f"[agent]\nmax_sessions = 4\n[{table}]\nx = 1\n")
    with pytest.raises(ConfigError, match=rf"unknown table \[{table}\]; did you mean \[agent\]"):
        load_config({}, {"TUCDESK_AGENT_CONFIG": str(path)})


def test_without_an_agent_table_swapped_letters_are_refused_too(tmp_path: Path) -> None:
    # Every setting of such a file would be ignored; no other tool's table is at stake.
    path = tmp_path / "agent.toml"
    path.write_text("[agnet]\nmax_sessions = 4\n")
    with pytest.raises(ConfigError, match=r"unknown table \[agnet\]; did you mean \[agent\]"):
        load_config({}, {"TUCDESK_AGENT_CONFIG": str(path)})


def test_a_utmp_grown_beyond_its_limit_is_read_and_scanned_only_so_far(
    files: LoginRecordFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """utmp is writable by group utmp, so its size is not trusted: reading stops at
    MAX_UTMP_RECORDS entries, and a login that would land beyond them is not recorded."""
    monkeypatch.setattr(login_records, "MAX_UTMP_RECORDS", 3)
    for number in range(3):
        entry = LoginEntry.for_terminal(f"/dev/pts/{50 + number}", "ann", "ann@x", 100 + number)
        write_records(files, entry, USER_PROCESS, 1_800_000_000.0)
    assert len(read_logins(files.utmp)) == 3
    with pytest.raises(LoginRecordError, match="more than 3 entries"):
        write_records(files, LoginEntry.for_terminal("/dev/pts/60", "ann", "ann@x", 200),
                      USER_PROCESS, 1_800_000_000.0)  # fmt: skip
    with files.utmp.open("ab") as grown:  # grown by someone else beyond the limit
        grown.write(files.utmp.read_bytes())
    assert len(read_logins(files.utmp)) == 3
