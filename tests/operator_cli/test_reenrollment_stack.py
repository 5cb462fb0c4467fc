"""Re-enrolling an agent under the same name, through the whole real stack.

`tucdesk-agent enroll --force` makes a new agent id with a new key under the same name. The CLI
pins keys by name as well as by id (ssh's known_hosts by host name), so the new agent is refused
with both ids and fingerprints until the operator runs `tucdesk agents trust` — by name once the
old registration is removed, or by id while both are listed.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from operator_cli.agent_listing import agents_named
from operator_cli.client import Session
from operator_cli.home import CliHome
from operator_cli.local_stack import AgentInfo, LocalStack

pytestmark = pytest.mark.slow

EXIT_CONNECTION_FAILED = 255
ONLINE_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Reenrolled:
    """A stack whose agent the CLI pinned, then re-enrolled (and running) under the same name;
    the old registration is still listed."""

    stack: LocalStack
    old: AgentInfo
    new: AgentInfo


def agents_called(stack: LocalStack, name: str) -> list[AgentInfo]:
    session = Session.from_home(CliHome(stack.cli_home))
    try:
        listed = agents_named(session, name)
    finally:
        session.close()
    return [AgentInfo(id=entry["id"], name=entry["name"], fingerprint=entry["key_fingerprint"],
                      online=bool(entry["online"])) for entry in listed]


def wait_for_new_agent(stack: LocalStack, name: str, old_id: str) -> AgentInfo:
    deadline = time.monotonic() + ONLINE_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        online = [agent for agent in agents_called(stack, name)
                  if agent.id != old_id and agent.online]
        if online:
            return online[0]
        time.sleep(0.2)
    raise AssertionError(f"the re-enrolled agent {name!r} did not come online")


@pytest.fixture
def reenrolled(tmp_path: Path) -> Iterator[Reenrolled]:
    with LocalStack(tmp_path / "stack") as stack:
        old = stack.start()
        first = stack.run_tucdesk("exec", stack.agent_name, "--", "true")
        assert first.returncode == 0, first.stderr
        assert b"Pinned the key of agent" in first.stderr
        stack.stop_agent()
        enrolled = subprocess.run(
            [stack.python, "-m", "agent.main", "enroll", "--force",
             "--server", stack.server_url,
             "--registration-key", stack.create_registration_key(),
             "--name", stack.agent_name,
             "--state-dir", str(stack.agent_state_dir),
             "--ca-file", str(stack.ca_file)],
            capture_output=True, env=stack.cli_env(), timeout=60, check=False,
        )
        assert enrolled.returncode == 0, enrolled.stderr
        stack.start_agent()
        new = wait_for_new_agent(stack, stack.agent_name, old.id)
        assert new.fingerprint != old.fingerprint
        yield Reenrolled(stack, old, new)


def test_a_reenrolled_agent_is_refused_with_both_keys_until_trusted_by_name(
    reenrolled: Reenrolled, tmp_path: Path
) -> None:
    stack, old, new = reenrolled.stack, reenrolled.old, reenrolled.new
    removed = stack.run_tucdesk("agents", "remove", old.id, "--yes")
    assert removed.returncode == 0, removed.stderr
    marker = tmp_path / "ran"

    for _ in range(2):  # a refusal changes no pin
        refused = stack.run_tucdesk("exec", stack.agent_name, "--", "touch", str(marker))
        message = refused.stderr.decode()
        assert refused.returncode == EXIT_CONNECTION_FAILED, message
        assert "WARNING" in message and "Pinned the key" not in message
        for part in (stack.agent_name, old.id, new.id, old.fingerprint, new.fingerprint,
                     f"tucdesk agents trust {stack.agent_name}\n"):
            assert part in message
        assert not marker.exists()

    unconfirmed = stack.run_tucdesk("agents", "trust", stack.agent_name)
    assert unconfirmed.returncode != 0
    still = stack.run_tucdesk("exec", stack.agent_name, "--", "touch", str(marker))
    assert still.returncode == EXIT_CONNECTION_FAILED and not marker.exists()

    trusted = stack.run_tucdesk("agents", "trust", stack.agent_name, "--yes")
    assert trusted.returncode == 0, trusted.stderr
    shown = trusted.stdout.decode()
    assert old.fingerprint in shown and new.fingerprint in shown and new.id in shown
    accepted = stack.run_tucdesk("exec", stack.agent_name, "--", "touch", str(marker))
    assert accepted.returncode == 0, accepted.stderr
    assert marker.exists()
    again = stack.run_tucdesk("agents", "trust", stack.agent_name, "--yes")
    assert again.returncode == 0 and b"already trusted" in again.stdout


def test_while_both_registrations_are_listed_trust_takes_the_new_id(
    reenrolled: Reenrolled,
) -> None:
    stack, old, new = reenrolled.stack, reenrolled.old, reenrolled.new
    by_name = stack.run_tucdesk("agents", "trust", stack.agent_name, "--yes")
    assert by_name.returncode == 1
    error = by_name.stderr.decode()
    assert f"several agents are called {stack.agent_name!r}" in error
    assert f"{new.id} (online, registered " in error and f"{old.id} (offline, registered " in error
    assert "give the id" in error

    # Naming the new agent by its id: its own pin judges (first use), and the CLI says once
    # that the name is shared and pins are by id (cloned images share host names).
    by_id = stack.run_tucdesk("exec", new.id, "--", "true")
    assert by_id.returncode == 0, by_id.stderr
    assert b"WARNING" not in by_id.stderr
    assert f"several agents are called {stack.agent_name}".encode() in by_id.stderr
    assert stack.run_tucdesk("exec", new.id, "--", "true").returncode == 0

    # Reaching it by id pinned its id only: by name it is still a new key behind a pinned
    # name, refused until someone checks and trusts it.
    assert stack.run_tucdesk("agents", "remove", old.id, "--yes").returncode == 0
    by_name_now = stack.run_tucdesk("exec", stack.agent_name, "--", "true")
    assert by_name_now.returncode == EXIT_CONNECTION_FAILED, by_name_now.stderr
    assert b"WARNING" in by_name_now.stderr
    trusted = stack.run_tucdesk("agents", "trust", stack.agent_name, "--yes")
    assert trusted.returncode == 0, trusted.stderr
    by_name_trusted = stack.run_tucdesk("exec", stack.agent_name, "--", "true")
    assert by_name_trusted.returncode == 0, by_name_trusted.stderr
