"""`tucdesk agents tag` against a real rendezvous (SQLite and PostgreSQL), run as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from operator_cli import agent_tagging
from operator_cli.agent_tagging import new_tags
from operator_cli.main import main
from rendezvous.store import open_store
from tests.operator_cli.test_agents_remove_cli import logged_in  # noqa: F401 - the fixture
from tests.rendezvous.conftest import database_url, postgres_cluster  # noqa: F401 - fixtures

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


async def run(home: Path, *arguments: str) -> int:
    exit_code: int = await trio.to_thread.run_sync(main, ["--home", str(home), *arguments])
    return exit_code


async def tags_of(home: Path, name: str, capsys: pytest.CaptureFixture[str]) -> list[str]:
    capsys.readouterr()
    assert await run(home, "agents", "--json", "--name", name) == 0
    [agent] = [agent for agent in json.loads(capsys.readouterr().out) if agent["name"] == name]
    tags: list[str] = agent["tags"]
    return tags


async def test_tag_adds_and_removes_says_what_changed_and_that_it_is_pending(
    logged_in: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    home, database, team_id = logged_in
    capsys.readouterr()
    assert await run(home, "agents", "tag", "web-1", "--add", "Prod", "--add", "pci") == 0
    out = capsys.readouterr().out
    assert "agent web-1 (agt_" in out and "tags (none) -> prod, pci" in out
    assert "tucdesk roster sign" in out
    assert await tags_of(home, "web-1", capsys) == ["prod", "pci"]
    assert await run(home, "agents", "tag", "web-1", "--remove", "pci") == 0
    assert "tags prod, pci -> prod" in capsys.readouterr().out
    assert await run(home, "agents", "tag", "web-1") == 0
    assert capsys.readouterr().out.strip().endswith(": prod")
    async with open_store(database) as store:
        changes = [
            json.loads(record.canonical)["event"]
            for record in await store.audit.read_records(team_id, 0, 1000)
            if json.loads(record.canonical)["event"]["action"] == "agent.tags_changed"
        ]
    assert [change["context"]["tags"] for change in changes] == [["prod", "pci"], ["prod"]]


async def test_tag_of_an_ambiguous_name_changes_nothing_and_names_the_ids(
    logged_in: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    home, _, _ = logged_in
    capsys.readouterr()
    assert await run(home, "agents", "tag", "db-1", "--add", "prod") == 1
    err = capsys.readouterr().err
    assert "several agents are named 'db-1'" in err and "use the agent id" in err
    assert await tags_of(home, "web-1", capsys) == []


async def test_a_bad_tag_is_refused_with_the_rule(
    logged_in: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    home, _, _ = logged_in
    capsys.readouterr()
    assert await run(home, "agents", "tag", "web-1", "--add", "no spaces") != 0
    assert "a-z 0-9" in capsys.readouterr().err
    assert await tags_of(home, "web-1", capsys) == []


def test_new_tags_replaces_then_adds_then_removes_lower_cased_without_repeats() -> None:
    assert new_tags(["a", "b"], add=["C", "a"], remove=["b"]) == ["a", "c"]
    assert new_tags(["a", "b"], replace=["x", ""], add=["y"]) == ["x", "y"]
    assert new_tags(["a"], replace=[]) == []


def _another_admin_changes_tags_after_reads(
    monkeypatch: pytest.MonkeyPatch, database: str, team_id: str, changes: list[list[str]]
) -> None:
    """After each of the CLI's first len(changes) reads of the agent, the next of ``changes``
    lands in the database, as if another admin had been quicker."""
    real_read = agent_tagging.one_agent_named

    def read_then_overtaken(*args: Any, **kwargs: Any) -> Any:
        listed = real_read(*args, **kwargs)
        if changes:
            tags = changes.pop(0)

            async def change() -> None:
                async with open_store(database) as store:
                    await store.set_agent_tags(team_id, listed["id"], tags)

            trio.from_thread.run(change)
        return listed

    monkeypatch.setattr(agent_tagging, "one_agent_named", read_then_overtaken)


async def test_tag_add_reads_again_once_when_another_admin_changed_the_tags_meanwhile(
    logged_in: tuple[Path, str, str],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home, database, team_id = logged_in
    _another_admin_changes_tags_after_reads(monkeypatch, database, team_id, [["db"]])
    capsys.readouterr()
    assert await run(home, "agents", "tag", "web-1", "--add", "prod") == 0
    assert "tags db -> db, prod" in capsys.readouterr().out
    monkeypatch.undo()
    assert await tags_of(home, "web-1", capsys) == ["db", "prod"]


async def test_tag_add_gives_up_after_one_retry_and_changes_nothing(
    logged_in: tuple[Path, str, str],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    home, database, team_id = logged_in
    _another_admin_changes_tags_after_reads(monkeypatch, database, team_id, [["db"], ["web"]])
    capsys.readouterr()
    assert await run(home, "agents", "tag", "web-1", "--add", "prod") == 1
    err = capsys.readouterr().err
    assert "tags changed meanwhile (now: web)" in err and "(tags_changed)" in err
    monkeypatch.undo()
    assert await tags_of(home, "web-1", capsys) == ["web"]
