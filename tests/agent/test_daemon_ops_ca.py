"""The rendezvous CA as hosts live with it: enrollment keeps its own copy, and the agent reads
it again at every connection attempt, so a CA appended to it is trusted without a restart."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
import trio

from agent.control_client import ControlClient
from agent.enrollment import SAVED_CA_FILE_NAME, EnrollmentRequest, enroll
from agent.errors import EnrollmentError
from agent.main import main as agent_main
from agent.state_file import load_state
from tests.agent.test_control_client import MACHINE, WAIT_SECONDS, daemon_options, fast_backoff
from tests.agent.test_enroll import registration_key
from tests.rendezvous.live_server import live_service, make_certificate

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


async def wait_for_error(client: ControlClient, words: str) -> str:
    """The client's last error once it contains ``words`` (set by its reconnect loop)."""
    with trio.fail_after(WAIT_SECONDS):
        while client.last_error is None or words not in client.last_error:  # noqa: ASYNC110
            await trio.sleep(0.02)
    return client.last_error


def loopback_certificate(
    directory: Path,
    common_name: str,
    *,
    valid_from: datetime.timedelta = datetime.timedelta(minutes=-5),
    valid_until: datetime.timedelta = datetime.timedelta(days=1),
) -> tuple[Path, Path]:
    """A self-signed CA certificate for 127.0.0.1 named ``common_name`` (CA files here hold
    several, which OpenSSL tells apart by name); returns (cert, key) paths."""
    return make_certificate(
        directory, common_name=common_name, valid_from=valid_from, valid_until=valid_until
    )


def write_file(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def append_to_file(path: Path, data: bytes) -> None:
    with path.open("ab") as appending:
        appending.write(data)


def remove_file(path: Path) -> None:
    path.unlink()


async def test_enroll_keeps_its_own_copy_of_the_ca_so_moving_the_original_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    cert, key = make_certificate(tmp_path / "tls")
    given = tmp_path / "given-ca.pem"
    given.write_bytes(cert.read_bytes())
    state_dir = tmp_path / "state"
    async with live_service(tmp_path / "data", store_url, tls_cert=cert, tls_key=key) as (
        url, _,
    ):  # fmt: skip
        registration, _ = await registration_key(store_url)
        await enroll(
            EnrollmentRequest(url, registration, state_dir / "agent.state", ca_file=given),
            MACHINE,
        )
        copy = state_dir / SAVED_CA_FILE_NAME
        assert copy.read_bytes() == cert.read_bytes()
        assert stat.S_IMODE(copy.stat().st_mode) == 0o600
        given.unlink()  # the admin tidies up the file they enrolled with
        state = load_state(state_dir / "agent.state", MACHINE)
        assert state.ca_file == str(copy.resolve())
        client = ControlClient(state, MACHINE.fingerprint(), lambda offer: None)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            with trio.fail_after(WAIT_SECONDS):
                await client.wait_connected()
            nursery.cancel_scope.cancel()
    common, _ = daemon_options(tmp_path, state_dir)
    agent_main(["check", *common], environ={})
    out = capsys.readouterr().out
    assert f"{copy.resolve()} (the copy saved at enrollment)" in out
    assert agent_main(["status", *common], environ={}) == 3
    assert f"CA file:      {copy.resolve()} (the copy saved at enrollment)" in (
        capsys.readouterr().out
    )


async def test_a_ca_file_without_a_certificate_is_refused_before_the_key_is_spent(
    tmp_path: Path,
) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    cert, key = make_certificate(tmp_path / "tls")
    not_pem = tmp_path / "key-by-mistake.pem"
    not_pem.write_bytes(key.read_bytes())
    async with live_service(tmp_path / "data", store_url, tls_cert=cert, tls_key=key) as (
        url, _,
    ):  # fmt: skip
        registration, _ = await registration_key(store_url)
        state_file = tmp_path / "state" / "agent.state"
        with pytest.raises(EnrollmentError, match="holds no PEM certificate"):
            await enroll(EnrollmentRequest(url, registration, state_file, ca_file=not_pem), MACHINE)
        assert not state_file.exists()
        await enroll(EnrollmentRequest(url, registration, state_file, ca_file=cert), MACHINE)


async def test_a_ca_appended_to_the_agents_ca_file_is_trusted_at_the_next_reconnect(
    tmp_path: Path,
) -> None:
    """Rolling the rendezvous CA: the rendezvous already has a certificate from a CA the agent
    does not trust yet; appending that CA to the agent's CA file is enough, no restart. A file
    that cannot be read meanwhile fails attempts with the reason, never the daemon."""
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    new_cert, new_key = loopback_certificate(tmp_path / "new", "rendezvous CA 2027")
    old_ca, _ = loopback_certificate(tmp_path / "old", "rendezvous CA 2026")
    async with live_service(tmp_path / "data", store_url, tls_cert=new_cert, tls_key=new_key) as (
        url, _,
    ):  # fmt: skip
        registration, _ = await registration_key(store_url)
        state = await enroll(
            EnrollmentRequest(url, registration, tmp_path / "s" / "agent.state", ca_file=new_cert),
            MACHINE,
        )
        ca_file = Path(state.ca_file or "")
        write_file(ca_file, old_ca.read_bytes())  # as before the roll: only the old CA
        client = ControlClient(
            state, MACHINE.fingerprint(), lambda offer: None, backoff=fast_backoff()
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            await wait_for_error(client, "certificate verify failed")
            remove_file(ca_file)
            error = await wait_for_error(client, "cannot load the CA file")
            assert error.startswith(str(ca_file)), error
            write_file(ca_file, old_ca.read_bytes())
            await wait_for_error(client, "certificate verify failed")
            append_to_file(ca_file, new_cert.read_bytes())  # in place, as admins do
            with trio.fail_after(WAIT_SECONDS):
                await client.wait_connected()
            nursery.cancel_scope.cancel()
