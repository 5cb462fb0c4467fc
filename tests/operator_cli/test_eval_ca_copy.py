"""Login keeps a copy of the CA certificates in the CLI home: moving the file given with
--ca-file afterwards breaks nothing; settings saved before (a path) keep working."""

from __future__ import annotations

import json
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from operator_cli.home import CliHome, HomeError, read_ca_certificates
from operator_cli.local_stack import LocalStack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("ca-copy")) as started:
        started.create_certificates()
        started.init_rendezvous()
        started.start_relay()
        started.start_rendezvous()
        started.create_operator()
        yield started


def test_moving_the_ca_file_after_login_breaks_nothing(stack: LocalStack, tmp_path: Path) -> None:
    home = tmp_path / "cli"
    shutil.copytree(stack.cli_home, home)
    given = tmp_path / "tls" / "ca.pem"
    given.parent.mkdir()
    shutil.copyfile(stack.ca_file, given)
    logged_in = stack.run_tucdesk("login", "--server", stack.server_url, "--ca-file", str(given),
                                  home=home)
    assert logged_in.returncode == 0, logged_in.stderr
    copy = home / "ca.pem"
    assert copy.read_bytes() == stack.ca_file.read_bytes()
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    # Relative to the home, so the home still works once moved or mounted elsewhere.
    assert json.loads((home / "settings.json").read_text())["ca_file"] == "ca.pem"

    given.rename(tmp_path / "moved.pem")
    completed = stack.run_tucdesk("whoami", home=home)
    assert completed.returncode == 0, completed.stderr


def test_settings_saved_with_a_path_keep_working(stack: LocalStack, tmp_path: Path) -> None:
    home = tmp_path / "cli"
    shutil.copytree(stack.cli_home, home)
    (home / "ca.pem").unlink(missing_ok=True)
    saved = json.loads((home / "settings.json").read_text())
    saved["ca_file"] = str(stack.ca_file)
    (home / "settings.json").write_text(json.dumps(saved))
    completed = stack.run_tucdesk("whoami", home=home)
    assert completed.returncode == 0, completed.stderr


def test_a_ca_file_without_certificates_is_refused_at_login_and_nothing_is_saved(
    stack: LocalStack, tmp_path: Path
) -> None:
    home = tmp_path / "cli"
    shutil.copytree(stack.cli_home, home)
    before = (home / "settings.json").read_bytes()
    key_only = tmp_path / "key.pem"
    key_only.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    refused = stack.run_tucdesk("login", "--server", stack.server_url, "--ca-file",
                                str(key_only), home=home)
    assert refused.returncode == 1
    assert f"cannot use the CA file {key_only} (--ca-file)" in refused.stderr.decode()
    assert (home / "settings.json").read_bytes() == before


def test_read_ca_certificates_refuses_what_is_not_pem_certificates(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"not a certificate")
    with pytest.raises(HomeError, match="no PEM certificates"):
        read_ca_certificates(str(garbage))
    with pytest.raises(HomeError, match="No such file"):
        read_ca_certificates(str(tmp_path / "missing.pem"))
    assert CliHome(tmp_path).ca_copy_path == tmp_path / "ca.pem"
