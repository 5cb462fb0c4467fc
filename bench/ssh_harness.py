"""OpenSSH on a loopback port for side-by-side benchmarks: a private sshd and a matching ssh.

``SshServer`` generates a host key and a user key in a temporary directory, writes an sshd
config that listens on 127.0.0.1 only, accepts exactly that user key (root login with a key is
allowed here, for the benchmark only), and runs ``sshd -D -e`` in the foreground. ``ssh_argv``
builds the client command line that ignores the user's own ssh config and known_hosts.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SSHD_START_TIMEOUT_SECONDS = 20.0
SSHD_STOP_TIMEOUT_SECONDS = 10.0
SSHD_PRIVILEGE_SEPARATION_DIR = Path("/run/sshd")
_POLL_SECONDS = 0.05


class SshUnavailable(RuntimeError):
    """sshd or ssh is not installed, or the private sshd did not start; the message says why."""


def find_sshd() -> Path | None:
    """The sshd binary (PATH, then /usr/sbin), or None."""
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    return Path(found) if found else None


def _free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _generate_key(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
    )


class SshServer:
    """A running private sshd: its port, the user it logs in as, and the client key."""

    def __init__(self, directory: Path, port: int, user: str, process: subprocess.Popen[bytes]):
        self.directory = directory
        self.port = port
        self.user = user
        self.process = process
        self.client_key = directory / "client_ed25519"

    def ssh_argv(self, *options: str) -> list[str]:
        """``ssh`` with this server's port and key, no user config and no host-key prompts;
        append ``-T``/``-tt`` and the remote command yourself."""
        return [
            "ssh",
            "-F", "/dev/null",
            "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null",
            "-o", "BatchMode=yes",
            "-o", "LogLevel=ERROR",
            "-o", "IdentitiesOnly=yes",
            "-i", str(self.client_key),
            "-p", str(self.port),
            *options,
            f"{self.user}@127.0.0.1",
        ]  # fmt: skip

    def log(self) -> str:
        """What sshd printed so far (``-e`` sends its log to stderr, kept in a file)."""
        try:
            return (self.directory / "sshd.log").read_text(errors="replace")
        except OSError:
            return ""


def _sshd_config(directory: Path, port: int, user: str) -> str:
    return "\n".join(
        [
            "ListenAddress 127.0.0.1",
            f"Port {port}",
            f"HostKey {directory / 'host_ed25519'}",
            f"AuthorizedKeysFile {directory / 'authorized_keys'}",
            f"PidFile {directory / 'sshd.pid'}",
            f"AllowUsers {user}",
            "PermitRootLogin prohibit-password",  # benchmark only: root may log in with the key
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",  # the key files live in a temporary directory
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "MaxStartups 100:30:200",
            "LogLevel ERROR",
            "",
        ]
    )


def _wait_until_listening(port: int, process: subprocess.Popen[bytes], directory: Path) -> None:
    deadline = time.monotonic() + SSHD_START_TIMEOUT_SECONDS
    while True:
        if process.poll() is not None:
            log = (directory / "sshd.log").read_text(errors="replace")
            raise SshUnavailable(f"sshd exited with {process.returncode}: {log[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as probe:
                probe.settimeout(1.0)
                if probe.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SshUnavailable(f"sshd did not listen on 127.0.0.1:{port} in time")
        time.sleep(_POLL_SECONDS)


@contextmanager
def ssh_server() -> Iterator[SshServer]:
    """Run a private sshd on a free loopback port for the current user; stop it on exit."""
    sshd = find_sshd()
    if sshd is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        raise SshUnavailable("OpenSSH (sshd, ssh, ssh-keygen) is not installed")
    if os.geteuid() == 0:
        SSHD_PRIVILEGE_SEPARATION_DIR.mkdir(mode=0o755, exist_ok=True)
    user = getpass.getuser()
    directory = Path(tempfile.mkdtemp(prefix="tucdesk-sshd-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        _generate_key(directory / "host_ed25519", "tucdesk-bench-host")
        _generate_key(directory / "client_ed25519", "tucdesk-bench-client")
        shutil.copyfile(directory / "client_ed25519.pub", directory / "authorized_keys")
        port = _free_loopback_port()
        config = directory / "sshd_config"
        config.write_text(_sshd_config(directory, port, user))
        with (directory / "sshd.log").open("wb") as log:
            process = subprocess.Popen(
                [str(sshd), "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        _wait_until_listening(port, process, directory)
        yield SshServer(directory, port, user, process)
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=SSHD_STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    with ssh_server() as server:
        result = subprocess.run(
            [*server.ssh_argv("-T"), "echo", "ssh-ok"], capture_output=True, timeout=30
        )
        print(result.returncode, result.stdout, result.stderr)
