"""The agent daemon as the admin runs it: one per state dir, signals, status exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import trio

from agent.daemon_lock import DaemonLockError, acquire_daemon_lock, lock_file_path
from agent.machine_identity import read_machine_identifiers
from agent.main import STATUS_DISCONNECTED, STATUS_NOT_RUNNING, STATUS_RUNNING
from agent.main import main as agent_main
from agent.state_file import AgentState, save_state
from agent.status import DaemonStatus, read_status, write_status
from protocol.version import installed_version
from tests.agent.test_control_client import (
    AGENT_COMMAND,
    WAIT_SECONDS,
    daemon_options,
    enrolled_agent,
    free_port,
    rendezvous_on,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


async def agent_cli(
    args: list[str], environment: dict[str, str]
) -> tuple[int, str, str]:
    """Run a short ``tucdesk-agent`` command; (exit code, stdout, stderr)."""
    with trio.fail_after(WAIT_SECONDS):
        result = await trio.run_process(
            [AGENT_COMMAND, *args], capture_stdout=True, capture_stderr=True, check=False,
            env=environment,
        )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def wait_for_status(common: list[str], environment: dict[str, str], code: int) -> str:
    """Poll ``status`` (another process: no event to wait on) until it exits with ``code``."""
    with trio.fail_after(WAIT_SECONDS):
        while True:
            found, out, _ = await agent_cli(["status", *common], environment)
            if found == code:
                return out
            await trio.sleep(0.1)


async def test_one_daemon_per_state_dir_and_enroll_waits_for_it_to_stop(
    tmp_path: Path,
) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    state_dir = tmp_path / "state"
    common, environment = daemon_options(tmp_path, state_dir)
    log = tmp_path / "first.log"
    async with rendezvous_on(tmp_path / "data", store_url, free_port()) as url:
        state = await enrolled_agent(url, store_url, state_dir)
        state_before = (state_dir / "agent.state").read_bytes()
        with log.open("wb") as log_handle:
            first = await trio.lowlevel.open_process(
                [AGENT_COMMAND, "run", *common], env=environment, stderr=log_handle
            )
        try:
            await wait_for_status(common, environment, STATUS_RUNNING)
            assert stat_mode(lock_file_path(state_dir)) == 0o600

            code, _, err = await agent_cli(["run", *common], environment)
            assert code == 1, err
            assert err.strip() == (
                f"tucdesk-agent: another tucdesk-agent (pid {first.pid}) is running with "
                f"{state_dir}"
            )
            # The refused second daemon neither took the connection nor wrote "stopped".
            status = read_status(state_dir / "status.json")
            assert status is not None and status.pid == first.pid and status.connected

            code, out, err = await agent_cli(
                ["enroll", "--server", url, "--force", *common],
                {**environment, "TUCDESK_REGISTRATION_KEY": "rk_live_" + "a" * 40},
            )
            assert code == 1, out + err
            assert f"(pid {first.pid})" in err and "stop the daemon first" in err
            assert len(err.strip().splitlines()) == 1
            assert (state_dir / "agent.state").read_bytes() == state_before
        finally:
            first.kill()
            await first.wait()
        # A killed holder leaves no stale lock: the kernel released it.
        with acquire_daemon_lock(state_dir):
            pass
    assert "starting" in log.read_text() and state.agent_id in log.read_text()


async def test_sighup_is_logged_and_ignored_and_status_follows_the_connection(
    tmp_path: Path,
) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    state_dir = tmp_path / "state"
    common, environment = daemon_options(tmp_path, state_dir)
    log = tmp_path / "daemon.log"
    port = free_port()
    async with rendezvous_on(tmp_path / "data", store_url, port) as url:
        await enrolled_agent(url, store_url, state_dir)
        with log.open("wb") as log_handle:
            process = await trio.lowlevel.open_process(
                [AGENT_COMMAND, "run", *common], env=environment, stderr=log_handle
            )
        try:
            out = await wait_for_status(common, environment, STATUS_RUNNING)
            assert "Connected:    yes" in out
            process.send_signal(signal.SIGHUP)
            with trio.fail_after(WAIT_SECONDS):
                while "SIGHUP" not in log.read_text():  # noqa: ASYNC110 - another process
                    await trio.sleep(0.05)
            await trio.sleep(0.3)
            assert process.poll() is None
            assert "reloading is not supported" in log.read_text()
            await wait_for_status(common, environment, STATUS_RUNNING)
        except BaseException:
            process.kill()
            raise
    try:
        # The rendezvous is gone: running but disconnected.
        out = await wait_for_status(common, environment, STATUS_DISCONNECTED)
        assert "Connected:    no" in out and "Last error:" in out
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT_SECONDS):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
    await wait_for_status(common, environment, STATUS_NOT_RUNNING)
    text = log.read_text()
    assert f"tucdesk-agent {installed_version()}: agent" in text
    assert "received SIGTERM; stopping" in text


def stat_mode(path: Path) -> int:
    return os.lstat(path).st_mode & 0o777


def test_the_lock_file_is_never_followed_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep\n")
    (tmp_path / "state").mkdir()
    lock_file_path(tmp_path / "state").symlink_to(target)
    with pytest.raises(DaemonLockError, match="symbolic link"):
        acquire_daemon_lock(tmp_path / "state")
    assert target.read_text() == "keep\n"


def test_a_second_lock_in_another_process_is_refused_naming_the_holder(tmp_path: Path) -> None:
    with acquire_daemon_lock(tmp_path, "stop it first"):
        holder = subprocess.run(
            [os.fspath(Path(AGENT_COMMAND).parent / "python"), "-c",
             "from agent.daemon_lock import acquire_daemon_lock as a; import sys; "
             "a(sys.argv[1], 'stop it first')", str(tmp_path)],
            capture_output=True, text=True, check=False,
        )
    assert holder.returncode != 0
    assert f"another tucdesk-agent (pid {os.getpid()}) is running with {tmp_path}; stop it " \
        "first" in holder.stderr
    assert stat_mode(lock_file_path(tmp_path)) == 0o600


def test_status_after_a_kill_9_says_not_running_even_if_the_pid_was_reused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "machine"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "machine-id").write_text("0123456789abcdef0123456789abcdef\n")
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    state = AgentState(
        agent_id="agt_1", team_id="tm_1", server_url="http://127.0.0.1:1",
        identity_seed=bytes(32), service_keys={},
    )  # fmt: skip
    save_state(state_dir / "agent.state", state, read_machine_identifiers(root))
    acquire_daemon_lock(state_dir).release()  # the daemon that took it is gone (kill -9)
    # What it left says "connected"; its pid now belongs to a live process (this one).
    write_status(
        state_dir / "status.json",
        DaemonStatus(os.getpid(), state.server_url, True, time.time(), time.time(), None),
    )
    arguments = ["status", "--state-dir", str(state_dir), "--machine-root", str(root)]
    assert agent_main(arguments, environ={}) == STATUS_NOT_RUNNING
    assert "Daemon:       not running" in capsys.readouterr().out
    with acquire_daemon_lock(state_dir):  # a daemon that does hold the lock is believed
        assert agent_main(arguments, environ={}) == STATUS_RUNNING
    assert f"Daemon:       running (pid {os.getpid()})" in capsys.readouterr().out
