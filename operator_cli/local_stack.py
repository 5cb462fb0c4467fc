"""A whole TucDesk deployment on loopback in one directory: rendezvous, relay, agent, CLI home.

``tucdesk demo`` runs on it, and so do the whole-stack tests and the benchmarks. Every part is a
real process started from this Python (``python -m …``), talking over real sockets on 127.0.0.1,
with the rendezvous on real TLS under a throwaway CA (operator_cli/local_ca.py).

Typical use::

    with LocalStack(base_dir) as stack:          # base_dir must exist; nothing outside it is used
        stack.start()                            # everything below, in this order
        # stack.create_certificates(); stack.init_rendezvous(); stack.start_relay()
        # stack.start_rendezvous(); stack.create_operator(); stack.enroll_agent()
        # stack.start_agent(); stack.wait_agent_online()
        stack.run_tucdesk("exec", stack.agent_name, "--", "uname", "-a")
    # leaving the block stops every process it started (SIGTERM, then SIGKILL)

Layout under ``base_dir``: ``tls/`` (CA and server certificate), ``rendezvous/`` (data dir:
service keys and the SQLite file unless ``database_url`` is given), ``relay/`` (the relay-token
public key), ``agent/`` (the agent's machine-bound state), ``cli/`` (the operator's CLI home),
``logs/NAME.log`` (each process's stdout and stderr).

Stable API (the tests and benchmarks depend on it):

* ``LocalStack(base_dir, database_url=None, *, python=sys.executable, extra_env=None,
  progress=None, relay_args=(), rendezvous_args=(), agent_args=())``
* ``start()``; ``close()`` (idempotent; also ``with``)
* ``create_certificates()``, ``init_rendezvous()``
* ``start_relay(port=None) -> (host, port)``, ``stop_relay()``, ``kill_relay()``
* ``start_rendezvous(port=None, name="rendezvous") -> url``, ``stop_rendezvous(name=…)``,
  ``kill_rendezvous(name=…)``; a second name starts another instance on the same data dir and
  database (PostgreSQL for that to make sense) on its own port
* ``create_operator(email=…, role="admin", home=None, server_url=None) -> Path`` (CLI home)
* ``create_registration_key(home=None) -> str``
* ``enroll_agent(name=…, state_dir=None, server_url=None) -> AgentInfo``
* ``start_agent(state_dir=None, name="agent")``, ``stop_agent(name=…)``, ``kill_agent(name=…)``
* ``wait_agent_online(agent_name=None, timeout=…) -> AgentInfo``, ``agent_online(...) -> bool``
* ``tucdesk_command(*args) -> list[str]``, ``cli_env(home=None) -> dict``,
  ``run_tucdesk(*args, input=None, timeout=…, home=None) -> CompletedProcess``
* attributes: ``server_url``, ``ca_file``, ``cli_home``, ``relay_address``, ``agent`` (AgentInfo),
  ``agent_name``, ``team_name``, ``processes`` (name -> ManagedProcess), ``log_dir``
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

from operator_cli.agent_listing import agents_named
from operator_cli.client import ApiError, Session
from operator_cli.home import CliHome
from operator_cli.local_ca import LocalCertificates, create_local_certificates

LOOPBACK_HOST = "127.0.0.1"
DEFAULT_TEAM_NAME = "demo"
DEFAULT_OPERATOR_EMAIL = "operator@demo.localhost"
DEFAULT_AGENT_NAME = "demo-agent"
DEFAULT_RELAY_ID = "relay-1"
START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
ONLINE_TIMEOUT_SECONDS = 30.0
COMMAND_TIMEOUT_SECONDS = 60.0
POLL_INTERVAL_SECONDS = 0.05
# The CLI started as the `tucdesk` console script starts it. Not `python -m operator_cli.main`:
# under -m, CPython ends the process by SIGINT at exit (status -2, not the CLI's 130) whenever a
# KeyboardInterrupt once passed through code compiled from a string, such as a dataclass being
# made by a lazy import, even after the CLI caught it and printed its message.
CLI_ENTRY_POINT = "import sys; from operator_cli.main import main; sys.exit(main())"
RELAY_GRACE_SECONDS = 1.0
LOG_TAIL_BYTES = 2000
# How each service announces the port it bound (we start them on port 0: no port races).
_RENDEZVOUS_LISTENING = re.compile(rb"Running on https?://([0-9.]+):(\d+)")
_RELAY_LISTENING = re.compile(rb"relay_started .*?tcp=([0-9.]+):(\d+)")

Progress = Callable[[str], None]


class LocalStackError(Exception):
    """A part of the local stack failed to start or to answer; the message says which and why."""


@dataclass(frozen=True)
class AgentInfo:
    """An enrolled agent as the rendezvous lists it."""

    id: str
    name: str
    fingerprint: str
    online: bool


class ManagedProcess:
    """One child process with its log file; stopped with SIGTERM, then SIGKILL after a timeout."""

    def __init__(
        self, name: str, popen: subprocess.Popen[bytes], log_path: Path, log_offset: int = 0
    ) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path
        self.log_offset = log_offset  # where this run's lines start (logs are appended to)

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.popen.pid

    def is_running(self) -> bool:
        """True while the process has not exited."""
        return self.popen.poll() is None

    def log_text(self) -> str:
        """The last part of the process's log, for error messages."""
        try:
            data = self.log_path.read_bytes()[-LOG_TAIL_BYTES:]
        except OSError:
            return ""
        return data.decode("utf-8", "replace")

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int | None:
        """Ask the process to stop (SIGTERM), kill it if it does not; return its exit status."""
        if self.is_running():
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.popen.returncode

    def kill(self) -> int | None:
        """SIGKILL the process (and anything left in its process group) and reap it."""
        self._signal(signal.SIGKILL)
        try:
            self.popen.wait(STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        self._kill_group_leftovers()
        return self.popen.returncode

    def _signal(self, signum: int) -> None:
        if self.is_running():
            try:
                self.popen.send_signal(signum)
            except ProcessLookupError:
                pass

    def _kill_group_leftovers(self) -> None:
        # Each child leads its own process group (start_new_session): reap stragglers of it.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


class LocalStack:
    """Start, drive and stop a loopback TucDesk deployment under ``base_dir`` (see module doc)."""

    def __init__(
        self,
        base_dir: Path,
        database_url: str | None = None,
        *,
        python: str = sys.executable,
        extra_env: Mapping[str, str] | None = None,
        progress: Progress | None = None,
        team_name: str = DEFAULT_TEAM_NAME,
        relay_id: str = DEFAULT_RELAY_ID,
        relay_args: Sequence[str] = (),
        rendezvous_args: Sequence[str] = (),
        agent_args: Sequence[str] = (),
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.database_url = database_url
        self.python = python
        self.extra_env = dict(extra_env or {})
        self.progress: Progress = progress or (lambda message: None)
        self.team_name = team_name
        self.relay_id = relay_id
        self.relay_args = tuple(relay_args)
        self.rendezvous_args = tuple(rendezvous_args)
        self.agent_args = tuple(agent_args)
        self.tls_dir = self.base_dir / "tls"
        self.data_dir = self.base_dir / "rendezvous"
        self.relay_dir = self.base_dir / "relay"
        self.agent_state_dir = self.base_dir / "agent"
        self.cli_home = self.base_dir / "cli"
        self.log_dir = self.base_dir / "logs"
        self.certificates: LocalCertificates | None = None
        self.processes: dict[str, ManagedProcess] = {}
        self.rendezvous_urls: dict[str, str] = {}
        self.relay_address: tuple[str, int] | None = None
        self.agent: AgentInfo | None = None
        self.agent_name = DEFAULT_AGENT_NAME
        self._team_created = False

    # ---- the whole thing ---------------------------------------------------------------------

    def start(self, agent_name: str = DEFAULT_AGENT_NAME) -> AgentInfo:
        """Start everything and enroll one agent; return it once it is online."""
        self.create_certificates()
        self.init_rendezvous()
        self.start_relay()
        self.start_rendezvous()
        self.create_operator()
        self.enroll_agent(agent_name)
        self.start_agent()
        return self.wait_agent_online()

    def close(self) -> None:
        """Stop every process this stack started, newest first. Safe to call more than once."""
        for name in reversed(list(self.processes)):
            self.processes.pop(name).stop()

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ---- addresses and trust -----------------------------------------------------------------

    @property
    def server_url(self) -> str:
        """The first rendezvous instance's URL (``https://127.0.0.1:PORT``)."""
        urls = self.rendezvous_urls
        url = urls.get("rendezvous") or next(iter(urls.values()), None)
        if url is None:
            raise LocalStackError("the rendezvous has not been started")
        return url

    @property
    def ca_file(self) -> Path:
        """The CA certificate that signed the rendezvous's TLS certificate."""
        if self.certificates is None:
            raise LocalStackError("no certificates yet: call create_certificates()")
        return self.certificates.ca_cert

    def create_certificates(self) -> LocalCertificates:
        """A fresh local CA and a server certificate for 127.0.0.1/localhost."""
        self.certificates = create_local_certificates(self.tls_dir)
        self.progress(f"TLS: local CA {self.certificates.ca_cert}")
        return self.certificates

    # ---- rendezvous --------------------------------------------------------------------------

    def _store_flags(self) -> list[str]:
        flags = ["--data-dir", str(self.data_dir)]
        if self.database_url:
            flags += ["--database", self.database_url]
        return flags

    def rendezvous_admin(self, *args: str) -> str:
        """Run ``tucdesk-rendezvous ARGS --data-dir … [--database …]``; return its stdout."""
        command = [self.python, "-m", "rendezvous.main", *args, *self._store_flags()]
        return self._run_checked(command, f"tucdesk-rendezvous {args[0]}")

    def init_rendezvous(self) -> None:
        """Create the rendezvous schema and service keys; export the relay-token public key."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.rendezvous_admin("init")
        pem = self.rendezvous_admin("keys", "show", "--pem", "relay-token")
        self.relay_dir.mkdir(parents=True, exist_ok=True)
        self.relay_token_key.write_text(pem)

    @property
    def relay_token_key(self) -> Path:
        """The rendezvous relay-token public key (PEM) the relay verifies tokens with."""
        return self.relay_dir / "relay-token.pub.pem"

    def start_rendezvous(self, port: int | None = None, name: str = "rendezvous") -> str:
        """Serve the rendezvous over TLS on 127.0.0.1 (port 0 the first time, then the same one)."""
        if self.certificates is None:
            raise LocalStackError("no certificates yet: call create_certificates()")
        if self.relay_address is None:
            raise LocalStackError("start the relay before the rendezvous (it needs the address)")
        previous = self.rendezvous_urls.get(name)
        if port is None:
            port = int(previous.rsplit(":", 1)[1]) if previous else 0
        relay_host, relay_port = self.relay_address
        command = [
            self.python, "-m", "rendezvous.main", "serve", *self._store_flags(),
            "--listen", f"{LOOPBACK_HOST}:{port}",
            "--tls-cert", str(self.certificates.server_cert),
            "--tls-key", str(self.certificates.server_key),
            "--relay", f"{self.relay_id}={relay_host}:{relay_port}",
            *self.rendezvous_args,
        ]
        process = self._spawn(name, command)
        host, bound = self._wait_for_listening(process, _RENDEZVOUS_LISTENING)
        url = f"https://{host}:{bound}"
        self.rendezvous_urls[name] = url
        self._wait_healthy(process, url)
        self.progress(f"rendezvous: {url} (pid {process.pid}, log {process.log_path})")
        return url

    def stop_rendezvous(self, name: str = "rendezvous") -> None:
        """Stop a rendezvous instance gracefully; its URL is kept for a restart on the same port."""
        self._stop(name)

    def kill_rendezvous(self, name: str = "rendezvous") -> None:
        """SIGKILL a rendezvous instance (a crash, for restart tests)."""
        self._kill(name)

    # ---- relay -------------------------------------------------------------------------------

    def start_relay(self, port: int | None = None) -> tuple[str, int]:
        """Run the relay on 127.0.0.1 (port 0 the first time, then the same one)."""
        if not self.relay_token_key.exists():
            raise LocalStackError("no relay-token key yet: call init_rendezvous()")
        if port is None:
            port = self.relay_address[1] if self.relay_address else 0
        command = [
            self.python, "-m", "relay.main", "serve",
            "--listen", f"{LOOPBACK_HOST}:{port}",
            "--relay-id", self.relay_id,
            "--token-key", str(self.relay_token_key),
            "--grace", str(RELAY_GRACE_SECONDS),
            *self.relay_args,
        ]
        process = self._spawn("relay", command)
        self.relay_address = self._wait_for_listening(process, _RELAY_LISTENING)
        self.progress(
            f"relay: {self.relay_address[0]}:{self.relay_address[1]} id {self.relay_id} "
            f"(pid {process.pid}, log {process.log_path})"
        )
        return self.relay_address

    def stop_relay(self) -> None:
        """Stop the relay gracefully (it drains for a second, then closes sessions)."""
        self._stop("relay")

    def kill_relay(self) -> None:
        """SIGKILL the relay: every session through it loses its connection at once."""
        self._kill("relay")

    # ---- operators ---------------------------------------------------------------------------

    def create_operator(
        self,
        email: str = DEFAULT_OPERATOR_EMAIL,
        role: str = "admin",
        home: Path | None = None,
        server_url: str | None = None,
    ) -> Path:
        """Create the team (once), invite ``email`` as ``role``, log in; return the CLI home."""
        home = Path(home) if home is not None else self.cli_home
        if not self._team_created:
            existing = self.rendezvous_admin("team", "list")
            if not any(line.split("\t")[-1] == self.team_name for line in existing.splitlines()):
                self.rendezvous_admin("team", "create", self.team_name)
            self._team_created = True
        output = self.rendezvous_admin(
            "invite", "create", "--team", self.team_name, "--email", email, "--role", role,
            "--ttl", "1h",
        )
        invite = output.strip().splitlines()[-1].strip()
        self._run_checked(
            self.tucdesk_command(
                "login", "--server", server_url or self.server_url,
                "--ca-file", str(self.ca_file), "--invite", invite, home=home,
            ),
            "tucdesk login",
        )
        self.progress(f"operator: {email} ({role}), CLI home {home}")
        return home

    def create_registration_key(self, home: Path | None = None) -> str:
        """A fresh single-use agent registration key, made by an admin's CLI."""
        output = self._run_checked(
            self.tucdesk_command("keys", "create", "--ttl", "10m", home=home),
            "tucdesk keys create",
        )
        return output.strip().splitlines()[-1].strip()

    def tucdesk_command(self, *args: str, home: Path | None = None) -> list[str]:
        """The argv that runs ``tucdesk ARGS`` against this stack's CLI home."""
        return [self.python, "-c", CLI_ENTRY_POINT, "--home", str(home or self.cli_home), *args]

    def cli_env(self, home: Path | None = None) -> dict[str, str]:
        """Environment for running ``tucdesk`` yourself (TUCDESK_HOME set to the CLI home)."""
        env = self._child_env()
        env["TUCDESK_HOME"] = str(home or self.cli_home)
        return env

    def run_tucdesk(
        self,
        *args: str,
        input: bytes | None = None,  # noqa: A002 - the name subprocess.run uses
        timeout: float = COMMAND_TIMEOUT_SECONDS,
        home: Path | None = None,
    ) -> subprocess.CompletedProcess[bytes]:
        """Run ``tucdesk ARGS`` to completion; stdout and stderr are captured (bytes)."""
        return subprocess.run(
            self.tucdesk_command(*args, home=home),
            input=input if input is not None else b"",
            capture_output=True,
            timeout=timeout,
            env=self.cli_env(home),
            check=False,
        )

    # ---- agent -------------------------------------------------------------------------------

    def enroll_agent(
        self,
        name: str = DEFAULT_AGENT_NAME,
        state_dir: Path | None = None,
        server_url: str | None = None,
    ) -> AgentInfo:
        """Enroll an agent called ``name`` with a fresh registration key; return it as listed."""
        state_dir = Path(state_dir) if state_dir is not None else self.agent_state_dir
        key = self.create_registration_key()
        self._run_checked(
            [
                self.python, "-m", "agent.main", "enroll",
                "--server", server_url or self.server_url,
                "--registration-key", key,
                "--name", name,
                "--state-dir", str(state_dir),
                "--ca-file", str(self.ca_file),
            ],
            "tucdesk-agent enroll",
        )
        self.agent_name = name
        self.agent = self.find_agent(name)
        if self.agent is None:
            raise LocalStackError(f"agent {name!r} enrolled but the rendezvous does not list it")
        self.progress(f"agent: {name} id {self.agent.id} key {self.agent.fingerprint}")
        return self.agent

    def start_agent(self, state_dir: Path | None = None, name: str = "agent") -> ManagedProcess:
        """Run ``tucdesk-agent run`` on an enrolled state dir (as the current user)."""
        state_dir = Path(state_dir) if state_dir is not None else self.agent_state_dir
        command = [
            self.python, "-m", "agent.main", "run", "--state-dir", str(state_dir),
            *self.agent_args,
        ]
        process = self._spawn(name, command)
        self.progress(f"agent daemon: pid {process.pid}, log {process.log_path}")
        return process

    def stop_agent(self, name: str = "agent") -> None:
        """Stop the agent daemon gracefully."""
        self._stop(name)

    def kill_agent(self, name: str = "agent") -> None:
        """SIGKILL the agent daemon."""
        self._kill(name)

    def find_agent(
        self, agent_name: str | None = None, home: Path | None = None
    ) -> AgentInfo | None:
        """The agent called ``agent_name`` (or with that id) as the rendezvous lists it, or None."""
        wanted = agent_name or self.agent_name
        session = Session.from_home(CliHome(home or self.cli_home))
        try:
            matches = agents_named(session, wanted)
        finally:
            session.close()
        for entry in matches:
            if wanted in (entry["name"], entry["id"]):
                return AgentInfo(
                    id=entry["id"], name=entry["name"],
                    fingerprint=entry["key_fingerprint"], online=bool(entry["online"]),
                )
        return None

    def agent_online(self, agent_name: str | None = None) -> bool:
        """Whether the rendezvous currently sees the agent's control channel."""
        try:
            agent = self.find_agent(agent_name)
        except (ApiError, OSError):
            return False
        return agent is not None and agent.online

    def wait_agent_online(
        self, agent_name: str | None = None, timeout: float = ONLINE_TIMEOUT_SECONDS
    ) -> AgentInfo:
        """Poll the agent list until the agent is online; LocalStackError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                agent = self.find_agent(agent_name)
            except Exception:  # noqa: BLE001 - the rendezvous may be restarting; retry until the deadline
                agent = None
            if agent is not None and agent.online:
                if agent_name is None or agent_name == self.agent_name:
                    self.agent = agent
                return agent
            exited = [p for p in self.processes.values() if p.name.startswith("agent")]
            for process in exited:
                if not process.is_running():
                    raise LocalStackError(
                        f"the agent daemon exited with status {process.popen.returncode}:\n"
                        f"{process.log_text()}"
                    )
            if time.monotonic() > deadline:
                raise LocalStackError(
                    f"agent {agent_name or self.agent_name!r} did not come online within "
                    f"{timeout:.0f}s"
                )
            time.sleep(POLL_INTERVAL_SECONDS * 4)

    # ---- processes ---------------------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("TUCDESK_HOME", None)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.extra_env)
        return env

    def _spawn(self, name: str, command: list[str]) -> ManagedProcess:
        old = self.processes.get(name)
        if old is not None and old.is_running():
            raise LocalStackError(f"{name} is already running (pid {old.pid})")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        log: IO[bytes]
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._child_env(),
                cwd=self.base_dir,
                start_new_session=True,
            )
        process = ManagedProcess(name, popen, log_path, offset)
        self.processes[name] = process
        return process

    def _stop(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            process.stop()

    def _kill(self, name: str) -> None:
        process = self.processes.pop(name, None)
        if process is not None:
            process.kill()

    def _wait_for_listening(
        self, process: ManagedProcess, pattern: re.Pattern[bytes]
    ) -> tuple[str, int]:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while True:
            try:
                with process.log_path.open("rb") as handle:
                    handle.seek(process.log_offset)
                    match = pattern.search(handle.read())
            except OSError:
                match = None
            if match is not None:
                return match.group(1).decode(), int(match.group(2))
            if not process.is_running():
                raise LocalStackError(
                    f"{process.name} exited with status {process.popen.returncode} while "
                    f"starting:\n{process.log_text()}"
                )
            if time.monotonic() > deadline:
                process.kill()
                raise LocalStackError(
                    f"{process.name} did not start listening within {START_TIMEOUT_SECONDS:.0f}s"
                )
            time.sleep(POLL_INTERVAL_SECONDS)

    def _wait_healthy(self, process: ManagedProcess, url: str) -> None:
        from operator_cli.client import open_http
        from operator_cli.home import Settings
        from operator_cli.http import HttpError

        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        with open_http(Settings(server=url, ca_file=str(self.ca_file))) as http:
            while True:
                try:
                    if http.get("/healthz").is_success:
                        return
                except HttpError:
                    pass
                if not process.is_running() or time.monotonic() > deadline:
                    raise LocalStackError(
                        f"{process.name} at {url} is not answering /healthz:\n{process.log_text()}"
                    )
                time.sleep(POLL_INTERVAL_SECONDS)

    def _run_checked(self, command: list[str], what: str) -> str:
        try:
            completed = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=COMMAND_TIMEOUT_SECONDS,
                env=self._child_env(),
                cwd=self.base_dir,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise LocalStackError(
                f"{what} did not finish within {COMMAND_TIMEOUT_SECONDS:.0f}s"
            ) from None
        if completed.returncode != 0:
            detail = (completed.stderr or completed.stdout).decode("utf-8", "replace").strip()
            raise LocalStackError(f"{what} failed (exit {completed.returncode}): {detail}")
        return completed.stdout.decode("utf-8", "replace")
