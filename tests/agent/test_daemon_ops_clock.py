"""A host clock that is wrong is named as the cause, with its remedy, in what the agent logs:
the rendezvous's skew refusal and a certificate outside its validity dates."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import re
import ssl
import time
from pathlib import Path

import pytest
import trio

from agent.connection_failure import describe_connection_failure
from agent.control_client import ControlClient
from agent.enrollment import EnrollmentRequest, enroll
from agent.state_file import AgentState
from tests.agent.test_control_client import MACHINE, WAIT_SECONDS, enrolled_agent, fast_backoff
from tests.agent.test_daemon_ops_ca import loopback_certificate, wait_for_error
from tests.agent.test_enroll import registration_key
from tests.rendezvous.live_server import live_service

pytestmark = pytest.mark.anyio
SKEW = 600  # the auditor's host: 10 minutes off


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


async def failure_with_clock(state: AgentState, offset: float) -> str:
    """The error a client whose clock is ``offset`` s off reports after its first refusal."""
    client = ControlClient(
        state, MACHINE.fingerprint(), lambda offer: None, backoff=fast_backoff(),
        clock=lambda: time.time() + offset,
    )  # fmt: skip
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        error = await wait_for_error(client, "")
        nursery.cancel_scope.cancel()
    return error


@pytest.mark.parametrize(("offset", "way"), [(SKEW, "ahead of"), (-SKEW, "behind")])
async def test_a_skewed_host_clock_is_named_with_its_remedy_in_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, offset: int, way: str
) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    async with live_service(tmp_path / "data", store_url) as (url, _):
        state = await enrolled_agent(url, store_url, tmp_path / "state")
        with caplog.at_level(logging.WARNING, "tucdesk.agent.control"):
            error = await failure_with_clock(state, offset)
    # The measured skew is the offset give or take a second of the test's own timing.
    expected = re.compile(
        rf"the rendezvous refused this agent's authentication: the host clock is "
        rf"({SKEW - 1}|{SKEW}|{SKEW + 1}) s {way} the rendezvous's; check NTP "
        r"\(timedatectl / chronyc tracking\)"
    )
    assert expected.fullmatch(error), error
    assert any(expected.search(record.getMessage()) for record in caplog.records)


async def test_a_certificate_not_yet_valid_points_at_the_host_clock_not_the_ca(
    tmp_path: Path,
) -> None:
    """As a host whose clock is a day behind sees a good certificate."""
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    good, good_key = loopback_certificate(tmp_path / "good", "rendezvous CA")
    dated, dated_key = loopback_certificate(
        tmp_path / "dated", "rendezvous CA", valid_from=datetime.timedelta(days=1),
        valid_until=datetime.timedelta(days=2),
    )  # fmt: skip
    async with live_service(tmp_path / "data", store_url, tls_cert=good, tls_key=good_key) as (
        url, _,
    ):  # fmt: skip
        registration, _ = await registration_key(store_url)
        state = await enroll(
            EnrollmentRequest(url, registration, tmp_path / "s" / "agent.state", ca_file=good),
            MACHINE,
        )
    async with live_service(tmp_path / "data", store_url, tls_cert=dated, tls_key=dated_key) as (
        url, _,
    ):  # fmt: skip
        (tmp_path / "s" / "rendezvous-ca.pem").write_bytes(dated.read_bytes())
        moved = dataclasses.replace(state, server_url=url)  # the rendezvous's new port
        with trio.fail_after(WAIT_SECONDS):
            error = await failure_with_clock(moved, 0)
    assert error.startswith("TLS: certificate verify failed: certificate "), error
    assert "not yet valid" in error, error
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    assert f"this host's clock reads {now}" in error, error
    assert "check NTP (timedatectl / chronyc tracking)" in error
    assert "--ca-file" not in error


def test_an_expired_certificate_points_at_the_host_clock_too() -> None:
    # The rendezvous refuses to serve an expired certificate, so a host clock a day ahead is
    # what makes a live one look expired: the error OpenSSL raises then, as it raises it.
    expired = ssl.SSLCertVerificationError(1, "certificate verify failed")
    expired.verify_message = "certificate has expired"
    error = describe_connection_failure(
        expired, "/var/lib/tucdesk-agent/rendezvous-ca.pem", clock=lambda: 1_800_000_000.0
    )
    assert error == (
        "TLS: certificate verify failed: certificate has expired — this host's clock reads "
        "2027-01-15 08:00:00 UTC; if that is wrong, the clock is the cause: check NTP "
        "(timedatectl / chronyc tracking)"
    )
    other = ssl.SSLCertVerificationError(1, "certificate verify failed")
    other.verify_message = "self-signed certificate"
    assert describe_connection_failure(other, "/ca.pem").endswith(
        "is --ca-file the CA that signed the rendezvous certificate?"
    )
