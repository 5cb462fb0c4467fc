"""Re-enrolling (``enroll --force``) against a private CA trusts the CA copy the first
enrollment saved, so the host needs neither the original CA file nor --ca-file again."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from agent.config import AgentConfig
from agent.enrollment import SAVED_CA_FILE_NAME, EnrollmentRequest, enroll, same_origin
from agent.errors import EnrollmentError
from agent.main import adopt_enrollment_ca
from agent.main import main as agent_main
from agent.state_file import AgentState, load_state, save_state
from tests.agent.test_control_client import MACHINE
from tests.agent.test_enroll import registration_key
from tests.rendezvous.live_server import live_service, make_certificate

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


async def test_enroll_force_without_ca_file_trusts_the_saved_ca_copy(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    cert, key = make_certificate(tmp_path / "tls")
    given = tmp_path / "given-ca.pem"
    given.write_bytes(cert.read_bytes())
    state_file = tmp_path / "state" / "agent.state"
    async with live_service(tmp_path / "data", store_url, tls_cert=cert, tls_key=key) as (
        url, _,
    ):  # fmt: skip
        first_key, _ = await registration_key(store_url)
        first = await enroll(EnrollmentRequest(url, first_key, state_file, ca_file=given), MACHINE)
        given.unlink()  # the admin deleted the file they enrolled with
        second_key, _ = await registration_key(store_url)
        second = await enroll(EnrollmentRequest(url, second_key, state_file, force=True), MACHINE)
    assert second.agent_id != first.agent_id
    copy = state_file.parent / SAVED_CA_FILE_NAME
    assert copy.read_bytes() == cert.read_bytes()
    assert load_state(state_file, MACHINE).ca_file == str(copy.resolve())


async def test_enroll_force_to_another_server_does_not_trust_the_old_servers_ca_copy(
    tmp_path: Path,
) -> None:
    # One rendezvous reached as 127.0.0.1 and then as localhost stands in for two servers: the
    # copy saved for the first would verify the second, and must not be used for it.
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    cert, key = make_certificate(tmp_path / "tls")
    state_file = tmp_path / "state" / "agent.state"
    async with live_service(tmp_path / "data", store_url, tls_cert=cert, tls_key=key) as (
        url, _,
    ):  # fmt: skip
        first_key, _ = await registration_key(store_url)
        await enroll(EnrollmentRequest(url, first_key, state_file, ca_file=cert), MACHINE)
        other_server = url.replace("127.0.0.1", "localhost")
        second_key, _ = await registration_key(store_url)
        with pytest.raises(EnrollmentError) as refused:
            await enroll(
                EnrollmentRequest(other_server, second_key, state_file, force=True), MACHINE
            )
    message = str(refused.value)
    assert f"{SAVED_CA_FILE_NAME} was not used: it was saved for {url}" in message
    assert "--ca-file" in message
    assert load_state(state_file, MACHINE).server_url == url  # the old enrollment stands


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ("https://rv.example:443", "https://RV.example/", True),
        ("https://rv.example", "https://rv.example.:443", True),
        ("https://rv.example:8443", "https://rv.example", False),
        ("https://rv.example", "https://rv2.example", False),
        ("http://127.0.0.1:80", "https://127.0.0.1:80", False),
    ],
)
def test_same_origin_compares_scheme_host_and_port(first: str, second: str, same: bool) -> None:
    assert same_origin(first, second) is same


async def test_enroll_without_force_does_not_pick_up_a_ca_copy_lying_in_the_state_dir(
    tmp_path: Path,
) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    cert, key = make_certificate(tmp_path / "tls")
    state_file = tmp_path / "state" / "agent.state"
    state_file.parent.mkdir(mode=0o700)
    (state_file.parent / SAVED_CA_FILE_NAME).write_bytes(cert.read_bytes())
    async with live_service(tmp_path / "data", store_url, tls_cert=cert, tls_key=key) as (
        url, _,
    ):  # fmt: skip
        registration, _ = await registration_key(store_url)
        with pytest.raises(EnrollmentError, match="--ca-file"):
            await enroll(EnrollmentRequest(url, registration, state_file), MACHINE)


def test_enroll_help_says_force_reuses_the_saved_ca(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        agent_main(["enroll", "--help"], environ={})
    # argparse wraps lines at hyphens too: join the words back.
    help_text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")
    assert f"the CA copy the last enrollment saved, STATE_DIR/{SAVED_CA_FILE_NAME}" in help_text


def test_run_adopts_the_ca_file_an_older_enrollment_only_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # State as a release before the CA copy wrote it: the path given at enrollment, no copy.
    cert, _ = make_certificate(tmp_path / "tls")
    given = tmp_path / "given-ca.pem"
    given.write_bytes(cert.read_bytes())
    config = AgentConfig(state_dir=tmp_path / "state")
    config.state_dir.mkdir(mode=0o700)
    older = AgentState(
        agent_id="agt_older", team_id="tm_t", server_url="https://127.0.0.1:1",
        identity_seed=b"\x01" * 32, ca_file=str(given),
    )  # fmt: skip
    save_state(config.state_file, older, MACHINE)
    with caplog.at_level(logging.INFO, logger="tucdesk.agent"):
        adopted = adopt_enrollment_ca(config, load_state(config.state_file, MACHINE), MACHINE)
    copy = (config.state_dir / SAVED_CA_FILE_NAME).resolve()
    assert adopted.ca_file == str(copy)
    assert copy.read_bytes() == cert.read_bytes()
    assert copy.stat().st_mode & 0o777 == 0o600
    assert load_state(config.state_file, MACHINE).ca_file == str(copy)  # kept across restarts
    assert f"copied the CA file given at enrollment, {given}" in caplog.text
    given.unlink()  # the admin tidies up: the agent no longer needs it
    again = adopt_enrollment_ca(config, load_state(config.state_file, MACHINE), MACHINE)
    assert again.ca_file == str(copy)


def test_run_keeps_trusting_the_named_ca_file_when_it_cannot_copy_it(tmp_path: Path) -> None:
    config = AgentConfig(state_dir=tmp_path / "state")
    config.state_dir.mkdir(mode=0o700)
    missing = tmp_path / "gone-ca.pem"
    older = AgentState(
        agent_id="agt_older", team_id="tm_t", server_url="https://127.0.0.1:1",
        identity_seed=b"\x01" * 32, ca_file=str(missing),
    )  # fmt: skip
    save_state(config.state_file, older, MACHINE)
    state = adopt_enrollment_ca(config, load_state(config.state_file, MACHINE), MACHINE)
    assert state.ca_file == str(missing)  # run's own check then names the missing file
    assert not (config.state_dir / SAVED_CA_FILE_NAME).exists()
