"""A throwaway PostgreSQL cluster for tests, started with the machine's own initdb/pg_ctl.

The cluster listens on a free 127.0.0.1 port and a unix socket inside its temporary directory,
runs with fsync off (tests never need durability across a power cut), and is removed on stop.
When the test process runs as root, PostgreSQL refuses to run as root, so the binaries run as
the ``postgres`` user through ``runuser`` and the directory is handed to that user.

Reusable by any test suite: ``find_postgres_bin_dir()`` says whether PostgreSQL is available,
``PostgresCluster`` starts and stops one, ``create_database`` makes a fresh database in it.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

POSTGRES_USER = "postgres"
START_TIMEOUT_SECONDS = 60
COMMAND_TIMEOUT_SECONDS = 120
_SEARCH_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin")
_SERVER_SETTINGS = (
    "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
    "-c max_connections=200 -c shared_buffers=32MB"
)


class PostgresUnavailable(RuntimeError):
    """PostgreSQL binaries are missing or the cluster could not start; the message says why."""


def find_postgres_bin_dir() -> Path | None:
    """The directory holding initdb and pg_ctl (PATH first, then the usual places), or None."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(os.path.realpath(on_path)).parent
    candidates = sorted(
        (Path(d) for pattern in _SEARCH_GLOBS for d in glob.glob(pattern)),
        key=lambda d: _version_key(d),
        reverse=True,
    )
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


def _version_key(directory: Path) -> tuple[int, ...]:
    digits = "".join(c if c.isdigit() else " " for c in str(directory))
    return tuple(int(part) for part in digits.split())


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresCluster:
    """One temporary PostgreSQL cluster on loopback. ``start()``, then ``url(db)``, ``stop()``."""

    def __init__(self, bin_dir: Path, hba_lines: tuple[str, ...] = ()) -> None:
        """``hba_lines`` go first in pg_hba.conf (e.g. password auth for one role over TCP);
        everything else is trusted."""
        self.bin_dir = bin_dir
        self.hba_lines = hba_lines
        self.port = 0
        self.base_dir: Path | None = None
        self._as_root = os.geteuid() == 0

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory."""
        assert self.base_dir is not None
        return self.base_dir / "data"

    @property
    def socket_dir(self) -> Path:
        """Where the server puts its unix socket (inside the temporary directory)."""
        assert self.base_dir is not None
        return self.base_dir / "sock"

    def url(self, database: str = "postgres") -> str:
        """A libpq/asyncpg URL for ``database`` on this cluster over loopback TCP."""
        return f"postgresql://{POSTGRES_USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """initdb a fresh cluster in a temporary directory and start it; PostgresUnavailable."""
        self.base_dir = Path(tempfile.mkdtemp(prefix="tucdesk-pg-"))
        self.socket_dir.mkdir()
        if self._as_root:
            try:
                entry = pwd.getpwnam(POSTGRES_USER)
            except KeyError:
                raise PostgresUnavailable(
                    f"running as root, but there is no {POSTGRES_USER!r} user to run PostgreSQL as"
                ) from None
            for path in (self.base_dir, self.socket_dir):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D", str(self.data_dir),
                "-U", POSTGRES_USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ]
        )  # fmt: skip
        if self.hba_lines:
            hba = self.data_dir / "pg_hba.conf"
            hba.write_text("\n".join(self.hba_lines) + "\n" + hba.read_text())
        self.port = free_loopback_port()
        options = (
            f"-p {self.port} -k {self.socket_dir} -c listen_addresses=127.0.0.1 {_SERVER_SETTINGS}"
        )
        self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "-D", str(self.data_dir),
                "-l", str(self.base_dir / "server.log"),
                "-o", options,
                "-w", "-t", str(START_TIMEOUT_SECONDS),
                "start",
            ]
        )  # fmt: skip

    def stop(self) -> None:
        """Stop the server (immediate mode: nothing to keep) and delete its directory."""
        if self.base_dir is None:
            return
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run(
                    [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate",
                     "-w", "stop"]
                )  # fmt: skip
        finally:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None

    def server_log(self) -> str:
        """The server log so far (for failure messages)."""
        if self.base_dir is None:
            return ""
        try:
            return (self.base_dir / "server.log").read_text(errors="replace")
        except OSError:
            return ""

    def create_database(self, name: str) -> str:
        """Create database ``name`` (an identifier made of [a-z0-9_]) and return its URL."""
        if not name.replace("_", "").isalnum() or not name.islower():
            raise ValueError("database names here are lower-case [a-z0-9_]")
        self._run(
            [str(self.bin_dir / "createdb") if (self.bin_dir / "createdb").exists() else "createdb",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", POSTGRES_USER, name]
        )  # fmt: skip
        return self.url(name)

    def _run(self, argv: list[str]) -> None:
        if self._as_root:
            argv = ["runuser", "-u", POSTGRES_USER, "--", *argv]
        try:
            result = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_SECONDS,
                cwd=self.base_dir or "/",
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgresUnavailable(f"{Path(argv[-1]).name}: {exc}") from exc
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}\n"
                f"{self.server_log()[-4000:]}"
            )
