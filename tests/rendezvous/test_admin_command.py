"""`tucdesk-rendezvous` admin commands on a data dir: init, team, invite, keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rendezvous.main import main
from rendezvous.service_keys import KEY_ROLES, key_path


def _store(tmp_path: Path) -> list[str]:
    return ["--data-dir", str(tmp_path / "data")]


def test_init_creates_private_service_keys_and_is_safe_to_rerun(tmp_path: Path) -> None:
    assert main(["init", *_store(tmp_path)]) == 0
    first = {role: key_path(tmp_path / "data", role).read_bytes() for role in KEY_ROLES}
    assert main(["init", *_store(tmp_path)]) == 0
    for role in KEY_ROLES:
        path = key_path(tmp_path / "data", role)
        assert path.stat().st_mode & 0o777 == 0o600
        assert path.read_bytes() == first[role]
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700


def test_invite_code_is_printed_on_the_last_line_and_stored_hashed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["init", *_store(tmp_path)])
    main(["team", "create", "ops", *_store(tmp_path)])
    capsys.readouterr()
    arguments = ["invite", "create", "--team", "ops", "--email", "a@b.test", "--role", "auditor"]
    assert main([*arguments, *_store(tmp_path)]) == 0
    code = capsys.readouterr().out.strip().splitlines()[-1]
    assert code.startswith("inv_")
    assert code.encode() not in (tmp_path / "data" / "rendezvous.db").read_bytes()


def test_invite_for_an_unknown_team_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["init", *_store(tmp_path)])
    capsys.readouterr()
    arguments = ["invite", "create", "--team", "nope", "--email", "a@b.test", "--role", "admin"]
    assert main([*arguments, *_store(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "team create" in error


def test_duplicate_team_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["init", *_store(tmp_path)])
    assert main(["team", "create", "ops", *_store(tmp_path)]) == 0
    assert main(["team", "create", "ops", *_store(tmp_path)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_keys_show_prints_the_public_jwk_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["init", *_store(tmp_path)])
    capsys.readouterr()
    assert main(["keys", "show", *_store(tmp_path)]) == 0
    output = capsys.readouterr().out
    jwks = json.loads(output[output.index("{"):])
    assert {key["purpose"] for key in jwks["keys"]} == set(KEY_ROLES)
    assert all("d" not in key for key in jwks["keys"])


def test_serve_refuses_plain_http_off_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["init", *_store(tmp_path)])
    arguments = ["serve", *_store(tmp_path), "--listen", "0.0.0.0:8443", "--insecure-http"]
    assert main(arguments) == 1
    assert "loopback" in capsys.readouterr().err


def test_serve_without_tls_or_explicit_flag_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main(["init", *_store(tmp_path)])
    assert main(["serve", *_store(tmp_path), "--listen", "127.0.0.1:8443"]) == 1
    assert "--tls-cert" in capsys.readouterr().err


def test_service_log_and_team_logs_export_as_verifiable_bundles(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from audit.main import main as audit_main

    main(["init", *_store(tmp_path)])
    main(["team", "create", "ops", *_store(tmp_path)])
    arguments = ["invite", "create", "--team", "ops", "--email", "a@b.test", "--role", "admin"]
    main([*arguments, *_store(tmp_path)])
    key = tmp_path / "audit.pem"
    capsys.readouterr()
    main(["keys", "show", "--pem", "audit-signer", *_store(tmp_path)])
    key.write_text(capsys.readouterr().out)
    team_bundle, service_bundle = tmp_path / "team.jsonl", tmp_path / "service.jsonl"
    export = ["audit", "export", *_store(tmp_path), "-o"]
    assert main([*export, str(team_bundle), "--team", "ops"]) == 0
    assert main([*export, str(service_bundle), "--service"]) == 0
    assert audit_main(["verify", str(team_bundle), "--key", str(key)]) == 0
    assert audit_main(["verify", str(service_bundle), "--key", str(key)]) == 0
    assert "operator.invite_created" in team_bundle.read_text()


def test_commands_on_an_uninitialised_data_dir_say_to_run_init(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "show", *_store(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "tucdesk-rendezvous init" in error
