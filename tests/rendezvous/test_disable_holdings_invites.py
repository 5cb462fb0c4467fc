"""`tucdesk-rendezvous invite create` keeps one email to one role in a team (both backends).

An email an enabled operator or a pending invite of the team holds (ignoring case) is refused,
naming the holder; the same role again only with --another-key; a disabled operator's email is
free again.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from protocol.identity import SigningIdentity
from rendezvous.credentials import hash_secret
from rendezvous.main import main
from rendezvous.store import open_store


def _invite(store: list[str], email: str, role: str, *extra: str) -> int:
    return main(["invite", "create", "--team", "alpha", "--email", email, "--role", role,
                 *extra, *store])  # fmt: skip


def _enroll(database_url: str, code: str) -> tuple[str, str]:
    async def enroll() -> tuple[str, str]:
        async with open_store(database_url) as store:
            identity = SigningIdentity.generate()
            operator, _ = await store.enroll_operator(
                hash_secret(code), time.time(), identity.public.raw, identity.public.key_id
            )
            return operator.team_id, operator.id

    return trio.run(enroll)


def _disable(database_url: str, team_id: str, operator_id: str) -> None:
    async def disable() -> None:
        async with open_store(database_url) as store:
            await store.disable_operator(team_id, operator_id, time.time())

    trio.run(disable)


def test_an_email_holding_a_role_is_not_invited_again_under_any_spelling(
    database_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--data-dir", str(tmp_path / "data"), "--database", database_url]
    assert main(["init", *store]) == 0
    assert main(["team", "create", "alpha", *store]) == 0
    assert _invite(store, "alice@alpha.test", "admin") == 0
    code = capsys.readouterr().out.strip().splitlines()[-1]

    # A pending invite holds the email.
    assert _invite(store, "ALICE@Alpha.Test", "approver") == 1
    error = capsys.readouterr().err
    assert "pending invite" in error and "admin" in error and error.count("\n") == 1

    team_id, alice_id = _enroll(database_url, code)
    # An enabled operator holds it: another role is refused even with the flag.
    for extra in ((), ("--another-key",)):
        assert _invite(store, "alice@alpha.test", "approver", *extra) == 1
        error = capsys.readouterr().err
        assert alice_id in error and "one role" in error, error
    # The same role again only when asked for explicitly (a second key for one person).
    assert _invite(store, "Alice@alpha.test", "admin") == 1
    assert "--another-key" in capsys.readouterr().err
    assert _invite(store, "Alice@alpha.test", "admin", "--another-key") == 0
    capsys.readouterr()

    # A disabled operator no longer holds the email: it may come back in another role.
    assert _invite(store, "carol@alpha.test", "operator") == 0
    _, carol_id = _enroll(database_url, capsys.readouterr().out.strip().splitlines()[-1])
    assert _invite(store, "carol@alpha.test", "approver") == 1
    _disable(database_url, team_id, carol_id)
    assert _invite(store, "Carol@alpha.test", "approver") == 0
