"""The rendezvous speaks HTTP/1.1 only: an HTTP/2 client cannot reach Hypercorn's HTTP/2 code.

Hypercorn 0.18's HTTP/2 protocol raises KeyError when body data arrives for a stream it has
already answered (an early 413, or any route that answers without reading a body), and under
the trio worker that error ends the whole server: one unauthenticated request stopped every
agent's control channel. Its clients (the CLI, agents' WebSockets) all speak HTTP/1.1.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trio

from tests.rendezvous.live_server import live_service, make_certificate

pytestmark = pytest.mark.anyio

ANSWER_SECONDS = 10
BODY_CHUNK = b"a" * 16_000
# Larger than the service's body limit (64 KiB), so it answers 413 before the body is in.
DECLARED_BODY_BYTES = 200_000


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on trio, the project's concurrency library."""
    return "trio"


def _client_context(ca: Path, alpn: list[str] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


async def _http2_oversized_post(stream: trio.abc.Stream) -> None:
    """HTTP/2 with prior knowledge: an oversized POST, its answer read, then more body sent."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    connection.send_headers(1, [
        (":method", "POST"), (":path", "/v1/agents/register"), (":scheme", "https"),
        (":authority", "127.0.0.1"), ("content-type", "application/json"),
        ("content-length", str(DECLARED_BODY_BYTES)),
    ])
    connection.send_data(1, BODY_CHUNK)
    await stream.send_all(connection.data_to_send())
    with trio.move_on_after(ANSWER_SECONDS):
        answered = False
        while not answered:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                break  # the TLS connection closed on the preface: what the fix does
            if not data:
                break  # an HTTP/1.1 server closes on the preface: what the fix does
            try:
                events = connection.receive_data(data)
            except h2.exceptions.ProtocolError:
                break  # not HTTP/2 (an HTTP/1.1 400): what the fix does
            answered = any(isinstance(event, h2.events.StreamEnded) for event in events)
        if answered:
            # The stream is answered; more of its body now reached Hypercorn's HTTP/2 code.
            connection.send_data(1, BODY_CHUNK)
            await stream.send_all(connection.data_to_send())
            await trio.sleep(0.2)  # the server's turn to process the late DATA frame


async def _healthz(url: str, ca: Path | None) -> int:
    verify = ssl.create_default_context(cafile=str(ca)) if ca else False
    async with httpx.AsyncClient(verify=verify, timeout=ANSWER_SECONDS) as http:
        return (await http.get(f"{url}/healthz")).status_code


async def test_tls_clients_cannot_negotiate_http2(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path / "tls")
    async with live_service(
        tmp_path / "data", f"sqlite:///{tmp_path / 'rv.db'}", tls_cert=cert, tls_key=key
    ) as (url, config):
        tcp = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
        stream = trio.SSLStream(tcp, _client_context(cert, ["h2", "http/1.1"]),
                                server_hostname="127.0.0.1")
        await stream.do_handshake()
        assert stream.selected_alpn_protocol() != "h2"
        await stream.aclose()


async def test_http2_with_prior_knowledge_over_tls_cannot_stop_the_service(
    tmp_path: Path,
) -> None:
    cert, key = make_certificate(tmp_path / "tls")
    async with live_service(
        tmp_path / "data", f"sqlite:///{tmp_path / 'rv.db'}", tls_cert=cert, tls_key=key
    ) as (url, config):
        tcp = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
        stream = trio.SSLStream(tcp, _client_context(cert, None), server_hostname="127.0.0.1")
        await _http2_oversized_post(stream)
        await trio.aclose_forcefully(stream)
        assert await _healthz(url, cert) == 200


async def test_http2_with_prior_knowledge_over_plain_http_cannot_stop_the_service(
    tmp_path: Path,
) -> None:
    async with live_service(tmp_path / "data", f"sqlite:///{tmp_path / 'rv.db'}") as (
        url, config,
    ):
        stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
        await _http2_oversized_post(stream)
        await trio.aclose_forcefully(stream)
        assert await _healthz(url, None) == 200


async def test_an_h2c_upgrade_is_answered_in_http_1_1(tmp_path: Path) -> None:
    async with live_service(tmp_path / "data", f"sqlite:///{tmp_path / 'rv.db'}") as (
        url, config,
    ):
        stream = await trio.open_tcp_stream("127.0.0.1", int(url.rsplit(":", 1)[1]))
        await stream.send_all(
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings"
            b"\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n"
        )
        with trio.fail_after(ANSWER_SECONDS):
            answer = await stream.receive_some(4096)
        await stream.aclose()
        assert answer.split(b"\r\n", 1)[0] == b"HTTP/1.1 200 "  # not 101 Switching Protocols
