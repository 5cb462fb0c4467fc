"""The rendezvous under sustained load does not run out of open files.

A soak audit found every finished client connection held in CLOSE-WAIT for the 30 s keep-alive
timeout (Hypercorn's trio worker waited for its idle timer after the client had closed), one
file per CLI call; at a few calls a second the default limit of 1024 files was reached, and
then trio logged every failed accept with a traceback ten times a second.
"""

from __future__ import annotations

import http.client
import logging
import resource
import ssl
from pathlib import Path

import pytest
import trio

from relay.fdlimit import raise_open_file_limit_to_hard
from rendezvous.server import (
    ACCEPT_ERROR_LOG_INTERVAL_SECONDS,
    TRIO_ACCEPT_LOGGER,
    AcceptErrorThrottle,
    raise_open_files_for_serving,
)
from tests.rendezvous.live_server import live_service, make_certificate

pytestmark = pytest.mark.anyio

CONNECTIONS = 5
# Far below the keep-alive timeout (30 s): the client's close is what releases the connection.
RELEASE_SECONDS = 3.0
ANSWER_SECONDS = 10
CLOSE_WAIT = "08"
ESTABLISHED = "01"


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


def _server_side_connections(port: int) -> int:
    """Open server-side TCP connections of ``port`` (ESTABLISHED or CLOSE-WAIT), from the
    kernel's table: what holds a file in the serving process."""
    held = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] in (CLOSE_WAIT, ESTABLISHED):
                held += 1
    return held


def _one_keep_alive_request(port: int, ca: Path) -> None:
    """A TLS HTTP/1.1 request on a keep-alive connection with the standard library's client
    (the CLI's), answered, then closed as the CLI closes it when a command ends: a TCP FIN,
    no TLS close_notify."""
    context = ssl.create_default_context(cafile=str(ca))
    connection = http.client.HTTPSConnection(
        "127.0.0.1", port, context=context, timeout=ANSWER_SECONDS
    )
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        response.read()
        assert response.status == 200
        assert not response.will_close  # a keep-alive connection, as the CLI's
    finally:
        connection.close()


async def test_a_client_that_closed_its_tls_connection_is_released_within_seconds(
    tmp_path: Path,
) -> None:
    cert, key = make_certificate(tmp_path / "tls")
    async with live_service(
        tmp_path / "data", f"sqlite:///{tmp_path / 'rv.db'}", tls_cert=cert, tls_key=key
    ) as (url, config):
        port = int(url.rsplit(":", 1)[1])
        for _ in range(CONNECTIONS):
            await trio.to_thread.run_sync(_one_keep_alive_request, port, cert)
        held = _server_side_connections(port)
        with trio.move_on_after(RELEASE_SECONDS):
            while held:
                await trio.sleep(0.05)  # polling the kernel's table: nothing to wait on
                held = _server_side_connections(port)
        assert held == 0, f"{held} closed client connection(s) still held by the server"


def test_the_soft_open_file_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(256, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        raise_open_files_for_serving()
        now_soft, now_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        assert now_hard == hard
        assert now_soft == (hard if hard != resource.RLIM_INFINITY else 65536)
        assert raise_open_file_limit_to_hard()[2] is None
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failed_accepts_are_logged_once_per_interval_with_a_count() -> None:
    clock = _Clock()
    throttle = AcceptErrorThrottle(clock=clock)
    trio_logger = logging.getLogger(TRIO_ACCEPT_LOGGER)
    lines: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record)

    handler = Collect()
    installed = list(trio_logger.filters)  # the live service's own throttle, if one ran
    for existing in installed:
        trio_logger.removeFilter(existing)
    trio_logger.addFilter(throttle)
    trio_logger.addHandler(handler)
    try:
        # 30 s out of files: trio retries (and logs) every 0.1 s, 300 times.
        for _ in range(300):
            try:
                raise OSError(24, "Too many open files")
            except OSError:
                trio_logger.error(
                    "accept returned %s (%s); retrying in %s seconds",
                    "EMFILE", "Too many open files", 0.1, exc_info=True,
                )  # fmt: skip
            clock.now += 0.1
    finally:
        trio_logger.removeFilter(throttle)
        trio_logger.removeHandler(handler)
        for existing in installed:
            trio_logger.addFilter(existing)
    assert len(lines) <= 30 / ACCEPT_ERROR_LOG_INTERVAL_SECONDS + 1
    assert all(record.exc_info is None for record in lines)
    messages = [record.getMessage() for record in lines]
    assert "EMFILE" in messages[0] and "1 time(s)" in messages[0]
    assert "100 time(s)" in messages[1]
    assert sum(int(m.split(" failed ")[1].split(" ")[0]) for m in messages) <= 300
