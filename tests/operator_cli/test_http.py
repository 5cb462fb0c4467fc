"""The CLI's standard-library HTTP client against a real TLS server on loopback."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from operator_cli.http import HttpClient, ResponseTooLargeError, TransportError
from operator_cli.local_ca import LocalCertificates, create_local_certificates
from operator_cli.main import main

pytestmark = pytest.mark.timeout(30)

SMALL_LIMIT = 1000
STREAMED_BYTES = 200_000
HANDLER_WAIT_SECONDS = 5.0


@dataclass
class ServerState:
    """What the test server saw, and the event that releases its stalled handler."""

    connections: int = 0
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: ServerState

    def setup(self) -> None:
        super().setup()
        with self.state.lock:
            self.state.connections += 1
            self.connection_number = self.state.connections

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def _reply(self, body: bytes, *, length: int | None = None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._route(b"")

    def do_POST(self) -> None:
        self._route(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

    def _route(self, body: bytes) -> None:
        if self.path.endswith("/echo"):
            echo = {
                "method": self.command,
                "path": self.path,
                "body": json.loads(body) if body else None,
                "connection": self.connection_number,
            }
            self._reply(json.dumps(echo).encode())
        elif self.path.endswith("/close-after"):
            self._reply(b'{"closing": true}')
            self.close_connection = True  # without saying so: a kept-alive connection dropped
        elif self.path.endswith("/big"):
            self._reply(b"x" * (SMALL_LIMIT + 1))
        elif self.path.endswith("/big-unsized"):
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"y" * (SMALL_LIMIT * 3))
            self.close_connection = True
        elif self.path.endswith("/stream"):
            self._reply(b"z" * STREAMED_BYTES)
        elif self.path.endswith("/stall"):
            self.state.release.wait(HANDLER_WAIT_SECONDS)
            self.close_connection = True
        elif self.path.endswith("/stall-mid-body"):
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"a" * 100)
            self.wfile.flush()
            self.state.release.wait(HANDLER_WAIT_SECONDS)
            self.close_connection = True


@dataclass
class LoopbackServer:
    url: str
    state: ServerState
    certificates: LocalCertificates


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LoopbackServer]:
    certificates = create_local_certificates(tmp_path / "tls")
    state = ServerState()
    handler = type("BoundHandler", (Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificates.server_cert, certificates.server_key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield LoopbackServer(
            f"https://127.0.0.1:{httpd.server_address[1]}/base", state, certificates
        )
    finally:
        state.release.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join(HANDLER_WAIT_SECONDS)


def test_json_requests_share_one_verified_connection(server: LoopbackServer) -> None:
    with HttpClient(server.url, ca_file=str(server.certificates.ca_cert)) as http:
        first = http.post("/echo", json={"hello": "world"})
        second = http.get("/echo")
    assert first.is_success and first.headers["Content-Type"] == "application/json"
    assert first.json() == {
        "method": "POST",
        "path": "/base/echo",
        "body": {"hello": "world"},
        "connection": 1,
    }
    assert second.json()["connection"] == 1
    assert server.state.connections == 1


def test_server_certificate_not_signed_by_the_ca_file_is_refused(
    server: LoopbackServer, tmp_path: Path
) -> None:
    other_ca = create_local_certificates(tmp_path / "other").ca_cert
    with (
        HttpClient(server.url, ca_file=str(other_ca)) as http,
        pytest.raises(TransportError) as caught,
    ):
        http.get("/echo")
    assert caught.value.reason == "SSLCertVerificationError"


def test_tls_context_refuses_versions_older_than_1_2(server: LoopbackServer) -> None:
    http = HttpClient(server.url, ca_file=str(server.certificates.ca_cert))
    assert http._tls is not None
    assert http._tls.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert http._tls.check_hostname and http._tls.verify_mode == ssl.CERT_REQUIRED


def test_refused_connection_is_a_transport_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but not listening: connections are refused
        with (
            HttpClient(f"http://127.0.0.1:{port}") as http,
            pytest.raises(TransportError) as caught,
        ):
            http.get("/healthz")
    assert caught.value.reason == "ConnectionRefusedError"


def test_kept_alive_connection_closed_by_the_server_is_reopened_once(
    server: LoopbackServer,
) -> None:
    with HttpClient(server.url, ca_file=str(server.certificates.ca_cert)) as http:
        assert http.get("/close-after").json() == {"closing": True}
        after = http.post("/echo", json={"again": 1})
    assert after.json()["connection"] == 2


def test_json_body_over_the_limit_is_refused_with_a_clear_error(server: LoopbackServer) -> None:
    with HttpClient(
        server.url, ca_file=str(server.certificates.ca_cert), max_body_bytes=SMALL_LIMIT
    ) as http:
        with pytest.raises(ResponseTooLargeError, match="larger than"):
            http.get("/big")
        with pytest.raises(ResponseTooLargeError, match="larger than"):
            http.get("/big-unsized")
        assert http.get("/echo").is_success  # the client is still usable afterwards


def test_streamed_body_is_read_in_chunks_without_the_json_limit(server: LoopbackServer) -> None:
    with HttpClient(
        server.url, ca_file=str(server.certificates.ca_cert), max_body_bytes=SMALL_LIMIT
    ) as http:
        response = http.request("GET", "/stream", stream=True)
        chunks = list(response.iter_bytes(chunk_size=SMALL_LIMIT))
        assert len(chunks) > 1 and b"".join(chunks) == b"z" * STREAMED_BYTES
        assert http.get("/echo").is_success


def test_unread_stream_does_not_block_the_next_request(server: LoopbackServer) -> None:
    with HttpClient(server.url, ca_file=str(server.certificates.ca_cert)) as http:
        http.request("GET", "/stream", stream=True)
        assert http.get("/echo").json()["method"] == "GET"


def test_server_that_never_answers_times_out(server: LoopbackServer) -> None:
    with (
        HttpClient(server.url, ca_file=str(server.certificates.ca_cert), read_timeout=0.3) as http,
        pytest.raises(TransportError) as caught,
    ):
        http.get("/stall")
    assert caught.value.reason in ("TimeoutError", "timeout")
    assert caught.value.describe() == (
        f"{server.url} took the connection but did not answer within 0.3 s: the service may be "
        "stopped or overloaded; try again shortly, or ask its admin"
    )


def test_a_server_that_stalls_mid_body_is_named_as_not_answering(server: LoopbackServer) -> None:
    with (
        HttpClient(server.url, ca_file=str(server.certificates.ca_cert), read_timeout=0.3) as http,
        pytest.raises(TransportError) as caught,
    ):
        response = http.request("GET", "/stall-mid-body", stream=True)
        b"".join(response.iter_bytes())
    assert caught.value.describe().startswith(
        f"{server.url} took the connection but did not answer within 0.3 s"
    )


def test_a_listener_that_never_completes_tls_is_named_as_not_answering(tmp_path: Path) -> None:
    # A stopped (SIGSTOPped, hung) service: the kernel takes the connection, nobody answers.
    certificates = create_local_certificates(tmp_path / "tls")
    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"https://127.0.0.1:{silent.getsockname()[1]}"
        with (
            HttpClient(url, ca_file=str(certificates.ca_cert), connect_timeout=0.3) as http,
            pytest.raises(TransportError) as caught,
        ):
            http.get("/v1/auth/whoami")
    message = caught.value.describe()
    assert message.startswith(f"{url} took the connection but did not answer within 0.3 s")
    assert "check --server" not in message


def test_cli_reports_an_unreachable_server_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        status = main(
            [
                "--home",
                str(tmp_path / "home"),
                "login",
                "--server",
                f"http://127.0.0.1:{port}",
                "--invite",
                "invite-code",
            ]
        )
    assert status == 1
    assert capsys.readouterr().err.strip() == (
        f"tucdesk: cannot reach http://127.0.0.1:{port}: connection refused (nothing listening "
        "at that host and port?); check --server"
    )
