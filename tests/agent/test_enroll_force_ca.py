"""Re-enrolling (``enroll --force``) against a private CA trusts the CA copy the first
enrollment saved, so the host needs neither the original CA file nor --ca-file again."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.enrollment import SAVED_CA_FILE_NAME, EnrollmentRequest, enroll, same_origin
from agent.errors import EnrollmentError
from agent.main import main as agent_main
from agent.state_file import load_state
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
