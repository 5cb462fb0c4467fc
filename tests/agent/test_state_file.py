"""The machine-bound, encrypted agent state file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.machine_identity import MachineIdentifiers
from agent.state_file import (
    HEADER_SIZE,
    MAX_STATE_FILE_SIZE,
    AgentState,
    StateFileCorruptError,
    StateFileError,
    StateFileMachineMismatchError,
    load_state,
    open_state,
    save_state,
    seal_state,
)
from protocol.identity import SigningIdentity

THIS_MACHINE = MachineIdentifiers("3d1219c7c4c5404aaa1f6d2a48adfda4", None, ("aa:bb:cc:dd:ee:01",))
OTHER_MACHINE = MachineIdentifiers("0123456789abcdef0123456789abcdef", None, ("aa:bb:cc:dd:ee:01",))
SEED = bytes(range(32))


def sample_state() -> AgentState:
    return AgentState(
        agent_id="agt_123",
        team_id="team_9",
        server_url="https://rendezvous.example:8443",
        identity_seed=SEED,
        name="build-01",
        tags=("linux", "ci"),
        ca_file="/etc/tucdesk/ca.pem",
        ca_pin="sha256/abc",
        service_keys={"keys": [{"kid": "k1", "kty": "OKP", "crv": "Ed25519", "x": "AAAA"}]},
        extra={"policy_version": 3},
    )


def test_state_round_trips_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.state"
    save_state(path, sample_state(), THIS_MACHINE)
    assert load_state(path, THIS_MACHINE) == sample_state()


def test_state_file_is_created_0600(tmp_path: Path) -> None:
    path = tmp_path / "agent.state"
    save_state(path, sample_state(), THIS_MACHINE)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_identity_seed_is_not_in_the_file_or_the_repr(tmp_path: Path) -> None:
    path = tmp_path / "agent.state"
    save_state(path, sample_state(), THIS_MACHINE)
    assert SEED not in path.read_bytes()
    assert b"agt_123" not in path.read_bytes()
    assert "identity_seed" not in repr(sample_state())
    assert SEED.hex() not in repr(sample_state())


def test_identity_comes_back_from_the_seed() -> None:
    identity = SigningIdentity.generate()
    state = AgentState("a", "t", "https://x", identity_seed=identity.seed())
    assert state.identity().public == identity.public


def test_state_from_another_machine_is_refused_with_a_re_enroll_message(tmp_path: Path) -> None:
    path = tmp_path / "agent.state"
    save_state(path, sample_state(), THIS_MACHINE)
    with pytest.raises(StateFileMachineMismatchError) as caught:
        load_state(path, OTHER_MACHINE)
    message = str(caught.value)
    assert "another machine" in message
    assert "re-enroll" in message


def test_tampered_byte_anywhere_is_refused(tmp_path: Path) -> None:
    sealed = seal_state(sample_state(), THIS_MACHINE)
    for position in range(len(sealed)):
        tampered = bytearray(sealed)
        tampered[position] ^= 0x01
        with pytest.raises(StateFileError):
            open_state(bytes(tampered), THIS_MACHINE)


def test_tampered_ciphertext_is_reported_as_damaged_not_as_another_machine() -> None:
    sealed = bytearray(seal_state(sample_state(), THIS_MACHINE))
    sealed[HEADER_SIZE + 3] ^= 0x80
    with pytest.raises(StateFileCorruptError, match="damaged or modified"):
        open_state(bytes(sealed), THIS_MACHINE)


def test_truncated_file_is_refused_clearly() -> None:
    sealed = seal_state(sample_state(), THIS_MACHINE)
    with pytest.raises(StateFileCorruptError, match="truncated"):
        open_state(sealed[: HEADER_SIZE + 4], THIS_MACHINE)
    with pytest.raises(StateFileCorruptError):
        open_state(sealed[:-1], THIS_MACHINE)


def test_garbage_is_not_a_state_file() -> None:
    with pytest.raises(StateFileCorruptError, match="not a TucDesk agent state file"):
        open_state(b"{\"agent_id\": \"x\"}", THIS_MACHINE)


def test_oversized_file_is_refused_without_decrypting(tmp_path: Path) -> None:
    path = tmp_path / "agent.state"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"TUCSTATE" + b"\x00" * (MAX_STATE_FILE_SIZE + 10))
    os.close(fd)
    with pytest.raises(StateFileCorruptError, match="larger than"):
        load_state(path, THIS_MACHINE)


def test_group_readable_state_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.state"
    save_state(path, sample_state(), THIS_MACHINE)
    path.chmod(0o640)
    with pytest.raises(StateFileError, match="chmod 600"):
        load_state(path, THIS_MACHINE)


def test_missing_state_file_says_to_enroll(tmp_path: Path) -> None:
    with pytest.raises(StateFileError, match="enroll"):
        load_state(tmp_path / "absent.state", THIS_MACHINE)


def test_each_save_uses_a_fresh_salt_and_nonce() -> None:
    assert seal_state(sample_state(), THIS_MACHINE) != seal_state(sample_state(), THIS_MACHINE)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_give_a_state_file_error_never_a_crash(data: bytes) -> None:
    with pytest.raises(StateFileError):
        open_state(b"TUCSTATE\x01" + data, THIS_MACHINE)


@settings(max_examples=50, deadline=None)
@given(
    tags=st.lists(st.text(max_size=20), max_size=5),
    extra=st.dictionaries(st.text(max_size=10), st.integers() | st.text(max_size=10), max_size=5),
)
def test_any_tags_and_extra_fields_round_trip(tags: list[str], extra: dict[str, object]) -> None:
    state = AgentState("a", "t", "https://x", identity_seed=SEED, tags=tuple(tags), extra=extra)
    assert open_state(seal_state(state, THIS_MACHINE), THIS_MACHINE) == state
