"""Known agents: pin on first use, refuse a changed key loudly, replace only by explicit trust."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from operator_cli.known_agents import (
    MAX_KNOWN_AGENTS_FILE_SIZE,
    AgentKeyChangedError,
    AgentNameKeyChangedError,
    KnownAgents,
    KnownAgentsError,
    PinOutcome,
)
from protocol.identity import SigningIdentity, b64url

FIRST_KEY = SigningIdentity.generate().public
SECOND_KEY = SigningIdentity.generate().public
THIRD_KEY = SigningIdentity.generate().public
SERVER = "https://rendezvous.example:8443"


def store(tmp_path: Path) -> KnownAgents:
    return KnownAgents.in_home(tmp_path / "cli-home")


def test_first_contact_pins_the_key(tmp_path: Path) -> None:
    known = store(tmp_path)
    assert known.verify_or_pin("agt_1", FIRST_KEY) is PinOutcome.FIRST_USE
    assert known.pinned_key("agt_1") == FIRST_KEY


def test_the_same_key_later_matches(tmp_path: Path) -> None:
    store(tmp_path).verify_or_pin("agt_1", FIRST_KEY)
    assert store(tmp_path).verify_or_pin("agt_1", FIRST_KEY) is PinOutcome.MATCHED


def test_a_changed_key_is_refused_naming_both_fingerprints_and_the_fix(tmp_path: Path) -> None:
    known = store(tmp_path)
    known.verify_or_pin("agt_1", FIRST_KEY)
    with pytest.raises(AgentKeyChangedError) as caught:
        known.verify_or_pin("agt_1", SECOND_KEY)
    message = str(caught.value)
    assert FIRST_KEY.fingerprint in message
    assert SECOND_KEY.fingerprint in message
    assert "tucdesk agents trust agt_1" in message
    assert known.pinned_key("agt_1") == FIRST_KEY


def test_trust_replaces_the_pin(tmp_path: Path) -> None:
    known = store(tmp_path)
    known.verify_or_pin("agt_1", FIRST_KEY)
    assert known.trust("agt_1", SECOND_KEY) == FIRST_KEY
    assert known.verify_or_pin("agt_1", SECOND_KEY) is PinOutcome.MATCHED
    with pytest.raises(AgentKeyChangedError):
        known.verify_or_pin("agt_1", FIRST_KEY)


def test_pins_for_different_agents_are_independent(tmp_path: Path) -> None:
    known = store(tmp_path)
    known.verify_or_pin("agt_1", FIRST_KEY)
    known.verify_or_pin("agt_2", SECOND_KEY)
    assert known.all_pins() == {"agt_1": FIRST_KEY, "agt_2": SECOND_KEY}
    assert known.forget("agt_1") is True
    assert known.forget("agt_1") is False
    assert known.all_pins() == {"agt_2": SECOND_KEY}


def test_file_is_0600_and_holds_no_temporary_leftovers(tmp_path: Path) -> None:
    known = store(tmp_path)
    known.verify_or_pin("agt_1", FIRST_KEY)
    assert stat.S_IMODE(known.path.stat().st_mode) == 0o600
    leftovers = [path.name for path in known.path.parent.iterdir() if ".tmp" in path.name]
    assert leftovers == []


def test_garbage_file_gives_a_clear_error(tmp_path: Path) -> None:
    known = store(tmp_path)
    known.path.parent.mkdir(parents=True)
    known.path.write_bytes(b"\x00\xffnot json")
    known.path.chmod(0o600)
    with pytest.raises(KnownAgentsError, match="not a readable known-agents file"):
        known.verify_or_pin("agt_1", FIRST_KEY)


@pytest.mark.parametrize(
    "document",
    [
        [],
        {"version": 3, "agents": {}},
        {"version": 2, "agents": {}},
        {"version": 2, "agents": {}, "names": []},
        {"version": 2, "agents": {}, "names": {SERVER: {"vm": "agt_1"}}},
        {"version": 2, "agents": {}, "names": {SERVER: {"bad name!": ["agt_1"]}}},
        {"version": 2, "agents": {}, "names": {SERVER: {"vm": ["bad id!"]}}},
        {"version": 1, "agents": []},
        {"version": 1, "agents": {"agt_1": {"public_key": "AAAA"}}},
        {"version": 1, "agents": {"bad id!": {"public_key": "AAAA"}}},
        {"version": 1, "agents": {"agt_1": "key"}},
    ],
)
def test_malformed_documents_are_refused(tmp_path: Path, document: object) -> None:
    known = store(tmp_path)
    known.path.parent.mkdir(parents=True)
    known.path.write_text(json.dumps(document))
    known.path.chmod(0o600)
    with pytest.raises(KnownAgentsError):
        known.all_pins()


def test_oversized_file_is_refused(tmp_path: Path) -> None:
    known = store(tmp_path)
    known.path.parent.mkdir(parents=True)
    known.path.write_bytes(b" " * (MAX_KNOWN_AGENTS_FILE_SIZE + 1))
    known.path.chmod(0o600)
    with pytest.raises(KnownAgentsError, match="larger than"):
        known.all_pins()


def test_file_others_can_write_is_refused(tmp_path: Path) -> None:
    known = store(tmp_path)
    known.verify_or_pin("agt_1", FIRST_KEY)
    known.path.chmod(0o666)
    with pytest.raises(KnownAgentsError, match="chmod 600"):
        known.verify_or_pin("agt_1", FIRST_KEY)


def test_malformed_agent_ids_are_refused(tmp_path: Path) -> None:
    with pytest.raises(KnownAgentsError):
        store(tmp_path).verify_or_pin("../etc/passwd", FIRST_KEY)


def named_store(tmp_path: Path, server: str = SERVER) -> KnownAgents:
    return KnownAgents.in_home(tmp_path / "cli-home", server)


def test_a_new_id_with_another_key_under_a_pinned_name_is_refused_naming_both(
    tmp_path: Path,
) -> None:
    known = named_store(tmp_path)
    assert known.verify_or_pin("agt_old", FIRST_KEY, name="vm") is PinOutcome.FIRST_USE
    with pytest.raises(AgentNameKeyChangedError) as caught:
        known.verify_or_pin("agt_new", SECOND_KEY, name="vm")
    assert isinstance(caught.value, AgentKeyChangedError)  # refused wherever a change is
    message = str(caught.value)
    for part in ("vm", "agt_old", "agt_new", FIRST_KEY.fingerprint, SECOND_KEY.fingerprint,
                 "tucdesk agents trust vm\n"):
        assert part in message
    assert known.pinned_key("agt_new") is None
    assert known.pins_for_name("vm") == {"agt_old": FIRST_KEY}


def test_the_same_key_under_a_new_id_is_accepted_and_moves_the_name(tmp_path: Path) -> None:
    known = named_store(tmp_path)
    known.verify_or_pin("agt_old", FIRST_KEY, name="vm")
    assert known.verify_or_pin("agt_new", FIRST_KEY, name="vm") is PinOutcome.NEW_ID_SAME_KEY
    assert known.pins_for_name("vm") == {"agt_new": FIRST_KEY}
    assert known.verify_or_pin("agt_new", FIRST_KEY, name="vm") is PinOutcome.MATCHED
    with pytest.raises(AgentNameKeyChangedError):
        known.verify_or_pin("agt_third", SECOND_KEY, name="vm")


def test_a_known_agent_under_a_name_pinned_to_another_is_refused(tmp_path: Path) -> None:
    known = named_store(tmp_path)
    known.verify_or_pin("agt_1", FIRST_KEY, name="vm")
    known.verify_or_pin("agt_2", SECOND_KEY, name="db")
    with pytest.raises(AgentNameKeyChangedError):
        known.verify_or_pin("agt_2", SECOND_KEY, name="vm")  # db's agent handed out as vm


def test_names_are_pinned_per_server(tmp_path: Path) -> None:
    named_store(tmp_path).verify_or_pin("agt_1", FIRST_KEY, name="vm")
    other = named_store(tmp_path, "https://elsewhere.example")
    assert other.verify_or_pin("agt_2", SECOND_KEY, name="vm") is PinOutcome.FIRST_USE
    with pytest.raises(AgentNameKeyChangedError):
        named_store(tmp_path).verify_or_pin("agt_3", THIRD_KEY, name="vm")


def test_trust_pins_the_name_to_the_id_keeping_only_agents_still_listed(tmp_path: Path) -> None:
    known = named_store(tmp_path)
    known.verify_or_pin("agt_old", FIRST_KEY, name="vm")
    assert known.trust("agt_new", SECOND_KEY, name="vm", keep={"agt_new"}) is None
    assert known.pins_for_name("vm") == {"agt_new": SECOND_KEY}
    assert known.verify_or_pin("agt_new", SECOND_KEY, name="vm") is PinOutcome.MATCHED
    with pytest.raises(AgentNameKeyChangedError):
        known.verify_or_pin("agt_old", FIRST_KEY, name="vm")  # removed, so no longer accepted
    known.trust("agt_twin", THIRD_KEY, name="vm", keep={"agt_new", "agt_twin"})
    assert known.pins_for_name("vm") == {"agt_new": SECOND_KEY, "agt_twin": THIRD_KEY}
    assert known.verify_or_pin("agt_new", SECOND_KEY, name="vm") is PinOutcome.MATCHED


def test_an_id_only_file_keeps_working_and_is_rewritten_with_names(tmp_path: Path) -> None:
    known = named_store(tmp_path)
    known.path.parent.mkdir(parents=True)
    old_form = {"version": 1, "agents": {"agt_1": {"public_key": b64url(FIRST_KEY.raw)}}}
    known.path.write_text(json.dumps(old_form))
    known.path.chmod(0o600)
    assert known.pinned_key("agt_1") == FIRST_KEY
    with pytest.raises(AgentKeyChangedError):
        known.verify_or_pin("agt_1", SECOND_KEY, name="vm")
    assert known.verify_or_pin("agt_1", FIRST_KEY, name="vm") is PinOutcome.MATCHED
    document = json.loads(known.path.read_text())
    assert document["version"] == 2
    assert document["agents"] == old_form["agents"]
    assert document["names"] == {SERVER: {"vm": ["agt_1"]}}
    assert stat.S_IMODE(known.path.stat().st_mode) == 0o600
    with pytest.raises(AgentNameKeyChangedError):
        known.verify_or_pin("agt_2", SECOND_KEY, name="vm")


@pytest.mark.parametrize("spelling", ["https://RENDEZVOUS.example:8443/",
                                      "HTTPS://rendezvous.example:8443"])
def test_a_name_pin_holds_for_every_spelling_of_the_same_server(
    tmp_path: Path, spelling: str
) -> None:
    named_store(tmp_path).verify_or_pin("agt_1", FIRST_KEY, name="vm")
    with pytest.raises(AgentNameKeyChangedError):
        named_store(tmp_path, spelling).verify_or_pin("agt_2", SECOND_KEY, name="vm")


def test_a_default_port_spelled_out_is_the_same_server(tmp_path: Path) -> None:
    named_store(tmp_path, "https://rv.example").verify_or_pin("agt_1", FIRST_KEY, name="vm")
    with pytest.raises(AgentNameKeyChangedError):
        named_store(tmp_path, "https://rv.example:443").verify_or_pin(
            "agt_2", SECOND_KEY, name="vm")


def test_name_pins_written_under_a_raw_server_spelling_are_read_through_the_normal_form(
    tmp_path: Path,
) -> None:
    home = tmp_path / "cli-home"
    home.mkdir()
    path = home / "known_agents.json"
    path.write_text(json.dumps({
        "version": 2,
        "agents": {"agt_1": {"public_key": b64url(FIRST_KEY.raw)}},
        "names": {"https://RV.example:443/": {"vm": ["agt_1"]}},
    }))
    path.chmod(0o600)
    known = named_store(tmp_path, "https://rv.example")
    assert known.pins_for_name("vm") == {"agt_1": FIRST_KEY}
    with pytest.raises(AgentNameKeyChangedError):
        known.verify_or_pin("agt_2", SECOND_KEY, name="vm")
