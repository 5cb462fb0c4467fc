"""`tucdesk agents` and name resolution against a real rendezvous whose list comes in pages.

The service runs in the test (Hypercorn on loopback, SQLite and PostgreSQL); the CLI runs in a
worker thread, as a user runs it. Small page sizes make a few agents span several pages.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from operator_cli.agent_listing import AgentFilter, agents_named, fetch_agents
from operator_cli.client import Session
from operator_cli.home import CliHome
from operator_cli.main import main
from rendezvous.credentials import hash_secret, new_invite_code, new_registration_key
from rendezvous.store import open_store
from tests.rendezvous.conftest import database_url, postgres_cluster  # noqa: F401 - fixtures
from tests.rendezvous.live_server import live_service

pytestmark = pytest.mark.anyio
NAMES = ["web-3", "db-1", "web-1", "web-2", "cache-1", "web-1"]  # "web-1" twice


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


async def _seed(database: str) -> str:
    """A team with an admin invite and the agents of NAMES (web ones tagged web); the invite."""
    now = time.time()
    async with open_store(database) as store:
        team = await store.create_team("ops", now)
        invite = new_invite_code()
        await store.create_invite(team.id, "admin@example.test", "admin", hash_secret(invite),
                                  now + 600, "test", now)  # fmt: skip
        for index, name in enumerate(NAMES):
            key = hash_secret(new_registration_key())
            tags = ["web"] if name.startswith("web") else ["other"]
            await store.create_registration_key(team.id, key, tags, now + 600, "test", now)
            public_key = secrets.token_bytes(32)
            await store.register_agent(
                key, now, public_key, f"SHA256:{index}", f"machine-{index}", name, name
            )
    return invite


@pytest.fixture
async def logged_in(
    tmp_path: Path, database_url: str  # noqa: F811 - the fixture: SQLite and PostgreSQL
) -> AsyncIterator[tuple[str, Path]]:
    """A running service with the seeded team, and a CLI home logged in to it as its admin."""
    invite = await _seed(database_url)
    home = tmp_path / "home"
    async with live_service(tmp_path / "data", database_url) as (url, _):
        login = ["--home", str(home), "login", "--server", url, "--invite", invite]
        assert await trio.to_thread.run_sync(main, login) == 0
        yield url, home


async def _list_requests(url: str) -> int:
    async with httpx.AsyncClient() as client:
        exposition = (await client.get(url + "/metrics")).text
    match = re.search(
        r'tucdesk_http_requests_total\{method="GET",route="/agents",status="200"\} (\d+)',
        exposition,
    )
    return int(match.group(1)) if match else 0


async def _agents(home: Path, capsys: pytest.CaptureFixture[str], *options: str) -> str:
    capsys.readouterr()
    command = ["--home", str(home), "agents", *options]
    assert await trio.to_thread.run_sync(main, command) == 0
    return capsys.readouterr().out


async def test_agents_fetches_every_page_of_a_team_larger_than_a_page(
    logged_in: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    url, home = logged_in
    before = await _list_requests(url)
    listed = json.loads(await _agents(home, capsys, "--json", "--page-size", "2"))
    assert [agent["name"] for agent in listed] == sorted(NAMES)
    assert len({agent["id"] for agent in listed}) == len(NAMES)
    assert await _list_requests(url) - before == 3  # 6 agents, 2 a page
    table = await _agents(home, capsys, "--page-size", "4")
    assert all(name in table for name in NAMES) and "stopped after" not in table


async def test_agents_limit_stops_after_n_agents(
    logged_in: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    url, home = logged_in
    before = await _list_requests(url)
    listed = json.loads(await _agents(home, capsys, "--json", "--limit", "3", "--page-size", "2"))
    assert [agent["name"] for agent in listed] == sorted(NAMES)[:3]
    assert await _list_requests(url) - before == 2  # 2, then the 1 still wanted
    table = await _agents(home, capsys, "--limit", "1")
    # The header and one agent; "stopped after" goes to stderr (test_scripting_agents.py).
    assert len(table.splitlines()) == 2 and "stopped after" not in table
    everyone = json.loads(await _agents(home, capsys, "--json", "--limit", "100"))
    assert len(everyone) == len(NAMES)


async def test_agents_filters_by_tag_state_and_name(
    logged_in: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, home = logged_in

    async def names(*options: str) -> list[str]:
        output = await _agents(home, capsys, "--json", "--page-size", "1", *options)
        return [agent["name"] for agent in json.loads(output)]

    assert await names("--tag", "web") == ["web-1", "web-1", "web-2", "web-3"]
    assert await names("--tag", "web", "--tag", "other") == []
    assert await names("--name", "web-1") == ["web-1", "web-1"]
    assert await names("--name", "c", "--offline") == ["cache-1"]
    assert await names("--online") == []


async def test_a_name_resolves_on_a_later_page_and_an_id_too(
    logged_in: tuple[str, Path],
) -> None:
    _, home = logged_in

    def resolve() -> tuple[list[str], list[str], list[str]]:
        session = Session.from_home(CliHome(home))
        try:
            everyone = fetch_agents(session, AgentFilter(), page_size=1).agents
            last = everyone[-1]
            by_name = [a["id"] for a in agents_named(session, last["name"], page_size=1)]
            by_id = [a["id"] for a in agents_named(session, everyone[0]["id"], page_size=1)]
            twice = [a["id"] for a in agents_named(session, "web-1", page_size=1)]
        finally:
            session.close()
        assert by_name == [last["id"]] and by_id == [everyone[0]["id"]]
        return by_name, by_id, twice

    _, _, twice = await trio.to_thread.run_sync(resolve)
    assert len(twice) == 2


async def test_agents_trust_resolves_the_name_through_the_filtered_list(
    logged_in: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _, home = logged_in
    command = ["--home", str(home), "agents", "trust", "web-3", "--yes"]
    assert await trio.to_thread.run_sync(main, command) == 0
    assert "web-3" in capsys.readouterr().out
    ambiguous = ["--home", str(home), "agents", "trust", "web-1", "--yes"]
    assert await trio.to_thread.run_sync(main, ambiguous) == 1
    assert "several agents are called 'web-1'" in capsys.readouterr().err


async def test_a_mistyped_name_is_matched_against_a_bounded_number_of_agents(
    logged_in: tuple[str, Path], capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import operator_cli.session_commands as session_commands

    url, home = logged_in
    monkeypatch.setattr(session_commands, "SUGGESTION_SEARCH_LIMIT", 2)
    before = await _list_requests(url)
    command = ["--home", str(home), "exec", "wbe-3", "--", "true"]
    assert await trio.to_thread.run_sync(main, command) == 255
    # One request for the first 2 agents (cache-1, db-1), not every page of the team.
    assert await _list_requests(url) - before == 1
    assert capsys.readouterr().err == (
        "tucdesk: no agent named 'wbe-3' in your team (see tucdesk agents; searched the first "
        "2 agents)\n"
    )
    monkeypatch.setattr(session_commands, "SUGGESTION_SEARCH_LIMIT", 1000)
    assert await trio.to_thread.run_sync(main, command) == 255
    assert capsys.readouterr().err == (
        "tucdesk: no agent named 'wbe-3' in your team; did you mean web-3 or web-2 or web-1? "
        "(see tucdesk agents)\n"
    )


@pytest.mark.parametrize(
    "options",
    [["--limit", "0"], ["--limit", "x"], ["--page-size", "1001"], ["--online", "--offline"]],
)
def test_agents_options_out_of_bounds_are_refused_before_any_request(
    tmp_path: Path, options: list[str]
) -> None:
    with pytest.raises(SystemExit) as exit_status:
        main(["--home", str(tmp_path), "agents", *options])
    assert exit_status.value.code == 2
