"""`tucdesk-rendezvous invite list` and `invite revoke`: what a server admin does with a code
sent to the wrong address or one that leaked."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
import trio

from rendezvous.main import main
from rendezvous.store import InviteUnusable, UnusableReason, open_store


def _store(tmp_path: Path) -> list[str]:
    return ["--data-dir", str(tmp_path / "data")]


def _invite(tmp_path: Path, capsys: pytest.CaptureFixture[str], team: str, email: str) -> tuple[
    str, str
]:
    """Create an invite; return (invite id, code)."""
    arguments = ["invite", "create", "--team", team, "--email", email, "--role", "operator"]
    assert main([*arguments, *_store(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    invite_id = lines[0].split()[2]
    assert invite_id.startswith("inv_")
    return invite_id, lines[-1]


def _enroll(tmp_path: Path, code: str) -> None:
    """Log in with the code the way the service does (its hash against the store)."""

    async def attempt() -> None:
        async with open_store(f"sqlite:///{tmp_path / 'data' / 'rendezvous.db'}") as store:
            raw = os.urandom(32)
            await store.enroll_operator(
                hashlib.sha256(code.encode()).digest(), time.time(), raw, "jkt-" + raw.hex()[:20]
            )

    trio.run(attempt)


@pytest.fixture
def teams(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["init", *_store(tmp_path)])
    main(["team", "create", "ops", *_store(tmp_path)])
    main(["team", "create", "dev", *_store(tmp_path)])
    capsys.readouterr()


@pytest.mark.usefixtures("teams")
def test_revoke_makes_the_code_unusable_lists_it_revoked_and_is_audited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    invite_id, code = _invite(tmp_path, capsys, "ops", "ada@example.com")
    assert main(["invite", "list", "--team", "ops", *_store(tmp_path)]) == 0
    listed = capsys.readouterr().out
    assert invite_id in listed and "ada@example.com" in listed and "pending until" in listed
    assert code not in listed

    assert main(["invite", "revoke", "--team", "ops", invite_id, *_store(tmp_path)]) == 0
    assert f"revoked invite {invite_id} for ada@example.com" in capsys.readouterr().out
    assert main(["invite", "list", "--team", "ops", *_store(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "no pending invites"
    assert main(["invite", "list", "--team", "ops", "--all", *_store(tmp_path)]) == 0
    assert f"{invite_id}\tada@example.com\toperator\trevoked\n" in capsys.readouterr().out
    with pytest.raises(InviteUnusable) as refused:
        _enroll(tmp_path, code)
    assert refused.value.reason is UnusableReason.REVOKED

    bundle = tmp_path / "ops.json"
    assert main(["audit", "export", "--team", "ops", "--output", str(bundle),
                 *_store(tmp_path)]) == 0  # fmt: skip
    exported = bundle.read_text()
    assert "operator.invite_revoked" in exported and f"invite:{invite_id}" in exported


@pytest.mark.usefixtures("teams")
def test_revoke_refuses_another_teams_invite_an_unknown_one_and_a_used_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    invite_id, code = _invite(tmp_path, capsys, "ops", "ada@example.com")
    assert main(["invite", "revoke", "--team", "dev", invite_id, *_store(tmp_path)]) == 1
    assert f"team dev has no invite '{invite_id}'" in capsys.readouterr().err
    assert main(["invite", "revoke", "--team", "ops", "inv_nope", *_store(tmp_path)]) == 1
    assert "has no invite 'inv_nope'" in capsys.readouterr().err
    _enroll(tmp_path, code)  # the other team's attempt left it usable
    assert main(["invite", "revoke", "--team", "ops", invite_id, *_store(tmp_path)]) == 1
    assert "is already used: nothing to revoke" in capsys.readouterr().err
    assert main(["invite", "list", "--team", "ops", "--all", *_store(tmp_path)]) == 0
    assert "used " in capsys.readouterr().out


@pytest.mark.usefixtures("teams")
def test_a_duplicate_invite_points_at_revoke(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    invite_id, _ = _invite(tmp_path, capsys, "ops", "ada@example.com")
    arguments = ["invite", "create", "--team", "ops", "--email", "ADA@example.com", "--role",
                 "admin", *_store(tmp_path)]  # fmt: skip
    assert main(arguments) == 1
    assert f"invite revoke --team TEAM {invite_id}" in capsys.readouterr().err


@pytest.mark.usefixtures("teams")
def test_operator_disable_by_email_picks_the_one_active_holder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Disabled and invited again: the email has two operators, one of them active.
    _, code = _invite(tmp_path, capsys, "ops", "ada@example.com")
    _enroll(tmp_path, code)
    assert main(["operator", "disable", "--team", "ops", "ada@example.com", *_store(tmp_path)]) == 0
    capsys.readouterr()
    _, code = _invite(tmp_path, capsys, "ops", "ada@example.com")
    _enroll(tmp_path, code)
    assert main(["operator", "disable", "--team", "ops", "ada@example.com", *_store(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["operator", "list", "--team", "ops", *_store(tmp_path)]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if "ada@example.com" in line]
    assert len(listed) == 2 and all("disabled" in line for line in listed), listed
