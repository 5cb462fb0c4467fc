"""The `tucdesk` account commands without a server: home layout, errors, secrets on disk."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from operator_cli.home import CliHome, HomeError, Settings, default_home
from operator_cli.main import API_KEY_SCOPES, main, parse_duration
from protocol.errors import KeyFileError
from rendezvous.auth import API_KEY_SCOPES as SERVICE_API_KEY_SCOPES


def test_home_comes_from_environment_then_xdg_then_the_default(tmp_path: Path) -> None:
    assert default_home({"TUCDESK_HOME": str(tmp_path)}) == tmp_path
    assert default_home({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "tucdesk"
    assert default_home({}) == Path.home() / ".config" / "tucdesk"


def test_operator_key_and_token_are_private_files(tmp_path: Path) -> None:
    home = CliHome(tmp_path / "home")
    identity = home.create_key()
    home.save_token({"access_token": "t", "expires_at": 1})
    assert (tmp_path / "home").stat().st_mode & 0o777 == 0o700
    assert home.key_path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "home" / "token.json").stat().st_mode & 0o777 == 0o600
    assert home.load_key().public == identity.public  # type: ignore[union-attr]


def test_group_readable_token_file_is_refused(tmp_path: Path) -> None:
    home = CliHome(tmp_path)
    home.save_token({"access_token": "t", "expires_at": 1})
    (tmp_path / "token.json").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        home.load_token()


def test_damaged_settings_file_is_reported_clearly(tmp_path: Path) -> None:
    home = CliHome(tmp_path)
    home.save_settings(Settings(server="https://example.test"))
    (tmp_path / "settings.json").write_text("{not json")
    with pytest.raises(HomeError, match="damaged"):
        home.load_settings()


@pytest.mark.parametrize(("text", "seconds"), [("45", 45), ("10m", 600), ("1h", 3600)])
def test_ttl_durations_parse(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5m", "1y"])
def test_malformed_ttl_is_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_commands_before_login_say_how_to_log_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--home", str(tmp_path), "agents"]) == 1
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1
    assert "tucdesk login" in error[0]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_unreachable_server_is_one_line_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["--home", str(tmp_path), "login", "--server", url, "--invite", "inv_x"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert f"cannot reach {url}: connection refused" in error
    assert "Traceback" not in error


def test_debug_flag_shows_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    arguments = ["--debug", "--home", str(tmp_path), "login", "--server", url, "--invite", "x"]
    assert main(arguments) == 1
    assert "Traceback" in capsys.readouterr().err


def test_server_url_must_be_http_or_https(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--home", str(tmp_path), "login", "--server", "ftp://x", "--invite", "i"]) == 1
    assert "https://" in capsys.readouterr().err


# What only `connect`, `exec` and the policy/approval/demo commands need, and what it would cost
# every other command's start-up to load (trio alone is ~0.1 s here).
_SESSION_ONLY_MODULES = (
    "trio", "operator_cli.session_commands", "operator_cli.session_client",
    "operator_cli.policy_commands", "operator_cli.approval_commands", "operator_cli.demo",
)


@pytest.mark.parametrize("argv", [["--help"], ["agents", "--help"], ["whoami"]])
def test_commands_that_open_no_session_do_not_load_the_session_stack(
    tmp_path: Path, argv: list[str]
) -> None:
    probe = (
        "import sys\n"
        "from operator_cli.main import main\n"
        "try:\n"
        f"    main({['--home', str(tmp_path / 'home'), *argv]!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(set({_SESSION_ONLY_MODULES!r}) & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.splitlines()[-1] == "[]", result.stdout + result.stderr


def test_api_key_scopes_in_help_are_the_services() -> None:
    assert sorted(API_KEY_SCOPES) == sorted(str(scope) for scope in SERVICE_API_KEY_SCOPES)
