"""Agents sharing a host name (cloned images): addressed by id, each is judged by its id's pin;
addressed by name, a new id with a new key under a pinned name is still refused."""

from __future__ import annotations

import dataclasses
import subprocess
import time
from pathlib import Path

import pytest

from operator_cli.agent_listing import agents_named
from operator_cli.client import Session
from operator_cli.home import CliHome
from operator_cli.known_agents import AgentNameKeyChangedError, KnownAgents, PinOutcome
from operator_cli.local_stack import AgentInfo, LocalStack
from operator_cli.session_client import AgentKeyPin, SessionTicket
from protocol.identity import PublicIdentity, SigningIdentity

SERVER = "https://rendezvous.example:8443"
KEY_A = SigningIdentity.generate().public
KEY_B = SigningIdentity.generate().public


def ticket(agent_id: str, key: PublicIdentity, typed: str) -> SessionTicket:
    base = SessionTicket(
        session_id="ses_1", expires_at=0.0, agent_id=agent_id, agent_name="vm", agent_key=key,
        grant="g", relay_id="rly_1", relay_host="127.0.0.1", relay_port=1, relay_token="t",
    )
    return dataclasses.replace(base, requested_as=typed)


def store(tmp_path: Path) -> KnownAgents:
    return KnownAgents.in_home(tmp_path / "home", SERVER)


def test_a_second_agent_of_a_shared_name_addressed_by_id_is_pinned_with_a_note(
    tmp_path: Path,
) -> None:
    known = store(tmp_path)
    assert AgentKeyPin(known, ticket("agt_A", KEY_A, "agt_A"))(KEY_A) is None
    pin = AgentKeyPin(known, ticket("agt_B", KEY_B, "agt_B"))
    assert pin(KEY_B) is None
    assert pin.first_use and pin.key_changed is None
    assert pin.shared_name_note is not None
    assert "several agents are called vm" in pin.shared_name_note
    assert "agt_A" in pin.shared_name_note and "pinned by agent id" in pin.shared_name_note
    assert known.pinned_key("agt_B") == KEY_B
    again = AgentKeyPin(known, ticket("agt_B", KEY_B, "agt_B"))
    assert again(KEY_B) is None and again.shared_name_note is None  # said once
    assert AgentKeyPin(known, ticket("agt_A", KEY_A, "agt_A"))(KEY_A) is None


def test_an_id_pin_still_refuses_a_changed_key_when_addressed_by_id(tmp_path: Path) -> None:
    known = store(tmp_path)
    assert AgentKeyPin(known, ticket("agt_B", KEY_B, "agt_B"))(KEY_B) is None
    pin = AgentKeyPin(known, ticket("agt_B", KEY_A, "agt_B"))
    assert pin(KEY_A) is not None and pin.key_changed is not None


def test_a_new_id_reached_by_name_is_still_refused(tmp_path: Path) -> None:
    known = store(tmp_path)
    assert AgentKeyPin(known, ticket("agt_A", KEY_A, "vm"))(KEY_A) is None
    pin = AgentKeyPin(known, ticket("agt_B", KEY_B, "vm"))
    assert pin(KEY_B) is not None
    assert isinstance(pin.key_changed, AgentNameKeyChangedError)
    assert known.pinned_key("agt_B") is None


def test_known_agents_by_id_skips_the_name_pin_but_keeps_the_id_pin(tmp_path: Path) -> None:
    known = store(tmp_path)
    known.verify_or_pin("agt_A", KEY_A, name="vm")
    assert known.verify_or_pin("agt_B", KEY_B, name="vm", addressed_by_id=True) \
        is PinOutcome.FIRST_USE
    # The id alone is pinned: one connection by id must not let agt_B answer for the name.
    assert known.pins_for_name("vm") == {"agt_A": KEY_A}
    assert known.pinned_key("agt_B") == KEY_B
    with pytest.raises(AgentNameKeyChangedError):  # by name, agt_B is still refused ...
        known.verify_or_pin("agt_B", KEY_B, name="vm")
    with pytest.raises(AgentNameKeyChangedError):  # ... as is a third key
        known.verify_or_pin("agt_D", SigningIdentity.generate().public, name="vm")
    # An id that presents one of the name's keys (the same machine re-registered) joins it.
    assert known.verify_or_pin("agt_C", KEY_A, name="vm", addressed_by_id=True) \
        is PinOutcome.FIRST_USE
    assert set(known.pins_for_name("vm")) == {"agt_A", "agt_C"}


def test_a_name_with_no_pin_yet_takes_the_id_it_was_first_reached_by(tmp_path: Path) -> None:
    known = store(tmp_path)
    assert known.verify_or_pin("agt_A", KEY_A, name="vm", addressed_by_id=True) \
        is PinOutcome.FIRST_USE
    assert known.pins_for_name("vm") == {"agt_A": KEY_A}


@pytest.mark.slow
def test_cloned_hosts_called_alike_are_reached_by_id_without_an_alarm(tmp_path: Path) -> None:
    """Two agents enrolled as "vm" (the second is warned at enrollment); by id both run, the
    second with a note that the name is shared; by name the CLI asks for the id."""
    with LocalStack(tmp_path / "stack") as stack:
        first = stack.start("vm")
        second_state = tmp_path / "second-agent"
        enrolled = subprocess.run(
            [stack.python, "-m", "agent.main", "enroll", "--server", stack.server_url,
             "--registration-key", stack.create_registration_key(), "--name", "vm",
             "--state-dir", str(second_state), "--ca-file", str(stack.ca_file)],
            capture_output=True, env=stack.cli_env(), timeout=60, check=False,
        )
        assert enrolled.returncode == 0, enrolled.stderr
        warning = enrolled.stderr.decode()
        assert "warning: another agent of this team is already called vm" in warning
        assert first.id in warning and "--name" in warning
        stack.start_agent(second_state, name="second-agent")
        second = wait_for_other_online(stack, "vm", first.id)

        by_first = stack.run_tucdesk("exec", first.id, "--", "true")
        assert by_first.returncode == 0, by_first.stderr
        by_second = stack.run_tucdesk("exec", second.id, "--", "true")
        assert by_second.returncode == 0, by_second.stderr
        said = by_second.stderr.decode()
        assert "WARNING" not in said and "intercepting" not in said
        assert "several agents are called vm" in said and "pinned by agent id" in said
        again = stack.run_tucdesk("exec", second.id, "--", "true")
        assert again.returncode == 0 and b"several agents" not in again.stderr
        assert stack.run_tucdesk("exec", first.id, "--", "true").returncode == 0
        by_name = stack.run_tucdesk("exec", "vm", "--", "true")
        assert by_name.returncode != 0 and b"several agents are called" in by_name.stderr


def wait_for_other_online(stack: LocalStack, name: str, other_than: str) -> AgentInfo:
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        session = Session.from_home(CliHome(stack.cli_home))
        try:
            listed = agents_named(session, name)
        finally:
            session.close()
        for entry in listed:
            if entry["id"] != other_than and entry["online"]:
                return AgentInfo(id=entry["id"], name=entry["name"],
                                 fingerprint=entry["key_fingerprint"], online=True)
        time.sleep(0.2)
    raise AssertionError(f"the second agent called {name!r} did not come online")
