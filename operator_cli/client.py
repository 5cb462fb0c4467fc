"""The CLI's HTTP client for the rendezvous: challenge login, bound tokens, request proofs.

Tokens are refreshed transparently: the operator key lives in the CLI home, so when the cached
token is about to expire or refused, the client signs a fresh challenge and retries once. No
token at all means logged out (``tucdesk logout`` deletes it): ``tucdesk login`` signs in again
with the same key. A home that cannot be written (a read-only mount in a CI job) keeps the fresh
token in memory for the command, with one warning.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from operator_cli.home import TOKEN_FILE, CliHome, HomeError, Settings
from operator_cli.http import HttpClient, Response
from protocol.domains import Purpose
from protocol.errors import KeyFileError
from protocol.identity import SigningIdentity, b64url
from protocol.request_proof import PROOF_HEADER, create_proof
from protocol.signed_payload import create_signed_payload

REQUEST_TIMEOUT_SECONDS = 30.0
REFRESH_MARGIN_SECONDS = 60


class ApiError(Exception):
    """The service refused a request; ``code`` is its error code, the message its explanation."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def open_http(settings: Settings) -> HttpClient:
    """An HTTP client for the server, trusting the CA file when one is configured."""
    return HttpClient(
        settings.server, ca_file=settings.ca_file, read_timeout=REQUEST_TIMEOUT_SECONDS
    )


def check(response: Response) -> Any:
    """The JSON body of a successful response; ApiError with the service's reason otherwise."""
    if response.is_success:
        if response.status_code == 204 or not response.content:
            return None
        return response.json()
    try:
        body = response.json()
        code, message = str(body.get("error", "error")), str(body.get("message", ""))
    except (ValueError, AttributeError):
        code, message = "error", response.text[:200]
    raise ApiError(response.status_code, code, message or f"HTTP {response.status_code}")


def enroll(http: HttpClient, identity: SigningIdentity, invite: str) -> dict[str, Any]:
    """Register the operator key with a one-time invite; the key signs the enrollment."""
    envelope = create_signed_payload(
        identity,
        Purpose.OPERATOR_ENROLL,
        {"invite": invite, "public_key": b64url(identity.public.raw)},
        time.time(),
    )
    result: dict[str, Any] = check(http.post("/v1/operators/enroll", json=envelope))
    return result


def login(http: HttpClient, identity: SigningIdentity) -> dict[str, Any]:
    """Sign a fresh server challenge and return the token response."""
    thumbprint = identity.public.key_id
    challenge = check(http.post("/v1/auth/challenge", json={"key_thumbprint": thumbprint}))
    envelope = create_signed_payload(
        identity,
        Purpose.OPERATOR_LOGIN,
        {
            "challenge_id": challenge["challenge_id"],
            "challenge": challenge["challenge"],
            "audience": challenge["audience"],
            "key_thumbprint": thumbprint,
        },
        time.time(),
    )
    result: dict[str, Any] = check(http.post("/v1/auth/login", json=envelope))
    return result


class Session:
    """Authenticated requests for one CLI home: bearer token plus a proof on state changes."""

    def __init__(self, home: CliHome, settings: Settings, identity: SigningIdentity) -> None:
        self.home = home
        self.http = open_http(settings)
        self.identity = identity

    @classmethod
    def from_home(cls, home: CliHome) -> Session:
        """A session from the saved settings (as --server/--ca-file allow) and key; HomeError if
        the user never logged in or --server names another server."""
        settings = home.command_settings()
        identity = home.load_key()
        if settings is None or identity is None:
            raise HomeError("not logged in: run 'tucdesk login --server URL --invite CODE' first")
        return cls(home, settings, identity)

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self.http.close()

    def token(self, *, force_refresh: bool = False) -> str:
        """A valid access token, logging in again when needed."""
        cached = self.home.load_token()
        if cached is None and not self.home.token_was_damaged:
            raise HomeError("not logged in: run 'tucdesk login'")
        if (cached is not None and not force_refresh
                and cached["expires_at"] > time.time() + REFRESH_MARGIN_SECONDS):
            return str(cached["access_token"])
        fresh = login(self.http, self.identity)
        try:
            self.home.save_token(fresh)
        except (OSError, KeyFileError) as error:
            reason = error.strerror if isinstance(error, OSError) else None
            where = f"{self.home.path / TOKEN_FILE} ({reason})" if reason else str(error)
            print(
                f"tucdesk: warning: cannot cache the new access token: {where}; it serves "
                "this command only",
                file=sys.stderr,
            )
            self.home.keep_token_in_memory(fresh)
        return str(fresh["access_token"])

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send an authenticated request; refresh the token once if the service refuses it."""
        try:
            return check(self._send(method, path, body, self.token()))
        except ApiError as error:
            if error.status != 401:
                raise
        return check(self._send(method, path, body, self.token(force_refresh=True)))

    def request_with_status(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Like ``request``, also returning the success status (201 and 202 differ in meaning)."""
        response = self._send(method, path, body, self.token())
        if response.status_code == 401:
            response = self._send(method, path, body, self.token(force_refresh=True))
        return response.status_code, check(response)

    def request_raw(self, method: str, path: str) -> Response:
        """An authenticated request whose body the caller streams itself (exports).

        The body is not size-limited; read it with ``iter_bytes`` (or ``content``). A refused
        token is handled as in ``request``: the refusal's body is read (so the connection can
        carry the login), the token refreshed and the request retried once.
        """
        response = self._send(method, path, None, self.token(), stream=True)
        if response.status_code == 401:
            response.close()
            response = self._send(method, path, None, self.token(force_refresh=True), stream=True)
        if not response.is_success:
            check(response)
        return response

    def _send(
        self, method: str, path: str, body: Any, token: str, *, stream: bool = False
    ) -> Response:
        content = b"" if body is None else json.dumps(body).encode("utf-8")
        headers = {"Authorization": f"Bearer {token}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        # Every request proves possession of the operator key, reads too (the service refuses a
        # read of sessions, audit or policy made with the token alone).
        headers[PROOF_HEADER] = create_proof(
            self.identity,
            method=method,
            target=self.http.target(path),
            body=content,
            access_token=token,
            now=int(time.time()),
        )
        return self.http.request(
            method, path, content=content or None, headers=headers, stream=stream
        )
