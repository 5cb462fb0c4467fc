"""`tucdesk sessions` against a real rendezvous whose session list comes in pages.

The service runs in the test (Hypercorn on loopback, SQLite and PostgreSQL); the CLI runs in a
worker thread, as a user runs it. Small page sizes make a few sessions span several pages.
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

from operator_cli.main import main, parse_since
from operator_cli.session_listing import session_details, session_table
from rendezvous.credentials import hash_secret, new_invite_code, new_registration_key
from rendezvous.store import Session, SessionState, open_store
from rendezvous.store.base import new_id
from tests.rendezvous.conftest import database_url, postgres_cluster  # noqa: F401 - fixtures
from tests.rendezvous.live_server import live_service

pytestmark = pytest.mark.anyio
NOW = time.time()
# (age in seconds, agent name, state, command): newest first once sorted by age.
SESSIONS = [
    (7200, "web-1", SessionState.ENDED, ("uname", "-a")),
    (3000, "db-1", SessionState.REFUSED, ("rm", "-rf", "/tmp/x y")),
    (600, "web-1", SessionState.ACCEPTED, None),
    (300, "db-1", SessionState.ENDED, ("psql", "-c", "select 1")),
    (60, "web-1", SessionState.OFFERED, ("echo", "a" * 300)),
]


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


async def _seed(database: str) -> tuple[str, dict[str, str], str]:
    """A team with an admin invite, two agents, an operator (bob) and the sessions of SESSIONS,
    all bob's; the invite, the agents' ids by name, and bob's id."""
    async with open_store(database) as store:
        team = await store.create_team("ops", NOW)
        invite = new_invite_code()
        # Valid from the seeding on: NOW is taken when the module loads, which on a slow full
        # run can be more than ten minutes before the admin logs in with it.
        await store.create_invite(team.id, "admin@example.test", "admin", hash_secret(invite),
                                  time.time() + 3600, "test", NOW)  # fmt: skip
        bob_code = hash_secret(new_invite_code())
        await store.create_invite(team.id, "bob@example.test", "operator", bob_code,
                                  NOW + 600, "test", NOW)  # fmt: skip
        bob, _ = await store.enroll_operator(bob_code, NOW, secrets.token_bytes(32), new_id("t"))
        agents: dict[str, str] = {}
        for index, name in enumerate(("web-1", "db-1")):
            key = hash_secret(new_registration_key())
            await store.create_registration_key(team.id, key, [], NOW + 600, "test", NOW)
            agent, _ = await store.register_agent(
                key, NOW, secrets.token_bytes(32), f"SHA256:{index}", f"m-{index}", name, name
            )
            agents[name] = agent.id
        for age, agent_name, state, command in SESSIONS:
            created_at = NOW - age
            await store.create_session(Session(
                id=new_id("ses"), team_id=team.id, agent_id=agents[agent_name],
                operator_id=bob.id, operator_key_thumbprint="jkt",
                mode="shell" if command is None else "exec", command=command,
                relay_id="relay-1", relay_host="127.0.0.1", relay_port=7000,
                relay_udp_port=None, policy_result="allow", policy_rule_id=None, state=state,
                state_reason=None, created_at=created_at, expires_at=created_at + 60,
                updated_at=created_at,
            ))  # fmt: skip
    return invite, agents, bob.id


@pytest.fixture
async def logged_in(
    tmp_path: Path, database_url: str  # noqa: F811 - the fixture: SQLite and PostgreSQL
) -> AsyncIterator[tuple[str, Path, dict[str, str], str]]:
    """A running service with the seeded team, a CLI home logged in to it as its admin, the
    agents' ids and bob's id."""
    invite, agents, bob = await _seed(database_url)
    home = tmp_path / "home"
    async with live_service(tmp_path / "data", database_url) as (url, _):
        login = ["--home", str(home), "login", "--server", url, "--invite", invite]
        assert await trio.to_thread.run_sync(main, login) == 0
        yield url, home, agents, bob


