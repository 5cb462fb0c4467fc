"""`tucdesk-rendezvous audit export` (host admin) is itself audited, as the HTTP export is: who
read a team's log is part of that log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from audit.main import main as audit_main
from rendezvous.main import main


def _store(tmp_path: Path) -> list[str]:
    return ["--data-dir", str(tmp_path / "data")]


def _exported_records(bundle: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in bundle.read_text().splitlines()[1:-1]]


def test_the_admin_export_appends_an_audit_exported_record_it_then_holds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", *_store(tmp_path)]) == 0
    assert main(["team", "create", "ops", *_store(tmp_path)]) == 0
    capsys.readouterr()
    main(["keys", "show", "--pem", "audit-signer", *_store(tmp_path)])
    key = tmp_path / "audit.pem"
    key.write_text(capsys.readouterr().out)
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    export = ["audit", "export", "--team", "ops", *_store(tmp_path), "-o"]
    assert main([*export, str(first)]) == 0
    assert main([*export, str(second)]) == 0
    records = _exported_records(second)
    exports = [record for record in records if record["event"]["action"] == "audit.exported"]  # type: ignore[index]
    assert len(exports) == 2  # one per export, each in the bundle it announces
    assert _exported_records(first)[-1]["event"] == exports[0]["event"]
    event = exports[1]["event"]
    assert event["actor"] == {"display": "admin command", "id": "tucdesk-rendezvous",  # type: ignore[index]
                              "kind": "service"}  # fmt: skip
    assert event["target"].startswith("team:")  # type: ignore[index]
    assert audit_main(["verify", str(second), "--key", str(key)]) == 0


def test_the_service_log_export_is_audited_in_the_service_log(tmp_path: Path) -> None:
    assert main(["init", *_store(tmp_path)]) == 0
    bundle = tmp_path / "service.jsonl"
    assert main(["audit", "export", "--service", *_store(tmp_path), "-o", str(bundle)]) == 0
    [record] = _exported_records(bundle)
    assert record["event"]["action"] == "audit.exported"  # type: ignore[index]
    assert record["event"]["target"] == "team:_service"  # type: ignore[index]
