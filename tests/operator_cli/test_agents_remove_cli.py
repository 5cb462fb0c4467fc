"""`tucdesk agents remove` against a real rendezvous (SQLite and PostgreSQL).

The service runs in the test (Hypercorn on loopback); the CLI runs in a worker thread, as a
user runs it. A terminal to confirm at is a real pseudo-terminal.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

import pytest
import trio

from operator_cli.agent_removal import agents_remove
from operator_cli.home import CliHome
from operator_cli.main import main
from rendezvous.credentials import hash_secret, new_invite_code, new_registration_key
from rendezvous.store import open_store
from tests.rendezvous.conftest import database_url, postgres_cluster  # noqa: F401 - fixtures
from tests.rendezvous.live_server import live_service

pytestmark = pytest.mark.anyio
NAMES = ["web-1", "db-1", "db-1"]  # "db-1" twice


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


async def _seed(database: str) -> tuple[str, str]:
    """A team with an admin invite and the agents of NAMES; the invite and the team id."""
    now = time.time()
    async with open_store(database) as store:
        team = await store.create_team("ops", now)
        invite = new_invite_code()
        await store.create_invite(team.id, "admin@example.test", "admin", hash_secret(invite),
                                  now + 600, "test", now)  # fmt: skip
        for index, name in enumerate(NAMES):
            key = hash_secret(new_registration_key())
            await store.create_registration_key(team.id, key, [], now + 600, "test", now)
            await store.register_agent(
                key, now, secrets.token_bytes(32), f"SHA256:key{index}", f"machine-{index}",
                f"{name}.example.com", name,
            )  # fmt: skip
    return invite, team.id


@pytest.fixture
async def logged_in(
    tmp_path: Path, database_url: str  # noqa: F811 - the fixture: SQLite and PostgreSQL
) -> AsyncIterator[tuple[Path, str, str]]:
    """A running service with the seeded team, a CLI home logged in as its admin, the
    database URL and the team id."""
    invite, team_id = await _seed(database_url)
    home = tmp_path / "home"
    async with live_service(tmp_path / "data", database_url) as (url, _):
        login = ["--home", str(home), "login", "--server", url, "--invite", invite]
        assert await trio.to_thread.run_sync(main, login) == 0
        yield home, database_url, team_id


async def _run(home: Path, *arguments: str) -> int:
    command = ["--home", str(home), *arguments]
    exit_code: int = await trio.to_thread.run_sync(main, command)
    return exit_code


async def _listed(home: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    capsys.readouterr()
    assert await _run(home, "agents", "--json") == 0
    return sorted(agent["name"] for agent in json.loads(capsys.readouterr().out))


@contextmanager
def terminal() -> Iterator[TextIO]:
    """The secondary side of a fresh pseudo-terminal, as a text stdin."""
    primary, secondary = os.openpty()
    try:
        with open(secondary, encoding="utf-8", closefd=True) as stream:
            yield stream
    finally:
        os.close(primary)


async def test_remove_with_yes_shows_the_agent_removes_it_and_says_what_it_removed(
    logged_in: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    home, database, team_id = logged_in
    capsys.readouterr()
    assert await _run(home, "agents", "remove", "web-1", "--yes") == 0
    out = capsys.readouterr().out
    assert "agent web-1 (agt_" in out
    assert "key:       SHA256:key0" in out
    assert "last seen: never (offline)" in out
    assert "removed agent web-1 (agt_" in out and "SHA256:key0" in out
    assert await _listed(home, capsys) == ["db-1", "db-1"]
    async with open_store(database) as store:
        [record] = [
            json.loads(record.canonical)["event"]
            for record in await store.audit.read_records(team_id, 0, 1000)
            if json.loads(record.canonical)["event"]["action"] == "agent.removed"
        ]
    assert record["context"]["name"] == "web-1"
    assert record["actor"]["kind"] == "operator"


async def test_remove_without_yes_and_without_a_terminal_removes_nothing(
    logged_in: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    home, _, _ = logged_in
    capsys.readouterr()
    assert await _run(home, "agents", "remove", "web-1") == 1
    captured = capsys.readouterr()
    assert "agent web-1 (agt_" in captured.out
    assert "not removed: run it in a terminal to confirm, or pass --yes" in captured.err
    assert await _listed(home, capsys) == ["db-1", "db-1", "web-1"]


async def test_remove_on_a_terminal_asks_and_removes_only_on_yes(
    logged_in: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    home, _, _ = logged_in
    prompts: list[str] = []

    def answered(answer: str) -> int:
        def ask(prompt: str) -> str:
            prompts.append(prompt)
            return answer

        with terminal() as stdin:
            return agents_remove(CliHome(home), "web-1", assume_yes=False, ask=ask, stdin=stdin)

    capsys.readouterr()
    assert await trio.to_thread.run_sync(answered, "n") == 1
    assert "not removed" in capsys.readouterr().out
    assert await _listed(home, capsys) == ["db-1", "db-1", "web-1"]
    assert await trio.to_thread.run_sync(answered, "y") == 0
    assert "removed agent web-1" in capsys.readouterr().out
    assert await _listed(home, capsys) == ["db-1", "db-1"]
    assert len(prompts) == 2 and "[y/N]" in prompts[0]


async def test_remove_of_an_ambiguous_name_names_the_ids_and_an_id_removes_one(
    logged_in: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    home, _, _ = logged_in
    capsys.readouterr()
    assert await _run(home, "agents", "remove", "db-1", "--yes") == 1
    err = capsys.readouterr().err
    assert "several agents are named 'db-1'" in err and "use the agent id" in err
    assert await _listed(home, capsys) == ["db-1", "db-1", "web-1"]
    assert await _run(home, "agents", "--json", "--name", "db-1") == 0
    first = json.loads(capsys.readouterr().out)[0]["id"]
    assert first in err
    assert await _run(home, "agents", "remove", first, "--yes") == 0
    assert await _listed(home, capsys) == ["db-1", "web-1"]
    # Removed: no longer found, by name or by id.
    capsys.readouterr()
    assert await _run(home, "agents", "remove", first, "--yes") == 1
    assert "no agent named" in capsys.readouterr().err


async def test_end_of_input_at_the_confirmation_prompt_removes_nothing(
    logged_in: tuple[Path, str, str], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """^D at the prompt (the terminal's end of input: input() raises EOFError) answers no."""
    home, _, _ = logged_in

    def end_of_input() -> int:
        primary, secondary = os.openpty()
        try:
            with open(secondary, encoding="utf-8", closefd=True) as stdin:
                monkeypatch.setattr(sys, "stdin", stdin)
                os.write(primary, b"\x04")  # what ^D sends in the terminal's canonical mode
                return agents_remove(CliHome(home), "web-1", assume_yes=False, stdin=stdin)
        finally:
            os.close(primary)

    capsys.readouterr()
    assert await trio.to_thread.run_sync(end_of_input) == 1
    captured = capsys.readouterr()
    assert "not removed" in captured.out and "EOFError" not in captured.err
    assert await _listed(home, capsys) == ["db-1", "db-1", "web-1"]
