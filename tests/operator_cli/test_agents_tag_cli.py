"""`tucdesk agents tag` against a real rendezvous (SQLite and PostgreSQL), run as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

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
