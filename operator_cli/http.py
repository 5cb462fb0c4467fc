"""A small blocking HTTP(S) client for the CLI's few JSON requests to the rendezvous.

Built on the standard library's http.client and ssl so that `tucdesk exec` does not pay for
importing a full HTTP stack at start-up. One persistent connection per client: requests run one
after another over it (a lock keeps threads from interleaving), and a kept-alive connection the
server has closed is reopened once.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from collections.abc import Iterator, Mapping
from email.message import Message
from typing import Any
from urllib.parse import urlsplit

from protocol.connection_failure import (
    ConnectionFailure,
    FailureKind,
    classify_connection_failure,
)

CONNECT_TIMEOUT_SECONDS = 10.0
READ_TIMEOUT_SECONDS = 30.0
MAX_BODY_BYTES = 16 * 1024 * 1024
STREAM_CHUNK_BYTES = 64 * 1024
USER_AGENT = "tucdesk"
MINIMUM_TLS_VERSION = ssl.TLSVersion.TLSv1_2

# The server closed an idle kept-alive connection between two of our requests.
_STALE_CONNECTION_ERRORS = (
    http.client.RemoteDisconnected,
    ConnectionResetError,
    ConnectionAbortedError,
    BrokenPipeError,
    ssl.SSLEOFError,
    ssl.SSLZeroReturnError,
)


class HttpError(Exception):
    """Base of the CLI's HTTP failures."""


class TransportError(HttpError):
    """The server could not be reached or talked to: refused, TLS failure, timeout, bad reply.

    ``reason`` names the underlying failure (e.g. ``ConnectionRefusedError``); ``url`` is the
    server's, ``cause`` the original exception; ``describe()`` is the line to show a user.
    """

    def __init__(
        self,
        reason: str,
        detail: str = "",
        *,
        url: str | None = None,
        cause: BaseException | None = None,
        answer_timeout: float | None = None,
    ) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.url = url
        self.cause = cause
        # Set when the server took the TCP connection and then did not answer (TLS handshake
        # or response) within this many seconds: a stopped or overloaded service, not a wrong
        # address.
        self.answer_timeout = answer_timeout

    @property
    def failure(self) -> ConnectionFailure | None:
        """The cause, classified and put into words (protocol/connection_failure.py)."""
        return classify_connection_failure(self.cause) if self.cause is not None else None

    @property
    def untrusted_certificate(self) -> bool:
        """True when TLS refused the server's certificate (not a reachability problem)."""
        failure = self.failure
        return failure is not None and failure.kind is FailureKind.UNTRUSTED_CERTIFICATE

    def describe(self) -> str:
        """One line for the user: what failed, in words, with the URL, and what to check."""
        where = self.url or "the server"
        failure = self.failure
        if failure is None:
            return f"cannot reach {where}: {self.reason}; check --server and --ca-file"
        if failure.kind is FailureKind.UNTRUSTED_CERTIFICATE:
            return (f"TLS certificate of {where} not trusted: {failure.detail}; pass --ca-file "
                    "with the CA that signed it")
        if failure.kind is FailureKind.TIMED_OUT and self.answer_timeout is not None:
            return (f"{where} took the connection but did not answer within "
                    f"{self.answer_timeout:g} s: the service may be stopped or overloaded; try "
                    "again shortly, or ask its admin")
        if failure.kind is FailureKind.TIMED_OUT:
            return (f"cannot reach {where}: nothing answered the connection (host down, or a "
                    "firewall dropping it?); check --server")
        if failure.kind is FailureKind.TLS:
            return f"cannot reach {where}: {failure.words}; check --server and --ca-file"
        return f"cannot reach {where}: {failure.words}; check --server"


class CaFileError(HttpError):
    """The --ca-file given cannot be read as PEM certificates."""


