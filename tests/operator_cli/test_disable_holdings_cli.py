"""What `tucdesk operators disable` takes away, as the command line shows it, against a real
rendezvous (SQLite and PostgreSQL; the service in the test, the CLI in a worker thread).

The disable's output counts the API keys and registration keys it revoked; `api-keys list` and
`keys list` name who created each key; a session ticket issued just before its operator was
disabled is given up at once with that reason, not after the relay's 30 s pairing limit.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from operator_cli.client import Session
from operator_cli.home import CliHome
from operator_cli.main import main
from operator_cli.session_client import (
    RELAY_PAIR_TIMEOUT_SECONDS,
    SessionRefused,
    SessionTicket,
    _meet_at_relay,
)
from operator_cli.session_commands import offer_refusal_probe
from protocol.identity import SigningIdentity
from rendezvous.credentials import hash_secret, new_invite_code
from rendezvous.store import Store, open_store
from tests.rendezvous.conftest import database_url, postgres_cluster  # noqa: F401 - fixtures
from tests.rendezvous.live_server import live_service

pytestmark = pytest.mark.anyio

ADMIN = "alice@alpha.test"
HANK = "hank@alpha.test"  # a second admin, disabled by the tests
CAROL = "carol@alpha.test"
# Well under the relay's pairing limit: the refusal must come from the probe, not the relay.
PROMPT_SECONDS = 8.0


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


@dataclass
class Team:
    """CLI homes logged in to the running service."""

    alice: Path
    hank: Path
    carol: Path


async def _invite(store: Store, team_id: str, email: str, role: str) -> str:
    code = new_invite_code()
    now = time.time()
    await store.create_invite(team_id, email, role, hash_secret(code), now + 600, "test", now)
    return code


@pytest.fixture
async def team(
    tmp_path: Path, database_url: str  # noqa: F811 - the fixture: SQLite and PostgreSQL
) -> AsyncIterator[Team]:
    invites: list[tuple[str, str]] = []
    async with open_store(database_url) as store:
        alpha = await store.create_team("alpha", time.time())
        for name, email, role in [("alice", ADMIN, "admin"), ("hank", HANK, "admin"),
                                  ("carol", CAROL, "operator")]:  # fmt: skip
            invites.append((name, await _invite(store, alpha.id, email, role)))
    async with live_service(tmp_path / "data", database_url) as (url, _):
        for name, code in invites:
            login = ["--home", str(tmp_path / name), "login", "--server", url, "--invite", code]
            assert await trio.to_thread.run_sync(main, login) == 0
        yield Team(tmp_path / "alice", tmp_path / "hank", tmp_path / "carol")


async def _run(home: Path, *arguments: str) -> int:
    exit_code: int = await trio.to_thread.run_sync(main, ["--home", str(home), *arguments])
    return exit_code


async def test_disable_says_what_it_revoked_and_key_lists_name_the_creator(
    team: Team, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await _run(team.hank, "api-keys", "create", "siem", "--scope", "sessions:read",
                      "--scope", "registration_keys:write") == 0  # fmt: skip
    assert await _run(team.hank, "keys", "create", "--tags", "web") == 0
    assert await _run(team.alice, "api-keys", "list") == 0
    listed = capsys.readouterr().out
    assert "CREATED BY" in listed and HANK in listed and "(disabled)" not in listed

    assert await _run(team.alice, "operators", "disable", "--yes", HANK) == 0
    output = capsys.readouterr().out
    assert "revoked: 1 API key(s), 1 unused registration key(s)" in output, output
    assert "withdrawn: 0 pending approval request(s)" in output

    for command in (("api-keys", "list"), ("keys", "list")):
        assert await _run(team.alice, *command) == 0
        [line] = [line for line in capsys.readouterr().out.splitlines() if HANK in line]
        assert f"{HANK} (disabled)" in line and "revoked" in line, line


async def test_a_ticket_of_an_operator_disabled_meanwhile_is_given_up_at_once(
    team: Team, capsys: pytest.CaptureFixture[str]
) -> None:
    """The relay here accepts and never pairs (the agent was told to end the session and will
    not come); the probe hears that the operator is disabled and ends the wait."""
    silent_relay = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = silent_relay[0].socket.getsockname()[1]
    ticket = SessionTicket(
        session_id="ses_disabled_meanwhile", expires_at=time.time() + 60, agent_id="agt_x",
        agent_name="web-1", agent_key=SigningIdentity.generate().public, grant="-",
        relay_id="relay-1", relay_host="127.0.0.1", relay_port=port, relay_token="token",
    )  # fmt: skip
    assert await _run(team.alice, "operators", "disable", "--yes", CAROL) == 0
    api = Session.from_home(CliHome(team.carol))
    try:
        async with trio.open_nursery() as nursery:

            async def accept_and_keep_silent() -> None:
                async with silent_relay[0]:
                    stream = await silent_relay[0].accept()
                    async with stream:
                        await trio.sleep_forever()

            nursery.start_soon(accept_and_keep_silent)
            started = trio.current_time()
            with trio.fail_after(PROMPT_SECONDS), pytest.raises(SessionRefused) as refused:
                await _meet_at_relay(ticket, offer_refusal_probe(api, ticket.session_id))
            assert trio.current_time() - started < RELAY_PAIR_TIMEOUT_SECONDS
            nursery.cancel_scope.cancel()
    finally:
        api.close()
    assert "operator_disabled" in str(refused.value)
    assert "disabled" in str(refused.value)
