"""Review 10: after `tucdesk-rendezvous team reset-policy`, an agent NOT re-enrolled refuses every
session decided under the new chain, its first bundle included, as docs/policy.md says: the new
chain's numbering follows the retired one, so its first grant is newer than the policy the agent
holds ("policy out of date"). An agent enrolled after the reset takes the chain and runs it.
Real rendezvous, relay, agents and `tucdesk` (SQLite; the store's numbering is tested on both
backends in tests/rendezvous/test_review10_admin_reset_and_freeze.py)."""

from __future__ import annotations

import time
from pathlib import Path

from operator_cli.client import Session
from operator_cli.home import CliHome
from tests.stack.conftest import StackFactory
from tests.stack.test_roster_recovery import (
    FIRST_ADMIN,
    POLL_SECONDS,
    WAIT_SECONDS,
    _agents,
    _set_policy,
    _wait_for,
)

OPERATOR = "d@demo.localhost"
NEW_ADMIN = "b@demo.localhost"
FRESH_AGENT = "fresh-agent"


def _chain_version(home: Path) -> int:
    session = Session.from_home(CliHome(home))
    try:
        version: int = session.request("GET", "/v1/policy")["version"]
        return version
    finally:
        session.close()


def test_an_agent_not_re_enrolled_refuses_the_new_chains_first_version(
    stack_factory: StackFactory, tmp_path: Path
) -> None:
    stack = stack_factory("sqlite")
    first, admin, operator = stack.cli_home, tmp_path / "b", tmp_path / "d"
    stack.create_operator(OPERATOR, "operator", home=operator)
    code, error = _set_policy(stack, first, 1)
    assert code == 0, error
    kept = stack.find_agent(stack.agent_name)
    assert kept is not None
    _wait_for(stack, first, kept.id, {"policy_version": 1})
    before = stack.run_tucdesk("exec", kept.id, "--", "echo", "before", home=operator)
    assert before.returncode == 0 and before.stdout == b"before\n", before.stderr.decode()

    stack.create_operator(NEW_ADMIN, "admin", home=admin)
    frozen = stack.run_tucdesk(
        "operators", "disable", FIRST_ADMIN, "--yes", "--freeze-roster", home=admin
    )
    assert frozen.returncode == 0, frozen.stderr.decode()
    output = stack.rendezvous_admin("team", "reset-policy", "--team", stack.team_name)
    assert "version 2" in output, output
    # The new admin signs the new chain's first bundle at the version the server asks for.
    next_version = _chain_version(admin) + 1
    code, error = _set_policy(stack, admin, next_version)
    assert code == 0, error
    deadline = time.monotonic() + WAIT_SECONDS
    while not next(a for a in _agents(stack, admin) if a["id"] == kept.id).get("policy_refusal"):
        assert time.monotonic() < deadline, _agents(stack, admin)
        time.sleep(POLL_SECONDS)

    refused = stack.run_tucdesk("exec", kept.id, "--", "echo", "kept-agent-ran", home=operator)
    assert refused.returncode != 0, refused.stdout
    assert b"kept-agent-ran" not in refused.stdout
    assert "policy out of date" in refused.stderr.decode(), refused.stderr.decode()
    assert next_version == 2

    # An agent enrolled after the reset pins the current admins and runs the new chain.
    key = stack.create_registration_key(home=admin)
    fresh_dir = tmp_path / "fresh-agent-state"
    stack._run_checked(  # noqa: SLF001 - the stack's checked runner, for the enroll command
        [
            stack.python, "-m", "agent.main", "enroll", "--server", stack.server_url,
            "--registration-key", key, "--name", FRESH_AGENT, "--state-dir", str(fresh_dir),
            "--ca-file", str(stack.ca_file),
        ],
        "tucdesk-agent enroll",
    )  # fmt: skip
    stack.start_agent(fresh_dir, name="fresh")
    fresh = stack.find_agent(FRESH_AGENT, home=admin)
    assert fresh is not None
    _wait_for(stack, admin, fresh.id, {"online": True, "policy_version": 2, "policy_refusal": None})
    ran = stack.run_tucdesk("exec", fresh.id, "--", "echo", "fresh-agent-ran", home=operator)
    assert ran.returncode == 0, ran.stderr.decode()
    assert ran.stdout == b"fresh-agent-ran\n"
