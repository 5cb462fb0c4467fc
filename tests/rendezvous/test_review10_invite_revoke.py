"""`tucdesk-rendezvous invite revoke` records first, then revokes; a revoke that loses to a
login says so and names the operator who enrolled; `invite list` shows a revoked invite as
revoked."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from rendezvous.audit_trail import AuditTrail
from rendezvous.errors import ServiceUnavailable
from rendezvous.main import main
from rendezvous.store.sql_store import SqlStore
from tests.rendezvous.test_invite_admin_commands import _invite, _store


@pytest.fixture
def team(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["init", *_store(tmp_path)])
    main(["team", "create", "ops", *_store(tmp_path)])
    capsys.readouterr()


def _export(tmp_path: Path) -> str:
    bundle = tmp_path / "ops.json"
    assert main(["audit", "export", "--team", "ops", "--output", str(bundle),
                 *_store(tmp_path)]) == 0  # fmt: skip
    return bundle.read_text()


@pytest.mark.usefixtures("team")
def test_a_revoke_whose_record_fails_leaves_the_invite_usable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    invite_id, _ = _invite(tmp_path, capsys, "ops", "ada@example.com")
    original = AuditTrail.record

    async def failing(self: AuditTrail, team_id: str, **fields: Any) -> None:
        if fields["action"].value == "operator.invite_revoked":
            raise ServiceUnavailable("the audit log is unavailable (test)")
        await original(self, team_id, **fields)

    monkeypatch.setattr(AuditTrail, "record", failing)
    assert main(["invite", "revoke", "--team", "ops", invite_id, *_store(tmp_path)]) == 1
    capsys.readouterr()
    assert main(["invite", "list", "--team", "ops", *_store(tmp_path)]) == 0
    assert f"{invite_id}\tada@example.com\toperator\tpending until" in capsys.readouterr().out


@pytest.mark.usefixtures("team")
def test_a_revoke_that_loses_to_a_login_says_so_and_names_the_operator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    invite_id, code = _invite(tmp_path, capsys, "ops", "ada@example.com")
    original = SqlStore.revoke_invite
    enrolled: list[str] = []

    async def login_first(self: SqlStore, team_id: str, wanted: str, now: float) -> Any:
        # The login commits between the revoke's check (and record) and its update.
        raw = os.urandom(32)
        operator, _ = await self.enroll_operator(
            hashlib.sha256(code.encode()).digest(), now, raw, "jkt-" + raw.hex()[:20]
        )
        enrolled.append(operator.id)
        return await original(self, team_id, wanted, now)

    monkeypatch.setattr(SqlStore, "revoke_invite", login_first)
    assert main(["invite", "revoke", "--team", "ops", invite_id, *_store(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"invite {invite_id} was used at" in err
    assert f"by operator {enrolled[0]} (ada@example.com)" in err
    assert "the revoke is recorded but stopped nothing" in err
    assert f"operator disable --team ops {enrolled[0]}" in err
    assert "operator.invite_revoked" in _export(tmp_path)


@pytest.mark.usefixtures("team")
def test_a_revoked_invite_is_listed_as_revoked_not_expired_in_1970(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    invite_id, _ = _invite(tmp_path, capsys, "ops", "ada@example.com")
    assert main(["invite", "revoke", "--team", "ops", invite_id, *_store(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["invite", "list", "--team", "ops", "--all", *_store(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert f"{invite_id}\tada@example.com\toperator\trevoked\n" in listed
    assert "1970" not in listed
    assert main(["invite", "revoke", "--team", "ops", invite_id, *_store(tmp_path)]) == 1
    assert "is already revoked: nothing to revoke" in capsys.readouterr().err
