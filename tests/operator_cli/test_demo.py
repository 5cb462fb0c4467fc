"""`tucdesk demo`: the whole local stack from one command, and nothing left behind afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

pytestmark = pytest.mark.slow

DEMO_TIMEOUT_SECONDS = 120


def processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command_line = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in command_line:
            found.append(int(entry.name))
    return found


def run_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch))
    env.pop("TUCDESK_HOME", None)
    return subprocess.run(
        [sys.executable, "-m", "operator_cli.main", "demo", *args],
        stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=DEMO_TIMEOUT_SECONDS,
        check=False,
    )


def test_demo_exec_prints_the_output_exits_zero_and_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    completed = run_demo(tmp_path, "--exec", "echo hello")
    progress = completed.stderr.decode()
    assert completed.returncode == 0, progress
    assert completed.stdout == b"hello\n"
    assert "agent key   SHA256:" in progress
    assert "rendezvous  https://127.0.0.1:" in progress
    assert "try also" not in progress  # the stack stops right after: nothing to try
    assert list((tmp_path / "scratch").iterdir()) == []
    assert processes_mentioning(str(tmp_path / "scratch")) == []


def test_demo_exec_exits_with_the_remote_commands_status(tmp_path: Path) -> None:
    completed = run_demo(tmp_path, "--exec", "echo oops >&2; exit 5")
    assert completed.returncode == 5
    assert b"oops\n" in completed.stderr
    assert list((tmp_path / "scratch").iterdir()) == []


def test_demo_shell_stopped_by_sigterm_cleans_up_everything(tmp_path: Path) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch), TERM="xterm")
    env.pop("TUCDESK_HOME", None)
    child = pexpect.spawn(
        sys.executable, ["-m", "operator_cli.main", "demo"], env=env,
        timeout=DEMO_TIMEOUT_SECONDS,
    )
    child.expect("opening a shell")
    child.sendline("echo in-demo-$((40+2))")
    child.expect("in-demo-42")
    child.kill(signal.SIGTERM)
    child.expect("stopped everything and removed the directory")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 128 + signal.SIGTERM
    assert list(scratch.iterdir()) == []
    assert processes_mentioning(str(scratch)) == []
