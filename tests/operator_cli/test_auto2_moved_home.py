"""A CLI home keeps working once moved or copied (a CI job builds one, then mounts it
elsewhere): login records the home's own CA copy relative to the home, older settings that
name another home's copy use this home's, and a missing CA is blamed on settings.json."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from operator_cli.home import CliHome
from operator_cli.local_stack import LocalStack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("auto2-home")) as started:
        started.create_certificates()
        started.init_rendezvous()
        started.start_relay()
        started.start_rendezvous()
        started.create_operator()
        yield started


def logged_in_home(stack: LocalStack, home: Path) -> Path:
    """A copy of the stack's CLI home, logged in again with --ca-file (so it keeps a CA copy)."""
    shutil.copytree(stack.cli_home, home)
    logged_in = stack.run_tucdesk("login", "--server", stack.server_url, "--ca-file",
                                  str(stack.ca_file), home=home)
    assert logged_in.returncode == 0, logged_in.stderr
    return home


def test_a_home_moved_after_login_keeps_working(stack: LocalStack, tmp_path: Path) -> None:
    built = logged_in_home(stack, tmp_path / "build-home")
    assert json.loads((built / "settings.json").read_text())["ca_file"] == "ca.pem"
    mounted = built.rename(tmp_path / "mounted-home")
    completed = stack.run_tucdesk("whoami", home=mounted)
    assert completed.returncode == 0, completed.stderr


def test_a_copied_home_uses_its_own_ca_copy_not_the_original_homes(
    stack: LocalStack, tmp_path: Path
) -> None:
    original = logged_in_home(stack, tmp_path / "original")
    copied = tmp_path / "copied"
    shutil.copytree(original, copied)
    settings = CliHome(copied).command_settings()
    assert settings is not None
    assert settings.ca_file == str(copied.absolute() / "ca.pem")


def test_older_settings_naming_another_homes_ca_copy_use_this_homes(
    stack: LocalStack, tmp_path: Path
) -> None:
    built = logged_in_home(stack, tmp_path / "build-home")
    saved = json.loads((built / "settings.json").read_text())
    saved["ca_file"] = str(built / "ca.pem")  # as login wrote it before
    (built / "settings.json").write_text(json.dumps(saved))
    copied = tmp_path / "copied"
    shutil.copytree(built, copied)
    copied_settings = CliHome(copied).command_settings()
    assert copied_settings is not None and copied_settings.ca_file == str(copied / "ca.pem")
    mounted = built.rename(tmp_path / "mounted-home")
    completed = stack.run_tucdesk("whoami", home=mounted)
    assert completed.returncode == 0, completed.stderr


def test_a_missing_saved_ca_file_is_blamed_on_settings_json_not_on_the_flag(
    stack: LocalStack, tmp_path: Path
) -> None:
    home = logged_in_home(stack, tmp_path / "cli")
    (home / "ca.pem").unlink()
    completed = stack.run_tucdesk("whoami", home=home)
    [line] = completed.stderr.decode().strip().splitlines()
    assert completed.returncode == 1
    assert f"saved in {home / 'settings.json'}" in line
    assert "(--ca-file)" not in line
    assert "log in again with --ca-file" in line


def test_a_users_own_ca_file_named_ca_pem_elsewhere_is_used_as_saved(
    stack: LocalStack, tmp_path: Path
) -> None:
    home = logged_in_home(stack, tmp_path / "cli")
    own = tmp_path / "tls" / "ca.pem"  # not in a CLI home: the user's file, kept
    own.parent.mkdir()
    shutil.copyfile(stack.ca_file, own)
    saved = json.loads((home / "settings.json").read_text())
    saved["ca_file"] = str(own)
    (home / "settings.json").write_text(json.dumps(saved))
    settings = CliHome(home).command_settings()
    assert settings is not None and settings.ca_file == str(own)
