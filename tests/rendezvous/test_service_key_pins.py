"""The first init pins the service keys in the database; other keys are refused by name."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from rendezvous.config import ServiceConfig
from rendezvous.main import main
from rendezvous.server import run_service
from rendezvous.service_keys import (
    KEY_ROLES,
    ServiceKeyMismatch,
    create_missing_keys,
    key_path,
    load_service_keys,
)


def _fingerprint(data_dir: Path, role: str = "audit-signer") -> str:
    return load_service_keys(data_dir).by_role()[role].public.fingerprint


def test_init_with_an_empty_data_dir_against_an_initialised_database_creates_no_keys(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["init", "--data-dir", str(first), "--database", database_url]) == 0
    capsys.readouterr()
    assert main(["init", "--data-dir", str(second), "--database", database_url]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "was initialised with" in error and _fingerprint(first) in error
    assert "copy" in error and "first instance" in error
    assert not any(key_path(second, role).exists() for role in KEY_ROLES)
    # The keys copied from the first instance are accepted.
    (first / "keys").rename(second / "keys")
    assert main(["init", "--data-dir", str(second), "--database", database_url]) == 0


def test_other_keys_are_refused_by_init_admin_commands_and_serve(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first, other = tmp_path / "first", tmp_path / "other"
    assert main(["init", "--data-dir", str(first), "--database", database_url]) == 0
    first_store = ["--data-dir", str(first), "--database", database_url]
    assert main(["team", "create", "ops", *first_store]) == 0
    create_missing_keys(other)  # another instance's keys, e.g. made by an older init
    capsys.readouterr()
    store = ["--data-dir", str(other), "--database", database_url]
    invite = ["invite", "create", "--team", "ops", "--email", "a@b.test", "--role", "admin"]
    for command in (["init"], invite, ["audit", "export", "--team", "ops", "-o",
                                       str(tmp_path / "bundle")]):
        assert main([*command, *store]) == 1, command
        error = capsys.readouterr().err
        expected = (
            f"was initialised with audit-signer key {_fingerprint(first)} but "
            f"{key_path(other, 'audit-signer')} holds {_fingerprint(other)}"
        )
        assert expected in error, (command, error)

    config = ServiceConfig(
        data_dir=other, database=database_url, listen="127.0.0.1:0", insecure_http=True
    )
    with pytest.raises(ServiceKeyMismatch, match="copy .* from the first instance"):
        trio.run(run_service, config)
