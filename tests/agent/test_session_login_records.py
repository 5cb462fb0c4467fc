"""Sessions look like logins on the host (agent/login_records.py): the session's umask, its audit
login uid, and utmp/wtmp records read back with the real ``who``, ``last`` and ``utmpdump``.

These start sessions in this process; test_session_login_stack.py does the same through a real
agent daemon. Login records always go to files under tmp_path, never the host's own."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from agent import login_records
from agent.config import AgentConfig, ConfigError, load_config
from agent.exec_session import ExecSessionSpec, open_exec_session
from agent.login_records import (
    DEAD_PROCESS,
    USER_PROCESS,
    LoginEntry,
    LoginRecordFiles,
    write_records,
)
from agent.pty_session import PtySessionSpec, open_pty_session
from tests.agent.session_helpers import trio_test

WAIT_SECONDS = 20
SESSION_USER = "nobody"


def _require(*programs: str) -> None:
    missing = [name for name in programs if shutil.which(name) is None]
    if missing:
        message = f"{', '.join(missing)} not installed (util-linux / coreutils)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("login uid and login records are written by an agent running as root")


@pytest.fixture
def files(tmp_path: Path) -> LoginRecordFiles:
    """Empty utmp and wtmp files (pututxline and updwtmpx need them to exist, as for sshd)."""
    utmp, wtmp = tmp_path / "utmp", tmp_path / "wtmp"
    utmp.touch()
    wtmp.touch()
    return LoginRecordFiles(utmp, wtmp)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # "logged once per daemon": each test is a daemon of its own.
    monkeypatch.setattr(login_records, "_warned", set())
    yield


def who(files: LoginRecordFiles) -> str:
    return subprocess.run(
        ["who", str(files.utmp)], capture_output=True, text=True, check=True
    ).stdout


def last(files: LoginRecordFiles) -> str:
    return subprocess.run(
        ["last", "-w", "-f", str(files.wtmp)], capture_output=True, text=True, check=True
    ).stdout


def utmpdump(path: Path) -> list[str]:
    result = subprocess.run(["utmpdump", str(path)], capture_output=True, text=True, check=True)
    return [line for line in result.stdout.splitlines() if line.startswith("[")]


# --- the records themselves --------------------------------------------------------------


def test_a_login_is_listed_by_who_and_its_logout_ends_it_in_last(
    files: LoginRecordFiles,
) -> None:
    _require("who", "last", "utmpdump")
    entry = LoginEntry.for_terminal("/dev/pts/42", "ops", "ann@example.com", 4242)
    write_records(files, entry, USER_PROCESS, 1_800_000_000.5)
    listed = who(files)
    assert "ops" in listed and "pts/42" in listed and "(tucdesk:ann@example.com)" in listed
    assert "no logout" in last(files)  # "gone - no logout": pid 4242 is not running
    write_records(files, entry, DEAD_PROCESS, 1_800_000_060.0)
    assert who(files).strip() == ""
    ended = last(files)
    assert "pts/42" in ended and "tucdesk:ann@example.com" in ended
    assert "logout" not in ended and "logged in" not in ended and "(00:01)" in ended
    # One utmp slot (replaced by the logout, found by its id), two wtmp records, as sshd's.
    (slot,) = utmpdump(files.utmp)
    assert slot.startswith("[8] [04242] [s/42]")
    login, logout = utmpdump(files.wtmp)
    assert login.startswith("[7] [04242] [s/42] [ops")
    assert logout.startswith("[8] [04242] [s/42] [    ")


def test_a_long_operator_name_is_cut_to_the_host_field() -> None:
    entry = LoginEntry.for_terminal("/dev/pts/1", "ops", "é" * 300, 1)
    assert entry.host.startswith("tucdesk:é")
    assert len(entry.host.encode()) <= login_records.HOST_SIZE
    entry.host.encode().decode()  # never cut inside a character


def test_a_missing_utmp_file_is_reported_and_wtmp_is_still_written(
    files: LoginRecordFiles,
) -> None:
    files.utmp.unlink()
    entry = LoginEntry.for_terminal("/dev/pts/3", "ops", "ann@example.com", 33)
    with pytest.raises(login_records.LoginRecordError, match=str(files.utmp)):
        write_records(files, entry, USER_PROCESS, 1_800_000_000.0)
    assert len(utmpdump(files.wtmp)) == 1


# --- sessions ------------------------------------------------------------------------------


@trio_test
async def test_a_pty_session_is_a_login_in_who_and_last_while_it_runs(
    files: LoginRecordFiles,
) -> None:
    _require_root()
    _require("who", "last")
    account = pwd.getpwnam(SESSION_USER)
    spec = PtySessionSpec(
        user=SESSION_USER,
        command=["/bin/sh", "-c", "echo uid=$(cat /proc/self/loginuid) mask=$(umask) ready; "
                 "read line; echo done"],
        login_records=files,
        operator="ann@example.com",
        umask=0o027,
    )
    output = bytearray()
    ready = trio.Event()
    listed: list[str] = []

    async def on_output(stream: object, data: bytes) -> None:
        output.extend(data)
        if b"ready" in output:
            ready.set()

    async with open_pty_session(spec) as session:

        async def log_in_and_leave() -> None:
            await ready.wait()
            await login_records.wait_for_login_records()  # written in the background
            listed.append(who(files))
            await session.send_input(b"\n")

        with trio.fail_after(WAIT_SECONDS):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(log_in_and_leave)
                await session.run(on_output)
    (during,) = listed
    assert f"{SESSION_USER} " in during and "(tucdesk:ann@example.com)" in during
    assert "pts/" in during
    assert b"mask=0027" in output
    if login_records.login_uid_applies():
        assert f"uid={account.pw_uid} ".encode() in output
    await login_records.wait_for_login_records()
    assert who(files).strip() == ""
    ended = last(files)
    assert SESSION_USER in ended and "tucdesk:ann@example.com" in ended
    assert "still logged in" not in ended


@trio_test
async def test_a_session_goes_on_when_its_login_records_cannot_be_written(
    files: LoginRecordFiles, caplog: pytest.LogCaptureFixture
) -> None:
    files.utmp.unlink()
    files.wtmp.unlink()
    spec = PtySessionSpec(command=["/bin/sh", "-c", "echo fine"], login_records=files)
    caplog.set_level(logging.WARNING, "tucdesk.agent.login_records")
    for _ in range(2):
        output = bytearray()
        async with open_pty_session(spec) as session:
            await session.run(lambda stream, data, output=output: _append(output, data))
        assert b"fine" in output
    await login_records.wait_for_login_records()
    warnings = [record for record in caplog.records if "login records" in record.message]
    assert len(warnings) == 1  # once per daemon, not once per session or per record
    assert str(files.utmp) in warnings[0].message


async def _append(output: bytearray, data: bytes) -> None:
    output.extend(data)


@trio_test
async def test_an_exec_session_gets_the_session_umask_and_login_uid_not_the_agents() -> None:
    _require_root()
    account = pwd.getpwnam(SESSION_USER)
    previous = os.umask(0o077)  # the unit's UMask=0077
    try:
        spec = ExecSessionSpec(
            command=["/bin/sh", "-c", "umask; cat /proc/self/loginuid"], user=SESSION_USER
        )
        output = bytearray()
        async with open_exec_session(spec) as session:
            with trio.fail_after(WAIT_SECONDS):
                await session.run(lambda stream, data: _append(output, data))
    finally:
        os.umask(previous)
    umask_line, login_uid_line = output.decode().split()
    assert umask_line == "0022"
    if not login_records.login_uid_applies():
        pytest.skip("this kernel has no /proc/self/loginuid")
    assert int(login_uid_line) == account.pw_uid


# --- the setting ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["022", "0027", "077", "0000"])
def test_a_session_umask_of_three_or_four_octal_digits_is_accepted(value: str) -> None:
    config = load_config({}, {"TUCDESK_AGENT_SESSION_UMASK": value})
    assert config.session_umask_bits == int(value, 8)


@pytest.mark.parametrize("value", ["22", "0o22", "088", "1022", "00022", "u=rwx", " 022"])
def test_a_session_umask_that_is_not_three_or_four_octal_digits_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="session_umask must be 3 or 4 octal digits"):
        AgentConfig(session_umask=value).validate()


def test_the_default_session_umask_is_sshds() -> None:
    assert AgentConfig().session_umask_bits == 0o022


def _agent(*arguments: str, umask: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "TUCDESK_AGENT_SESSION_UMASK": umask}
    environment.pop("TUCDESK_AGENT_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "agent.main", *arguments, "--state-dir", str(tmp_path / "state")],
        capture_output=True, text=True, env=environment, timeout=60, check=False,
    )


def test_the_agent_refuses_to_run_with_a_bad_session_umask_and_says_why(tmp_path: Path) -> None:
    result = _agent("run", umask="22", tmp_path=tmp_path)
    assert result.returncode == 78  # a lasting configuration error: systemd does not restart
    assert "session_umask must be 3 or 4 octal digits" in result.stderr
    assert "'22'" in result.stderr


def test_check_shows_the_session_umask(tmp_path: Path) -> None:
    result = _agent("check", umask="0027", tmp_path=tmp_path)
    assert "Session umask: 0027 (session_umask)" in result.stdout


def test_a_login_uid_the_kernel_refused_is_warned_about_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # What a session's child leaves when its write to /proc/self/loginuid is refused: the
    # agent's own login uid (here this process's), not the session user's.
    if not login_records.PROC_SELF_LOGIN_UID.exists():
        pytest.skip("this kernel has no /proc/self/loginuid")
    own = int(login_records.PROC_SELF_LOGIN_UID.read_text())
    caplog.set_level(logging.WARNING, "tucdesk.agent.login_records")
    for _ in range(3):
        login_records.check_login_uid(os.getpid(), (own + 1) % login_records.LOGIN_UID_UNSET)
    warnings = [record for record in caplog.records if "audit login uid" in record.message]
    assert len(warnings) == 1
    login_records.check_login_uid(os.getpid(), own)  # as set: nothing to say
    assert len(caplog.records) == 1