class ResponseTooLargeError(HttpError):
    """A response body exceeded the size the CLI accepts for it."""


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """A verifying TLS context (TLS 1.2 or newer) trusting ``ca_file`` when one is given."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        detail = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        raise CaFileError(f"cannot use the CA file {ca_file} (--ca-file): {detail}") from None
    context.minimum_version = MINIMUM_TLS_VERSION
    return context


class Response:
    """A response: status, headers, and the body read whole (``content``) or in chunks."""

    def __init__(
        self,
        status_code: int,
        headers: Message,
        body: bytes | None,
        stream: http.client.HTTPResponse | None = None,
        *,
        url: str | None = None,
        read_timeout: float | None = None,
    ) -> None:
        self.status_code = status_code
        self.headers = headers
        self._body = body
        self._stream = stream
        self._url = url
        self._read_timeout = read_timeout
        # Whether the body was read to its end: only then is the connection free for the next
        # request (bytes left unread would be taken for the next response's status line).
        self._body_ended = stream is None

    @property
    def is_success(self) -> bool:
        """True for 2xx statuses."""
        return 200 <= self.status_code < 300

    @property
    def content(self) -> bytes:
        """The whole body (a streamed body is read to its end)."""
        if self._body is None:
            self._body = b"".join(self.iter_bytes())
        return self._body

    @property
    def text(self) -> str:
        """The body decoded as UTF-8, undecodable bytes replaced."""
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body parsed as JSON; ValueError when it is not JSON."""
        return json.loads(self.content)

    def iter_bytes(self, chunk_size: int = STREAM_CHUNK_BYTES) -> Iterator[bytes]:
        """The body in chunks; for a streamed response each chunk is read from the network."""
        if self._stream is None:
            if self._body:
                yield self._body
            return
        stream, self._stream = self._stream, None
        try:
            while chunk := stream.read(chunk_size):
                yield chunk
            self._body_ended = True
        except (OSError, http.client.HTTPException) as error:
            # The server answered: a stall now is a server that stopped sending mid-response.
            raise TransportError(
                type(error).__name__, str(error), url=self._url, cause=error,
                answer_timeout=self._read_timeout if isinstance(error, TimeoutError) else None,
            ) from error
        finally:
            stream.close()

    @property
    def left_data_on_connection(self) -> bool:
        """True when a streamed body was closed or abandoned before its end: the connection
        still holds the rest and cannot carry another request."""
        return not self._body_ended

    def close(self) -> None:
        """Release a streamed body that was not read to its end."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None


class HttpClient:
    """One persistent connection to ``base_url`` (https://, or http:// for loopback tests)."""

    def __init__(
        self,
        base_url: str,
        *,
        ca_file: str | None = None,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        read_timeout: float = READ_TIMEOUT_SECONDS,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._base_path = parts.path.rstrip("/")
        self._host = parts.hostname
        self._port = parts.port
        self._tls = tls_context(ca_file) if parts.scheme == "https" else None
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._server_accepted = False
        self._answer_timeout = connect_timeout
        self._max_body_bytes = max_body_bytes
        self._connection: http.client.HTTPConnection | None = None
        self._requests_on_connection = 0
        self._open_stream: Response | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (a later request opens a new one)."""
        with self._lock:
            self._drop_connection()

    def target(self, path: str) -> str:
        """The request target sent on the wire for ``path`` (base path prefix included)."""
        return self._base_path + path

    def get(self, path: str) -> Response:
        """GET ``path``; the body is read whole."""
        return self.request("GET", path)

    def post(self, path: str, json: Any = None) -> Response:
        """POST ``json`` (encoded as a JSON body) to ``path``."""
        content = None if json is None else _encode_json(json)
        headers = {} if json is None else {"Content-Type": "application/json"}
        return self.request("POST", path, content=content, headers=headers)

    def request(
        self,
        method: str,
        path: str,
        *,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        stream: bool = False,
    ) -> Response:
        """Send one request; TransportError if the server cannot be reached or talked to.

        With ``stream`` a 2xx body is left for the caller to read (``iter_bytes``) and is not
        size-limited; any other body is read whole, ResponseTooLargeError past the limit.
        """
        all_headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **(headers or {})}
        with self._lock:
            if self._open_stream is not None and self._open_stream.left_data_on_connection:
                # An unread (or closed part-read) streamed body still occupies the connection:
                # start afresh rather than read its rest as the next response.
                self._open_stream.close()
                self._drop_connection()
            self._open_stream = None
            raw = self._exchange(method.upper(), self.target(path), content, all_headers)
            try:
                # A refusal's body is small and read whole even when streaming was asked for,
                # so it is handled exactly as a non-streamed one and the connection stays usable.
                if stream and 200 <= raw.status < 300:
                    response = Response(
                        raw.status, raw.msg, None, stream=raw, url=self.base_url,
                        read_timeout=self._read_timeout,
                    )
                    self._open_stream = response
                    return response
                return Response(raw.status, raw.msg, self._read_limited(raw))
            except BaseException:
                if self._open_stream is None:
                    self._drop_connection()
                raise

    def _exchange(
        self, method: str, target: str, content: bytes | None, headers: dict[str, str]
    ) -> http.client.HTTPResponse:
        reused = (
            self._connection is not None
            and self._connection.sock is not None
            and self._requests_on_connection > 0
        )
        try:
            return self._send_once(method, target, content, headers)
        except _STALE_CONNECTION_ERRORS as error:
            self._drop_connection()
            if not reused:
                raise self._transport_error(error) from error
        except (OSError, http.client.HTTPException) as error:
            self._drop_connection()
            raise self._transport_error(error) from error
        try:
            return self._send_once(method, target, content, headers)
        except (OSError, http.client.HTTPException) as error:
            self._drop_connection()
            raise self._transport_error(error) from error

    def _transport_error(self, error: BaseException) -> TransportError:
        answer_timeout = None
        if isinstance(error, TimeoutError) and self._server_accepted:
            answer_timeout = self._answer_timeout
        return TransportError(
            type(error).__name__, str(error), url=self.base_url, cause=error,
            answer_timeout=answer_timeout,
        )

    def _send_once(
        self, method: str, target: str, content: bytes | None, headers: dict[str, str]
    ) -> http.client.HTTPResponse:
        connection = self._connected()
        connection.request(method, target, body=content, headers=headers)
        self._requests_on_connection += 1
        return connection.getresponse()

    def _connected(self) -> http.client.HTTPConnection:
        if self._connection is not None and self._connection.sock is not None:
            return self._connection
        self._drop_connection()
        connection: http.client.HTTPConnection
        if self._tls is not None:
            connection = http.client.HTTPSConnection(
                self._host, self._port, timeout=self._connect_timeout, context=self._tls
            )
        else:
            connection = http.client.HTTPConnection(
                self._host, self._port, timeout=self._connect_timeout
            )
        self._connection = connection
        self._requests_on_connection = 0
        # Which wait a timeout ends: the TLS handshake (connect timeout) once TCP is up, then
        # the answer (read timeout).
        self._server_accepted, self._answer_timeout = False, self._connect_timeout
        try:
            connection.connect()
        except TimeoutError:
            self._server_accepted = connection.sock is not None
            raise
        self._server_accepted, self._answer_timeout = True, self._read_timeout
        if connection.sock is not None:
            connection.sock.settimeout(self._read_timeout)
        return connection

    def _read_limited(self, raw: http.client.HTTPResponse) -> bytes:
        declared = raw.getheader("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > self._max_body_bytes:
            self._drop_connection()
            raise ResponseTooLargeError(self._too_large_message())
        try:
            body = raw.read(self._max_body_bytes + 1)
            if len(body) > self._max_body_bytes:
                self._drop_connection()
                raise ResponseTooLargeError(self._too_large_message())
            raw.read()  # the (empty) rest, so the connection is ready for the next request
        except (OSError, http.client.HTTPException) as error:
            self._drop_connection()
            raise self._transport_error(error) from error
        if raw.will_close:
            self._drop_connection()
        return body

    def _too_large_message(self) -> str:
        limit_mib = self._max_body_bytes / (1024 * 1024)
        return f"the server's response is larger than the {limit_mib:g} MiB the CLI accepts"

    def _drop_connection(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection = None
        self._requests_on_connection = 0


def _encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("utf-8")
