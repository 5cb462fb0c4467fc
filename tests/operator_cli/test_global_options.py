"""`tucdesk --server` and `--ca-file` before any command, `--version`, and `exec` with no
command: what an ssh/tsh user expects, against a real rendezvous where it matters."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from operator_cli.home import CliHome, HomeError, Settings, server_key
from operator_cli.local_ca import create_local_certificates
from operator_cli.local_stack import LocalStack
from operator_cli.main import main

EXIT_FAILURE = 1
EXIT_CONNECTION_FAILED = 255


class CountingListener:
    """A TCP listener on 127.0.0.1 that counts (and drops) every connection made to it."""

    def __init__(self) -> None:
        self.socket = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.socket.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self.socket.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("global-options")) as started:
        started.create_certificates()
        started.init_rendezvous()
        started.start_relay()
        started.start_rendezvous()
        started.create_operator()
        yield started


def home_copy(stack: LocalStack, tmp_path: Path, **settings: str) -> Path:
    home = tmp_path / "cli"
    shutil.copytree(stack.cli_home, home)
    saved = json.loads((home / "settings.json").read_text())
    saved.update(settings)
    (home / "settings.json").write_text(json.dumps(saved))
    return home


def stderr_lines(completed: subprocess.CompletedProcess[bytes]) -> list[str]:
    return completed.stderr.decode().strip().splitlines()


@pytest.mark.slow
def test_a_server_other_than_the_logged_in_one_is_refused_and_nothing_is_sent(
    stack: LocalStack, tmp_path: Path
) -> None:
    other = CountingListener()
    try:
        url = f"https://127.0.0.1:{other.port}"
        keys_before = stack.run_tucdesk("keys", "list").stdout
        created = stack.run_tucdesk("--server", url, "keys", "create", "--tags", "staging")
        listed = stack.run_tucdesk("--server", url, "agents")
    finally:
        other.close()
    expected = (
        f"tucdesk: you are logged in to {stack.server_url}; to use {url} run "
        f"'tucdesk login --server {url}' (or use another --home)"
    )
    for completed in (created, listed):
        assert (completed.returncode, stderr_lines(completed)) == (EXIT_FAILURE, [expected])
    assert other.connections == 0  # the token never went to a server that did not issue it
    # ... and the command did not act on the saved server instead.
    assert stack.run_tucdesk("keys", "list").stdout == keys_before


@pytest.mark.slow
def test_the_logged_in_server_named_again_is_used(stack: LocalStack) -> None:
    same = stack.server_url.upper().replace("HTTPS://", "https://") + "/"
    completed = stack.run_tucdesk("--server", same, "whoami")
    assert completed.returncode == 0, completed.stderr
    assert stack.server_url in completed.stdout.decode()


@pytest.mark.slow
def test_ca_file_before_a_command_is_used_for_that_command(
    stack: LocalStack, tmp_path: Path
) -> None:
    wrong = create_local_certificates(tmp_path / "other-ca")
    home = home_copy(stack, tmp_path, ca_file=str(wrong.ca_cert))
    assert stack.run_tucdesk("whoami", home=home).returncode == EXIT_FAILURE
    completed = stack.run_tucdesk("--ca-file", str(stack.ca_file), "whoami", home=home)
    assert completed.returncode == 0, completed.stderr
    # For that command only: the saved settings still name the other CA.
    assert json.loads((home / "settings.json").read_text())["ca_file"] == str(wrong.ca_cert)


def test_an_unreadable_ca_file_before_a_command_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = CliHome(tmp_path)
    home.save_settings(Settings(server="https://127.0.0.1:1"))
    home.create_key()
    missing = tmp_path / "missing-ca.pem"
    assert main(["--home", str(tmp_path), "--ca-file", str(missing), "whoami"]) == EXIT_FAILURE
    [line] = capsys.readouterr().err.strip().splitlines()
    assert str(missing) in line


def test_command_settings_refuse_another_server_and_take_the_ca_file(tmp_path: Path) -> None:
    CliHome(tmp_path).save_settings(Settings(server="https://prod.example:8443", ca_file=None))
    staging = CliHome(tmp_path, server="https://staging.example:8443")
    with pytest.raises(HomeError, match="tucdesk login --server https://staging.example:8443"):
        staging.command_settings()
    with_ca = CliHome(tmp_path, server="HTTPS://Prod.Example:8443/", ca_file="ca.pem")
    assert with_ca.command_settings() == Settings(
        server="https://prod.example:8443", ca_file=str(Path("ca.pem").resolve())
    )


def test_server_key_fills_in_default_ports() -> None:
    assert server_key("https://a.example") == server_key("https://A.example:443/")
    assert server_key("https://a.example") != server_key("https://a.example:8443")
    assert server_key("http://a.example:443") != server_key("https://a.example:443")


@pytest.mark.parametrize("module", ["operator_cli.main", "audit.main"])
def test_version_is_printed_like_the_other_commands(module: str) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", module, "--version"], capture_output=True, text=True, check=False
    )
    program = "tucdesk" if module == "operator_cli.main" else "tucdesk-audit"
    assert completed.returncode == 0
    [line] = completed.stdout.splitlines()
    name, version = line.split(" ", 1)
    assert (name, bool(version.strip())) == (program, True)


@pytest.mark.parametrize("rest", [[], ["--"]])
def test_exec_without_a_command_is_a_usage_error(
    rest: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--home", str(tmp_path), "exec", "vm", *rest])
    err = capsys.readouterr().err
    # 255, not argparse's 2: a session command's usage error must not read as a remote `exit 2`.
    assert stopped.value.code == EXIT_CONNECTION_FAILED
    assert err.startswith("usage: tucdesk exec ")
    assert "tucdesk exec AGENT -- CMD [ARGS...]" in err
