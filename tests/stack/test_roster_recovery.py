"""A team whose signed roster loses its last active admin: the disable refuses unless told
``--freeze-roster``, and the server admin's ``team reset-policy`` plus re-enrolling an agent
recovers that agent, while an agent not re-enrolled keeps its pinned trust (the rendezvous alone
cannot re-root it). Real rendezvous, relay, agents and `tucdesk`, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from operator_cli.client import Session
from operator_cli.home import CliHome
from operator_cli.local_stack import LocalStackError
from tests.rendezvous.conftest import BACKENDS
from tests.stack.conftest import StackFactory, TappedStack

FIRST_ADMIN = "operator@demo.localhost"  # LocalStack's first operator
SECOND_ADMIN = "b@demo.localhost"
NEW_OPERATOR = "c@demo.localhost"
KEPT_AGENT = "kept-agent"
WAIT_SECONDS = 30.0
POLL_SECONDS = 0.2
POLICY = """version = {version}
mode = "allowlist"

[[rules]]
id = "team-may-work"
outcome = "allow"
operators = {{ roles = ["operator", "admin"] }}
"""


def _agents(stack: TappedStack, home: Path) -> list[dict[str, Any]]:
    session = Session.from_home(CliHome(home))
    try:
        agents: list[dict[str, Any]] = session.request("GET", "/v1/agents")["agents"]
        return agents
    finally:
        session.close()


def _wait_for(stack: TappedStack, home: Path, agent_id: str, wanted: dict[str, Any]) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        agent = next(a for a in _agents(stack, home) if a["id"] == agent_id)
        if all(agent.get(name) == value for name, value in wanted.items()):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"agent {agent_id} never had {wanted}: {agent}")
        time.sleep(POLL_SECONDS)


def _set_policy(stack: TappedStack, home: Path, version: int) -> tuple[int, str]:
    path = stack.cli_home.parent / f"policy-{home.name}-{version}.toml"
    path.write_text(POLICY.format(version=version))
    result = stack.run_tucdesk("policy", "set", str(path), home=home)
    return result.returncode, result.stderr.decode()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frozen_signed_roster_is_refused_then_recovered_by_reset_and_re_enrollment(
    stack_factory: StackFactory, tmp_path: Path, backend: str
) -> None:
    stack = stack_factory(backend)
    first, second = stack.cli_home, tmp_path / "b"
    # A second agent, enrolled now (it pins the first admin) and never re-enrolled.
    kept_dir = tmp_path / "kept-agent-state"
    reenrolled = stack.agent_name
    kept = stack.enroll_agent(KEPT_AGENT, state_dir=kept_dir)
    stack.agent_name = reenrolled
    stack.start_agent(kept_dir, name="kept")
    stack.wait_agent_online(KEPT_AGENT)
    old = stack.find_agent(reenrolled)
    assert old is not None
    # The first signed policy: its roster names only the first admin as admin.
    code, error = _set_policy(stack, first, 1)
    assert code == 0, error
    for agent_id in (old.id, kept.id):
        _wait_for(stack, first, agent_id, {"policy_version": 1})
    stack.create_operator(SECOND_ADMIN, "admin", home=second)

    with pytest.raises(LocalStackError, match="still has an active admin"):
        stack.rendezvous_admin("team", "reset-policy", "--team", stack.team_name)
    refused = stack.run_tucdesk("operators", "disable", FIRST_ADMIN, "--yes", home=second)
    assert refused.returncode != 0
    message = refused.stderr.decode()
    assert "last active admin of the team's signed roster" in message, message
    assert "--freeze-roster" in message and "roster sign" in message, message

    frozen = stack.run_tucdesk(
        "operators", "disable", FIRST_ADMIN, "--yes", "--freeze-roster", home=second
    )
    assert frozen.returncode == 0, frozen.stderr.decode()
    assert "no active admin of the team's signed roster is left" in frozen.stdout.decode()
    code, error = _set_policy(stack, second, 2)
    assert code != 0 and "team reset-policy" in error, error

    # The server admin's recovery: retire the chain; the second admin signs a new first one.
    output = stack.rendezvous_admin("team", "reset-policy", "--team", stack.team_name)
    assert "re-enrolled" in output, output
    # Numbering goes on across the reset: the new first bundle is version 2.
    code, error = _set_policy(stack, second, 1)
    assert code != 0 and "set version = 2" in error, error
    code, error = _set_policy(stack, second, 2)
    assert code == 0, error
    # The rendezvous alone cannot re-root an agent's trust: both refuse the new chain.
    for agent_id in (old.id, kept.id):
        _wait_for(stack, second, agent_id, {"policy_version": 1})
    deadline = time.monotonic() + WAIT_SECONDS
    while not all(
        agent.get("policy_refusal") for agent in _agents(stack, second)
        if agent["id"] in (old.id, kept.id)
    ):  # fmt: skip
        assert time.monotonic() < deadline, _agents(stack, second)
        time.sleep(POLL_SECONDS)

    # A host admin re-enrolls one agent: it pins the team's current admins and takes the chain.
    stack.stop_agent()
    key = stack.create_registration_key(home=second)
    stack._run_checked(  # noqa: SLF001 - the stack's checked runner, for the enroll command
        [
            stack.python, "-m", "agent.main", "enroll", "--force",
            "--server", stack.server_url, "--registration-key", key, "--name", reenrolled,
            "--state-dir", str(stack.agent_state_dir), "--ca-file", str(stack.ca_file),
        ],
        "tucdesk-agent enroll --force",
    )  # fmt: skip
    stack.start_agent()
    new_id = ""
    deadline = time.monotonic() + WAIT_SECONDS
    while not new_id:
        assert time.monotonic() < deadline, "the re-enrolled agent never came online"
        listed = _agents(stack, second)
        new_id = next(
            (a["id"] for a in listed if a["name"] == reenrolled and a["id"] != old.id
             and a["online"]), "",
        )  # fmt: skip
        time.sleep(POLL_SECONDS)
    _wait_for(stack, second, new_id, {"policy_version": 2, "policy_refusal": None})

    # An operator invited after the freeze opens a session on the re-enrolled agent only.
    third = tmp_path / "c"
    stack.create_operator(NEW_OPERATOR, "operator", home=third)
    assert stack.run_tucdesk("roster", "sign", "--yes", home=second).returncode == 0
    _wait_for(stack, second, new_id, {"policy_version": 3, "policy_refusal": None})
    ran = stack.run_tucdesk("exec", new_id, "--", "echo", "recovered", home=third)
    assert ran.returncode == 0, ran.stderr.decode()
    assert ran.stdout == b"recovered\n"
    kept_run = stack.run_tucdesk("exec", kept.id, "--", "echo", "recovered", home=third)
    assert kept_run.returncode != 0
    assert "policy out of date" in kept_run.stderr.decode(), kept_run.stderr.decode()
    export = tmp_path / "audit.json"
    stack.rendezvous_admin("audit", "export", "--team", stack.team_name, "--output", str(export))
    assert '"policy.reset"' in export.read_text()
    assert b"recovered" not in kept_run.stdout
