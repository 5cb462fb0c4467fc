"""`tucdesk-rendezvous` as a self-hoster runs it: the wrong store, config placement, bad URLs."""

from __future__ import annotations

import importlib.metadata
import logging
import socket
from pathlib import Path

import pytest

from rendezvous.config import DATABASE_FILE_NAME, ServiceConfig
from rendezvous.main import log_start, main


@pytest.mark.parametrize(
    "command",
    [
        ["team", "create", "ops"],
        ["team", "list"],
        ["invite", "create", "--team", "ops", "--email", "a@b.test", "--role", "admin"],
        ["keys", "show"],
        ["serve", "--insecure-http", "--listen", "127.0.0.1:0"],
    ],
)
def test_commands_other_than_init_refuse_a_missing_store_instead_of_creating_one(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "wrong-data-dir"
    assert main([*command, "--data-dir", str(data)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert f"no rendezvous store at {(data / DATABASE_FILE_NAME).resolve()}" in error
    assert "tucdesk-rendezvous init" in error and "--config" in error
    assert not (data / DATABASE_FILE_NAME).exists()


def test_config_is_accepted_before_the_command_as_the_unit_file_documents(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    config = tmp_path / "rendezvous.toml"
    config.write_text(f'[rendezvous]\ndata_dir = "{data}"\n')
    assert main(["--config", str(config), "init"]) == 0
    assert (data / DATABASE_FILE_NAME).exists()
    assert main(["--config", str(config), "team", "create", "ops"]) == 0
    capsys.readouterr()
    assert main(["team", "list", "--config", str(config)]) == 0
    assert "\tops" in capsys.readouterr().out


@pytest.mark.parametrize("separator", ["/", "#", "?"])
def test_unencoded_special_character_in_the_database_password_is_named_without_the_password(
    separator: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    database = f"postgresql://tucdesk:Secret1{separator}Secret2@127.0.0.1:5432/tucdesk"
    assert main(["init", "--data-dir", str(tmp_path / "data"), "--database", database]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert "the database URL could not be parsed" in error
    assert "URL-encode special characters in the password" in error
    assert "Secret1" not in error and "Secret2" not in error


def test_serve_on_a_port_in_use_names_the_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--data-dir", str(tmp_path / "data")]
    assert main(["init", *store]) == 0
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        port = occupant.getsockname()[1]
        capsys.readouterr()
        arguments = ["serve", *store, "--insecure-http", "--listen", f"127.0.0.1:{port}"]
        assert main(arguments) == 1
    error = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in error


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    version = importlib.metadata.version("tucdesk")
    assert capsys.readouterr().out.strip() == f"tucdesk-rendezvous {version}"


def test_start_line_names_version_store_and_relays_without_the_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tucdesk.rendezvous")
    config = ServiceConfig(
        data_dir=tmp_path, database="postgresql://tucdesk:Secret1@db.internal:6432/tucdesk",
        listen="0.0.0.0:8443", relays=("relay-1=relay.example.com:7443",),
    )
    log_start(config)
    version = importlib.metadata.version("tucdesk")
    assert (
        f"tucdesk-rendezvous {version} starting: store PostgreSQL db.internal:6432/tucdesk, "
        f"data dir {tmp_path.resolve()}, listening on http://0.0.0.0:8443, 1 worker(s), "
        "relays: relay-1=relay.example.com:7443"
    ) in caplog.text
    assert "Secret1" not in caplog.text and "no relay" not in caplog.text

    caplog.clear()
    log_start(ServiceConfig(data_dir=tmp_path))
    assert f"store SQLite {(tmp_path / DATABASE_FILE_NAME).resolve()}" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("no relay is configured" in message for message in warnings)


@pytest.mark.parametrize(
    "database",
    [
        "postgresql://tucdesk:/SECRETpart@127.0.0.1:1/db",
        "postgresql://tucdesk:12/SECRETpart@127.0.0.1:1/db",
        "postgresql://tucdesk:12?SECRETpart@127.0.0.1:1/db",
        "postgresql://tucdesk:a@SECRETpart@127.0.0.1:1/db",
    ],
)
def test_serve_never_logs_a_password_that_urlsplit_cuts_short(
    database: str, tmp_path: Path, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.DEBUG)
    arguments = ["serve", "--data-dir", str(tmp_path), "--database", database]
    assert main([*arguments, "--insecure-http", "--listen", "127.0.0.1:0"]) == 1
    log_start(ServiceConfig(data_dir=tmp_path, database=database))
    assert "store PostgreSQL (URL not shown)" in caplog.text
    lines = [record.getMessage() for record in caplog.records]
    assert lines and not any("SECRET" in line for line in lines)
    assert "SECRET" not in capsys.readouterr().err
