"""`tucdesk-rendezvous operator list` and `operator disable`: the server admin's lock on a rogue
admin, run on the rendezvous host against the store while the service serves (real rendezvous,
relay, agent and `tucdesk` processes, on SQLite and PostgreSQL)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from operator_cli.client import Session
from operator_cli.home import CliHome
from operator_cli.local_stack import LocalStackError
from operator_cli.session_listing import SessionFilter, fetch_sessions
from tests.rendezvous.conftest import BACKENDS
from tests.stack.conftest import StackFactory, TappedStack, stack_factory  # noqa: F401 (a fixture)

ROGUE = "eve@demo.localhost"
FIRST_ADMIN = "operator@demo.localhost"  # LocalStack's first operator
NEW_ADMIN = "new-admin@demo.localhost"
WAIT_SECONDS = 30.0
POLL_SECONDS = 0.2
POLICY = """version = 1
mode = "allowlist"

[[rules]]
id = "admins-may-work"
outcome = "allow"
operators = { roles = ["admin"] }
"""


def _wait_applied(stack: TappedStack, version: int) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        session = Session.from_home(CliHome(stack.cli_home))
        try:
            agents = session.request("GET", "/v1/agents")["agents"]
        finally:
            session.close()
        if all(agent.get("policy_version") == version for agent in agents):
            return
        assert time.monotonic() < deadline, agents
        time.sleep(POLL_SECONDS)


def _accepted_sessions(home: Path, operator: str) -> int:
    session = Session.from_home(CliHome(home))
    try:
        listing = fetch_sessions(
            session, SessionFilter(states=("accepted",), operator=operator), limit=10
        )
    finally:
        session.close()
    return len(listing.sessions)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_server_admin_disables_a_rogue_last_admin_who_then_holds_nothing(
    stack_factory: StackFactory,  # noqa: F811 (the imported fixture)
    tmp_path: Path,
    backend: str,
) -> None:
    stack = stack_factory(backend)
    rogue = tmp_path / "eve"
    stack.create_operator(ROGUE, "admin", home=rogue)
    # A signed policy whose roster names both admins: the agent takes sessions from either.
    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    signed = stack.run_tucdesk("policy", "set", str(policy))
    assert signed.returncode == 0, signed.stderr.decode()
    _wait_applied(stack, 1)
    # The rogue admin locks out every other admin, then holds a session open.
    locked = stack.run_tucdesk("operators", "disable", FIRST_ADMIN, "--yes", home=rogue)
    assert locked.returncode == 0, locked.stderr.decode()
    key = stack.create_registration_key(home=rogue)
    held = subprocess.Popen(  # noqa: S603 - our own CLI
        stack.tucdesk_command("exec", stack.agent_name, "--", "sleep", "120", home=rogue),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=stack.cli_env(rogue),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while _accepted_sessions(rogue, ROGUE) == 0:
            if held.poll() is not None or time.monotonic() > deadline:
                held.kill()
                raise AssertionError(f"the rogue's session never started: {held.communicate()}")
            time.sleep(POLL_SECONDS)

        listed = stack.rendezvous_admin("operator", "list", "--team", stack.team_name)
        rows = [line.split("\t") for line in listed.splitlines()]
        assert {row[1]: row[3].split()[0] for row in rows} == {
            FIRST_ADMIN: "disabled", ROGUE: "active"
        }
        output = stack.rendezvous_admin(
            "operator", "disable", "--team", stack.team_name, ROGUE
        )
        assert f"disabled {ROGUE}" in output, output
        assert "1 unused registration key(s)" in output, output
        assert "no active admin of team demo's signed roster is left" in output, output
        if backend == "postgres":
            assert "end now" in output, output
            # Every instance was notified: the agent ends the session at once.
            held.wait(timeout=WAIT_SECONDS)
            assert held.returncode != 0
            stderr = held.stderr.read() if held.stderr else b""
            assert b"disabled" in stderr, stderr
        else:
            assert "within 60s" in output, output
    finally:
        if held.poll() is None:
            held.kill()
            held.wait()
    # The rogue's token, key and registration key are dead; the audit names the service.
    refused = stack.run_tucdesk("operators", home=rogue)
    assert refused.returncode != 0
    enroll = subprocess.run(  # noqa: S603 - our own agent program
        [stack.python, "-m", "agent.main", "enroll", "--server", stack.server_url,
         "--registration-key", key, "--name", "rogue-host",
         "--state-dir", str(tmp_path / "rogue-agent"), "--ca-file", str(stack.ca_file)],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert enroll.returncode != 0
    # The server admin invites a new admin, who works (nobody is left to disable them).
    fresh = stack.create_operator(NEW_ADMIN, "admin", home=tmp_path / "new-admin")
    listing = stack.run_tucdesk("operators", home=fresh)
    assert listing.returncode == 0, listing.stderr.decode()
    export = tmp_path / "audit.json"
    stack.rendezvous_admin("audit", "export", "--team", stack.team_name, "--output", str(export))
    text = export.read_text()
    assert '"operator.revoked"' in text and "admin command" in text


def test_an_unknown_operator_is_refused_with_what_to_do(
    stack_factory: StackFactory,  # noqa: F811 (the imported fixture)
) -> None:
    stack = stack_factory("sqlite")
    with pytest.raises(LocalStackError, match="operator list"):
        stack.rendezvous_admin("operator", "disable", "--team", stack.team_name, "nobody@x.y")
