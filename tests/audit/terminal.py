"""Run a console script with its stderr on a real pseudo-terminal (progress lines are for ttys)."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
from pathlib import Path

WAIT_SECONDS = 60


def run_with_terminal_stderr(script: str, argv: list[str]) -> tuple[int, bytes, bytes]:
    """Run the installed ``script``: stdout on a pipe, stderr on a pty; (status, stdout, tty)."""
    leader, follower = pty.openpty()
    try:
        child = subprocess.Popen(
            [str(Path(sys.executable).parent / script), *argv],
            stdout=subprocess.PIPE,
            stderr=follower,
            stdin=subprocess.DEVNULL,
        )
        os.close(follower)
        follower = -1
        terminal = b""
        while True:
            ready, _, _ = select.select([leader], [], [], WAIT_SECONDS)
            assert ready, f"{script} hung"
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: every writer closed its end
                break
            if not data:
                break
            terminal += data
        assert child.stdout is not None
        out = child.stdout.read()
        child.stdout.close()
        return child.wait(timeout=WAIT_SECONDS), out, terminal
    finally:
        os.close(leader)
        if follower >= 0:
            os.close(follower)
