"""`tucdesk operators` and `tucdesk operators disable` against a real rendezvous (SQLite and
PostgreSQL): the service runs in the test (Hypercorn on loopback), the CLI in a worker thread.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from operator_cli.home import CliHome
from operator_cli.main import main
from operator_cli.operator_commands import operators_disable
from rendezvous.credentials import hash_secret, new_invite_code
from rendezvous.store import Store, open_store
from tests.rendezvous.conftest import database_url, postgres_cluster  # noqa: F401 - fixtures
from tests.rendezvous.live_server import live_service

pytestmark = pytest.mark.anyio

ADMIN = "admin@example.test"
ALICE = "alice@example.test"
TWIN = "twin@example.test"  # two operators share it
STRANGER = "bob@example.test"  # another team's


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


@dataclass
class Team:
    """CLI homes logged in to the running service, by who they are."""

    admin: Path
    alice: Path
    stranger: Path


async def _invite(store: Store, team_id: str, email: str, role: str) -> str:
    code = new_invite_code()
    now = time.time()
    await store.create_invite(team_id, email, role, hash_secret(code), now + 600, "test", now)
    return code


@pytest.fixture
async def team(
    tmp_path: Path, database_url: str  # noqa: F811 - the fixture: SQLite and PostgreSQL
) -> AsyncIterator[Team]:
    """A team of an admin, alice (operator) and two operators with one email, and another team
    with its own operator; every one of them logged in with its own CLI home."""
    invites: list[tuple[str, str]] = []
    async with open_store(database_url) as store:
        ops = await store.create_team("ops", time.time())
        other = await store.create_team("other", time.time())
        for name, email, role in [("admin", ADMIN, "admin"), ("alice", ALICE, "operator"),
                                  ("twin-1", TWIN, "operator"), ("twin-2", TWIN, "operator")]:
            invites.append((name, await _invite(store, ops.id, email, role)))
        invites.append(("stranger", await _invite(store, other.id, STRANGER, "admin")))
    async with live_service(tmp_path / "data", database_url) as (url, _):
        for name, code in invites:
            login = ["--home", str(tmp_path / name), "login", "--server", url, "--invite", code]
            assert await trio.to_thread.run_sync(main, login) == 0
        yield Team(tmp_path / "admin", tmp_path / "alice", tmp_path / "stranger")


async def _run(home: Path, *arguments: str) -> int:
    exit_code: int = await trio.to_thread.run_sync(main, ["--home", str(home), *arguments])
    return exit_code


async def _listed(home: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    capsys.readouterr()
    assert await _run(home, "operators", "--json") == 0
    listed: list[dict[str, object]] = json.loads(capsys.readouterr().out)
    return listed


async def test_operators_lists_the_team_by_email_with_role_and_state(
    team: Team, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert await _run(team.admin, "operators") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["EMAIL", "ID", "ROLE", "STATE", "CREATED"]
    assert [line.split()[0] for line in lines[1:]] == [ADMIN, ALICE, TWIN, TWIN]
    assert lines[2].split()[2:4] == ["operator", "active"]
    listed = await _listed(team.admin, capsys)
    assert [entry["email"] for entry in listed] == [ADMIN, ALICE, TWIN, TWIN]
    assert all(str(entry["id"]).startswith("op_") for entry in listed)


async def test_disable_by_email_disables_the_operator_and_its_tokens(
    team: Team, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert await _run(team.admin, "operators", "disable", ALICE, "--yes") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"operator {ALICE} (op_")
    assert "  open sessions that will end: 0\n" in out
    assert f"\ndisabled {ALICE} (op_" in out and "open sessions are being ended" in out
    states = {entry["email"]: entry["state"] for entry in await _listed(team.admin, capsys)}
    assert states[ALICE] == "disabled" and states[ADMIN] == "active"
    capsys.readouterr()
    assert await _run(team.alice, "whoami") == 1
    assert "disabled" in capsys.readouterr().err
    # Again: it says so, and still succeeds (any session left open is asked to end again).
    assert await _run(team.admin, "operators", "disable", ALICE, "--yes") == 0
    assert "was already disabled" in capsys.readouterr().out


async def test_an_email_two_operators_share_names_both_ids_and_an_id_disables_one(
    team: Team, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert await _run(team.admin, "operators", "disable", TWIN, "--yes") == 1
    err = capsys.readouterr().err
    assert f"several operators have the email {TWIN!r}" in err and "use the operator id" in err
    twins = [e for e in await _listed(team.admin, capsys) if e["email"] == TWIN]
    assert all(str(twin["id"]) in err for twin in twins)
    assert all(twin["state"] == "active" for twin in twins)
    assert await _run(team.admin, "operators", "disable", str(twins[0]["id"]), "--yes") == 0
    states = {e["id"]: e["state"] for e in await _listed(team.admin, capsys)}
    assert (states[twins[0]["id"]], states[twins[1]["id"]]) == ("disabled", "active")


async def test_another_teams_operator_is_unknown_by_email_and_by_id(
    team: Team, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert await _run(team.admin, "operators", "disable", STRANGER, "--yes") == 1
    assert f"no operator {STRANGER!r} in your team (see tucdesk operators)" in (
        capsys.readouterr().err
    )
    [stranger] = await _listed(team.stranger, capsys)
    capsys.readouterr()
    assert await _run(team.admin, "operators", "disable", str(stranger["id"]), "--yes") == 1
    assert f"no operator {str(stranger['id'])!r}" in capsys.readouterr().err
    assert (await _listed(team.stranger, capsys))[0]["state"] == "active"


async def test_a_non_admin_can_neither_list_nor_disable(
    team: Team, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert await _run(team.alice, "operators") == 1
    assert "the operator role may not do this (operators:write)" in capsys.readouterr().err
    assert await _run(team.alice, "operators", "disable", ADMIN, "--yes") == 1
    assert "may not do this" in capsys.readouterr().err
    assert all(entry["state"] == "active" for entry in await _listed(team.admin, capsys))


async def test_the_last_active_admin_cannot_disable_itself(
    team: Team, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    assert await _run(team.admin, "operators", "disable", ADMIN, "--yes") == 1
    err = capsys.readouterr().err
    assert f"{ADMIN} is the team's last active admin" in err
    assert "invite another admin before disabling this one" in err
    assert await _run(team.admin, "whoami") == 0


async def test_disable_without_a_terminal_and_without_yes_disables_nobody(
    team: Team, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    # Under pytest stdin is no terminal: as from a script or cron.
    assert await _run(team.admin, "operators", "disable", ALICE) == 1
    captured = capsys.readouterr()
    assert f"operator {ALICE} (op_" in captured.out
    assert "not disabled: run it in a terminal to confirm, or pass --yes" in captured.err
    states = {entry["email"]: entry["state"] for entry in await _listed(team.admin, capsys)}
    assert states[ALICE] == "active"
    assert await _run(team.alice, "whoami") == 0


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(("answer", "disabled"), [("y", True), ("", False), ("no", False)])
async def test_disable_at_a_terminal_asks_and_only_yes_disables(
    team: Team, capsys: pytest.CaptureFixture[str], answer: str, disabled: bool
) -> None:
    questions: list[str] = []

    def ask(question: str) -> str:
        questions.append(question)
        return answer

    def disable() -> int:
        return operators_disable(CliHome(team.admin), ALICE, ask=ask, stdin=_Terminal())

    capsys.readouterr()
    assert await trio.to_thread.run_sync(disable) == (0 if disabled else 1)
    assert len(questions) == 1 and "cannot be undone" in questions[0]
    assert ("not disabled" in capsys.readouterr().out) is not disabled
    states = {entry["email"]: entry["state"] for entry in await _listed(team.admin, capsys)}
    assert states[ALICE] == ("disabled" if disabled else "active")
