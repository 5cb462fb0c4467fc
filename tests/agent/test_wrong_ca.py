"""A CA that does not verify the rendezvous's certificate is named at once, not after a timeout."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from agent.control_client import CONNECT_TIMEOUT_SECONDS, ControlClient
from agent.enrollment import EnrollmentRequest, enroll
from agent.websocket_connect import WebSocketTarget, websocket_target
from tests.agent.test_control_client import MACHINE, WAIT_SECONDS, fast_backoff
from tests.agent.test_enroll import registration_key
from tests.rendezvous.live_server import live_service, make_certificate

pytestmark = pytest.mark.anyio

# Well under the WebSocket connect timeout: a refused certificate is known after one round trip.
PROMPT_SECONDS = CONNECT_TIMEOUT_SECONDS / 5
ATTEMPTS = 3


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


class FailureWatch(logging.Handler):
    """Notes the trio time of each "control channel ... is down" warning as it is logged."""

    def __init__(self, wanted: int) -> None:
        super().__init__(logging.WARNING)
        self.times: list[float] = []
        self.messages: list[str] = []
        self.wanted = wanted
        self.enough = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "is down" not in record.getMessage():
            return
        self.times.append(trio.current_time())
        self.messages.append(record.getMessage())
        if len(self.times) >= self.wanted:
            self.enough.set()


async def test_a_wrong_ca_is_named_at_once_and_the_agent_keeps_retrying(tmp_path: Path) -> None:
    store_url = f"sqlite:///{tmp_path / 'rv.db'}"
    cert, key = make_certificate(tmp_path / "tls")
    other_ca, _ = make_certificate(tmp_path / "other")
    async with live_service(tmp_path / "data", store_url, tls_cert=cert, tls_key=key) as (
        url, _,
    ):
        registration, _ = await registration_key(store_url)
        state = await enroll(
            EnrollmentRequest(url, registration, tmp_path / "s" / "agent.state", ca_file=cert),
            MACHINE,
        )
        client = ControlClient(
            state, MACHINE.fingerprint(), lambda offer: None, ca_file=other_ca,
            backoff=fast_backoff(),
        )
        watch = FailureWatch(ATTEMPTS)
        control_logger = logging.getLogger("tucdesk.agent.control")
        control_logger.addHandler(watch)
        try:
            async with trio.open_nursery() as nursery:
                started = trio.current_time()
                nursery.start_soon(client.run)
                with trio.move_on_after(WAIT_SECONDS):
                    await watch.enough.wait()
                nursery.cancel_scope.cancel()
        finally:
            control_logger.removeHandler(watch)
    assert watch.times, f"the TLS failure was not named in {WAIT_SECONDS} s"
    first = watch.times[0] - started
    assert first < PROMPT_SECONDS, f"the TLS failure took {first:.1f} s to be named"
    assert len(watch.times) >= ATTEMPTS, f"{len(watch.times)} attempts in {WAIT_SECONDS} s"
    # Each retry (the normal backoff) fails as promptly, and says the same.
    gaps = [later - earlier for earlier, later in zip(watch.times, watch.times[1:], strict=False)]
    assert all(gap < PROMPT_SECONDS for gap in gaps), gaps
    assert client.last_error is not None
    assert client.last_error.startswith("TLS: certificate verify failed: "), client.last_error
    assert client.last_error.endswith(
        "is --ca-file the CA that signed the rendezvous certificate?"
    )
    assert all(client.last_error in message for message in watch.messages), watch.messages


@pytest.mark.parametrize(
    ("url", "host", "port", "host_header", "resource"),
    [
        ("wss://rv.example/v1/agents/connect", "rv.example", 443, "rv.example",
         "/v1/agents/connect"),
        ("wss://rv.example:443/x", "rv.example", 443, "rv.example", "/x"),
        ("ws://127.0.0.1:8080", "127.0.0.1", 8080, "127.0.0.1:8080", "/"),
        ("wss://[::1]:8443/a?b=c", "::1", 8443, "[::1]:8443", "/a?b=c"),
    ],
)
def test_websocket_url_is_split_as_trio_websocket_would(
    url: str, host: str, port: int, host_header: str, resource: str
) -> None:
    assert websocket_target(url) == WebSocketTarget(host, port, host_header, resource)


@pytest.mark.parametrize("url", ["https://rv.example/", "wss:///path"])
def test_a_url_that_is_not_a_websocket_url_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        websocket_target(url)