async def _list_requests(url: str) -> int:
    async with httpx.AsyncClient() as client:
        exposition = (await client.get(url + "/metrics")).text
    match = re.search(
        r'tucdesk_http_requests_total\{method="GET",route="/sessions",status="200"\} (\d+)',
        exposition,
    )
    return int(match.group(1)) if match else 0


async def _sessions(home: Path, capsys: pytest.CaptureFixture[str], *options: str) -> str:
    capsys.readouterr()
    command = ["--home", str(home), "sessions", *options]
    assert await trio.to_thread.run_sync(main, command) == 0
    return capsys.readouterr().out


async def test_sessions_json_lists_every_page_newest_first(
    logged_in: tuple[str, Path, dict[str, str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, home, agents, bob = logged_in
    before = await _list_requests(url)
    listed = json.loads(await _sessions(home, capsys, "--json", "--page-size", "2"))
    assert await _list_requests(url) - before == 3  # 5 sessions, 2 a page
    assert [entry["created_at"] for entry in listed] == [NOW - age for age, *_ in SESSIONS[::-1]]
    assert [entry["agent_name"] for entry in listed] == [name for _, name, *_ in SESSIONS[::-1]]
    assert {entry["operator_id"] for entry in listed} == {bob}
    assert {entry["operator_email"] for entry in listed} == {"bob@example.test"}
    assert listed[2]["command"] is None and listed[2]["mode"] == "shell"
    assert listed[1]["command"] == ["psql", "-c", "select 1"]


async def test_sessions_table_shows_who_ran_what_where_newest_first(
    logged_in: tuple[str, Path, dict[str, str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, home, _, _ = logged_in
    lines = (await _sessions(home, capsys, "--page-size", "1")).splitlines()
    assert lines[0].split() == [
        "SESSION", "AGENT", "OPERATOR", "MODE", "STATE", "CREATED", "COMMAND"
    ]  # fmt: skip
    rows = lines[1:]
    assert len(rows) == len(SESSIONS)
    assert [row.split()[1] for row in rows] == [name for _, name, *_ in SESSIONS[::-1]]
    assert [row.split()[4] for row in rows] == [state.value for *_, state, _ in SESSIONS[::-1]]
    assert all("bob@example.test" in row for row in rows)
    assert rows[0].endswith("a" * 300)  # not a terminal: the command goes whole
    assert rows[2].endswith(" -")  # a shell has no command
    assert rows[3].endswith("rm -rf '/tmp/x y'")
    assert not any("--limit" in line for line in lines)


async def test_sessions_limit_stops_after_the_newest_n(
    logged_in: tuple[str, Path, dict[str, str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    url, home, _, _ = logged_in
    before = await _list_requests(url)
    listed = json.loads(await _sessions(home, capsys, "--json", "--limit", "3", "--page-size", "2"))
    assert [entry["created_at"] for entry in listed] == [NOW - 60, NOW - 300, NOW - 600]
    assert await _list_requests(url) - before == 2  # 2, then the 1 still wanted
    table = await _sessions(home, capsys, "--limit", "1")
    assert len(table.splitlines()) == 3 and "the newest 1 sessions: --limit" in table


async def test_sessions_filters_by_state_agent_name_operator_and_since(
    logged_in: tuple[str, Path, dict[str, str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, home, agents, bob = logged_in

    async def ages(*options: str) -> list[int]:
        output = await _sessions(home, capsys, "--json", "--page-size", "1", *options)
        return [round(NOW - entry["created_at"]) for entry in json.loads(output)]

    assert await ages("--state", "ended") == [300, 7200]
    assert await ages("--state", "ended", "--state", "refused") == [300, 3000, 7200]
    assert await ages("--agent", "db-1") == [300, 3000]
    assert await ages("--agent", agents["web-1"]) == [60, 600, 7200]
    assert await ages("--operator", bob, "--since", "1h") == [60, 300, 600, 3000]
    assert await ages("--since", str(int(NOW - 400))) == [60, 300]
    capsys.readouterr()
    unknown = ["--home", str(home), "sessions", "--agent", "nowhere"]
    assert await trio.to_thread.run_sync(main, unknown) == 1
    assert "no agent 'nowhere' in your team" in capsys.readouterr().err
    nobody = ["--home", str(home), "sessions", "--operator", "op_nobody"]
    assert await trio.to_thread.run_sync(main, nobody) == 1
    assert "no operator 'op_nobody' in your team" in capsys.readouterr().err


async def test_sessions_show_prints_one_session_in_full(
    logged_in: tuple[str, Path, dict[str, str], str], capsys: pytest.CaptureFixture[str]
) -> None:
    _, home, agents, bob = logged_in
    listed = json.loads(await _sessions(home, capsys, "--json", "--state", "refused"))
    assert len(listed) == 1
    refused = listed[0]
    shown = json.loads(await _sessions(home, capsys, "show", refused["session_id"], "--json"))
    assert shown == refused
    lines = (await _sessions(home, capsys, "show", refused["session_id"])).splitlines()
    fields = dict(line.split(":", 1) for line in lines)
    assert fields["Session"].strip() == refused["session_id"]
    assert fields["Agent"].strip() == f"db-1 ({agents['db-1']})"
    assert fields["Operator"].strip() == f"bob@example.test ({bob})"
    assert fields["Command"].strip() == "rm -rf '/tmp/x y'"
    assert fields["State"].strip() == "refused"
    assert fields["Policy"].strip() == "allow"
    capsys.readouterr()
    unknown = ["--home", str(home), "sessions", "show", "ses_nosuchsession"]
    assert await trio.to_thread.run_sync(main, unknown) == 1
    assert "no such session in your team" in capsys.readouterr().err


def test_session_details_name_ids_and_neuter_control_characters() -> None:
    view = {
        "session_id": "ses_1", "agent_id": "agt_1", "agent_name": None, "operator_id": "op_1",
        "operator_email": "eve@example.test", "mode": "exec", "command": ["printf", "\x1b[2J"],
        "state": "refused", "reason": "policy_denied", "policy_result": "deny",
        "policy_rule_id": "r-7", "relay_id": "relay-1", "created_at": 0.0, "updated_at": 60.0,
        "expires_at": None,
    }  # fmt: skip
    lines = session_details(view)
    assert "Agent:    agt_1" in lines  # the agent is gone: its id alone
    assert "Operator: eve@example.test (op_1)" in lines
    assert "Command:  printf $'\\e[2J'" in lines  # as a shell would run it, escape visible
    assert "State:    refused (policy_denied)" in lines
    assert "Policy:   deny (rule r-7)" in lines
    assert "Created:  1970-01-01 00:00:00 UTC" in lines and "Expires:  -" in lines


def test_since_takes_a_duration_a_unix_time_or_an_iso_time() -> None:
    assert parse_since("90s", now=1000.0) == 910.0
    assert parse_since("2h", now=10_000.0) == 2800.0
    assert parse_since("1767225600") == 1767225600.0
    assert parse_since("2026-01-01") == 1767225600.0
    assert parse_since("2026-01-01T01:00:00+01:00") == 1767225600.0


def test_the_table_cuts_the_command_to_the_terminal_and_neuters_control_characters() -> None:
    entry = {
        "session_id": "ses_1", "agent_id": "agt_1", "agent_name": None,
        "operator_id": "op_1", "operator_email": None, "mode": "exec", "state": "ended",
        "created_at": 0.0, "command": ["printf", "\x1b[2J" + "x" * 200],
    }  # fmt: skip
    heading, row = session_table([entry], width=140)
    assert len(row) <= 140 and row.endswith("…") and "\x1b" not in row
    assert "printf $'\\e[2J" in row
    assert row.split()[1:3] == ["agt_1", "op_1"]  # the ids when names are gone


@pytest.mark.parametrize(
    "options",
    [["--limit", "0"], ["--state", "running"], ["--since", "yesterday"],
     ["--page-size", "1001"]],
)  # fmt: skip
def test_sessions_options_out_of_bounds_are_refused_before_any_request(
    tmp_path: Path, options: list[str]
) -> None:
    with pytest.raises(SystemExit) as exit_status:
        main(["--home", str(tmp_path), "sessions", *options])
    assert exit_status.value.code == 2
