"""`tucdesk sessions --operator EMAIL`, `--agent` of a removed agent, and `sessions show` saying
how a session ended, against a real rendezvous (Hypercorn on loopback, SQLite and PostgreSQL);
the CLI runs in a worker thread, as a user runs it.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from operator_cli.main import main
from rendezvous.credentials import hash_secret, new_invite_code, new_registration_key
from rendezvous.store import Session, SessionState, Store, open_store
from rendezvous.store.base import new_id
from tests.rendezvous.conftest import database_url, postgres_cluster  # noqa: F401 - fixtures
from tests.rendezvous.live_server import live_service

pytestmark = pytest.mark.anyio
NOW = time.time()


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


@dataclass
class Seeded:
    """The seeded team: the admin's invite, and the sessions each case looks for."""

    invite: str
    bobs: list[str]  # bob's sessions, newest first
    stolen_agent: str  # the id of db-1, removed by an admin
    on_stolen: list[str]  # its sessions, newest first
    killed: str  # a session whose command SIGTERM killed


async def _agent(store: Store, team_id: str, name: str) -> str:
    key = hash_secret(new_registration_key())
    await store.create_registration_key(team_id, key, [], NOW + 600, "test", NOW)
    agent, _ = await store.register_agent(
        key, NOW, secrets.token_bytes(32), "SHA256:x", f"m-{name}", name, name
    )
    return agent.id


async def _session(store: Store, team_id: str, agent_id: str, operator_id: str, age: int) -> str:
    created_at = NOW - age
    session = await store.create_session(Session(
        id=new_id("ses"), team_id=team_id, agent_id=agent_id, operator_id=operator_id,
        operator_key_thumbprint="jkt", mode="exec", command=("sleep", "100"),
        relay_id="relay-1", relay_host="127.0.0.1", relay_port=7000, relay_udp_port=None,
        policy_result="allow", policy_rule_id=None, state=SessionState.ACCEPTED,
        state_reason=None, created_at=created_at, expires_at=created_at + 60,
        updated_at=created_at,
    ))  # fmt: skip
    return session.id


async def _seed(database: str) -> Seeded:
    async with open_store(database) as store:
        team = await store.create_team("ops", NOW)
        invite = new_invite_code()
        # Valid from the seeding on (NOW is taken when the module loads, which on a slow full
        # run can be more than ten minutes before this test logs in).
        await store.create_invite(team.id, "admin@example.test", "admin", hash_secret(invite),
                                  time.time() + 3600, "test", NOW)  # fmt: skip
        operators = {}
        for email in ("bob@example.test", "carol@example.test"):
            code = hash_secret(new_invite_code())
            await store.create_invite(team.id, email, "operator", code, time.time() + 3600,
                                      "test", NOW)  # fmt: skip
            operator, _ = await store.enroll_operator(
                code, NOW, secrets.token_bytes(32), new_id("t")
            )
            operators[email] = operator.id
        bob, carol = operators["bob@example.test"], operators["carol@example.test"]
        web, stolen = await _agent(store, team.id, "web-1"), await _agent(store, team.id, "db-1")
        bobs = [await _session(store, team.id, web, bob, age) for age in (100, 300)]
        on_stolen = [await _session(store, team.id, stolen, carol, age) for age in (200, 400)]
        killed = bobs[0]
        await store.update_session_state(
            team.id, web, killed, SessionState.ENDED, "normal", NOW,
            from_states=(SessionState.ACCEPTED,), exit_signal="TERM",
        )  # fmt: skip
        await store.remove_agent(team.id, stolen, NOW)
    return Seeded(invite, bobs, stolen, on_stolen, killed)


@pytest.fixture
async def logged_in(
    tmp_path: Path, database_url: str  # noqa: F811 - the fixture: SQLite and PostgreSQL
) -> AsyncIterator[tuple[Path, Seeded]]:
    """A running service with the seeded team, and a CLI home logged in as its admin."""
    seeded = await _seed(database_url)
    home = tmp_path / "home"
    async with live_service(tmp_path / "data", database_url) as (url, _):
        login = ["--home", str(home), "login", "--server", url, "--invite", seeded.invite]
        assert await trio.to_thread.run_sync(main, login) == 0
        yield home, seeded


async def _run(
    home: Path, capsys: pytest.CaptureFixture[str], *arguments: str
) -> tuple[int, str, str]:
    capsys.readouterr()
    status = await trio.to_thread.run_sync(main, ["--home", str(home), "sessions", *arguments])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


async def _listed(home: Path, capsys: pytest.CaptureFixture[str], *arguments: str) -> list[str]:
    status, out, err = await _run(home, capsys, "--json", *arguments)
    assert status == 0, err
    return [entry["session_id"] for entry in json.loads(out)]


async def test_operator_takes_an_email_and_an_unknown_one_is_an_error(
    logged_in: tuple[Path, Seeded], capsys: pytest.CaptureFixture[str]
) -> None:
    home, seeded = logged_in
    assert await _listed(home, capsys, "--operator", "bob@example.test") == seeded.bobs
    status, out, err = await _run(home, capsys, "--operator", "nobody@example.test")
    assert (status, out) == (1, "")
    assert "no operator 'nobody@example.test' in your team" in err


async def test_a_removed_agent_is_found_by_id_and_by_the_name_only_it_had(
    logged_in: tuple[Path, Seeded], capsys: pytest.CaptureFixture[str]
) -> None:
    home, seeded = logged_in
    assert await _listed(home, capsys, "--agent", seeded.stolen_agent) == seeded.on_stolen
    assert await _listed(home, capsys, "--agent", "db-1") == seeded.on_stolen
    status, out, _ = await _run(home, capsys, "--agent", seeded.stolen_agent)
    assert status == 0 and out.count("db-1") == len(seeded.on_stolen)  # its name stays listed


async def test_show_says_why_a_session_ended_and_how_its_command_did(
    logged_in: tuple[Path, Seeded], capsys: pytest.CaptureFixture[str]
) -> None:
    home, seeded = logged_in
    status, out, err = await _run(home, capsys, "show", seeded.killed, "--json")
    assert status == 0, err
    shown = json.loads(out)
    assert (shown["state"], shown["reason"]) == ("ended", "normal")
    assert (shown["exit_code"], shown["exit_signal"]) == (None, "TERM")
    status, out, err = await _run(home, capsys, "show", seeded.killed)
    assert status == 0, err
    fields = {label: value.strip() for label, value in
              (line.split(":", 1) for line in out.splitlines())}  # fmt: skip
    assert fields["State"] == "ended (normal)"
    assert fields["Exit"] == "signal TERM"
    listed = json.loads((await _run(home, capsys, "--json", "--state", "ended"))[1])
    assert [(s["session_id"], s["exit_signal"]) for s in listed] == [(seeded.killed, "TERM")]
