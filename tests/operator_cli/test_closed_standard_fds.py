"""Commands started with fd 0, 1 or 2 closed must not let a socket take that number."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

# Runs in a child whose fd N was closed before exec; prints what fd N is afterwards on stderr
# (or stdout, when 2 is the closed one).
PROBE = """
import os, socket, stat, sys
closed = int(sys.argv[1])
entry = sys.argv[2]
try:
    if entry == "helper":
        from protocol.stdio_fds import open_dev_null_on_closed_standard_fds
        open_dev_null_on_closed_standard_fds()
    else:
        module, function = entry.split(":")
        sys.argv = [module, "--help"]
        getattr(__import__(module, fromlist=[function]), function)()
except SystemExit:
    pass
connection = socket.socket()
report = os.fdopen(os.dup(1 if closed == 2 else 2), "w")
mode = os.fstat(closed).st_mode
device = os.fstat(closed).st_rdev == os.stat(os.devnull).st_rdev
print(connection.fileno(), stat.S_ISCHR(mode) and device, file=report, flush=True)
"""


def _probe(closed: int, entry: str) -> tuple[int, bool]:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(closed), entry],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        preexec_fn=lambda: os.close(closed),
        timeout=60,
        check=False,
    )
    output = (result.stdout if closed == 2 else result.stderr).decode()
    socket_fd, is_dev_null = output.split()[-2:]
    return int(socket_fd), is_dev_null == "True"


@pytest.mark.parametrize("closed", [0, 1, 2])
def test_a_closed_standard_fd_gets_dev_null_so_a_socket_cannot_take_it(closed: int) -> None:
    socket_fd, is_dev_null = _probe(closed, "helper")
    assert socket_fd > 2
    assert is_dev_null


@pytest.mark.parametrize("entry", [
    "operator_cli.main:main",
    "agent.main:main",
    "rendezvous.main:main",
    "relay.main:main",
    "audit.main:console_main",
])
def test_every_command_fills_a_closed_stdout_before_opening_anything(entry: str) -> None:
    socket_fd, is_dev_null = _probe(1, entry)
    assert socket_fd > 2
    assert is_dev_null


def test_open_standard_fds_are_left_alone() -> None:
    from protocol.stdio_fds import open_dev_null_on_closed_standard_fds

    before = [os.fstat(fd) for fd in (0, 1, 2)]
    open_dev_null_on_closed_standard_fds()
    after = [os.fstat(fd) for fd in (0, 1, 2)]
    assert [(s.st_dev, s.st_ino, stat.S_IFMT(s.st_mode)) for s in before] == [
        (s.st_dev, s.st_ino, stat.S_IFMT(s.st_mode)) for s in after]
