"""The pinned relay-token public keys: from PEM files, or from the rendezvous JWKS over TLS.

The rendezvous publishes all four of its service keys in one JWK set, each with a ``purpose``
(service_keys.jwks). Only the ``relay-token`` keys may verify relay tokens: trusting the JWT
issuer or audit signer key here would let a token signed for another purpose open a relay session.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import httpx
import trio

from protocol.connection_failure import FailureKind, classify_connection_failure
from protocol.errors import ProtocolError
from protocol.identity import (
    PrivateKeyFileError,
    PublicIdentity,
    b64url_decode,
    load_verifying_key_file,
)
from relay.errors import KeySetError

MAX_JWKS_SIZE = 64 * 1024
MAX_JWKS_KEYS = 32
JWKS_FETCH_TIMEOUT_SECONDS = 10.0
JWKS_RETRY_SECONDS = 10.0
# The ``purpose`` the rendezvous gives its relay-token signer in the JWK set (KEY_ROLES).
RELAY_TOKEN_PURPOSE = "relay-token"  # noqa: S105 (a key role name, not a secret)
JWKS_PATH = "/.well-known/jwks.json"
PUBLIC_KEY_COMMAND = "tucdesk-rendezvous keys show --pem relay-token"

log = logging.getLogger("tucdesk.relay")


class TokenKeySet:
    """The current relay-token verification keys, by key id; replaced whole on refresh."""

    def __init__(self, keys: Mapping[str, PublicIdentity]) -> None:
        self._keys: dict[str, PublicIdentity] = dict(keys)

    @property
    def keys(self) -> Mapping[str, PublicIdentity]:
        """Key id → public key, for verify_relay_token."""
        return self._keys

    def fingerprints(self) -> list[str]:
        """The OpenSSH (SHA256:...) fingerprints of the distinct keys, sorted."""
        return sorted({key.fingerprint for key in self._keys.values()})

    def replace(self, keys: Mapping[str, PublicIdentity]) -> None:
        """Swap in a new set of keys (an empty set is refused: keep the old keys instead)."""
        if not keys:
            raise KeySetError("a key set with no keys would refuse every token")
        self._keys = dict(keys)

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> TokenKeySet:
        """Load PEM Ed25519 public keys; each is known by its RFC 7638 key id."""
        return cls(load_key_files(paths))


def load_key_files(paths: Iterable[Path]) -> dict[str, PublicIdentity]:
    """Key id → key for the --token-key files; a private key file is refused, not used."""
    keys: dict[str, PublicIdentity] = {}
    for path in paths:
        key = _load_public_key_file(Path(path))
        keys[key.key_id] = key
    if not keys:
        raise KeySetError("no --token-key files given")
    return keys


def _load_public_key_file(path: Path) -> PublicIdentity:
    try:
        return load_verifying_key_file(path)
    except PrivateKeyFileError:
        # The relay must never be handed the signing secret.
        raise KeySetError(
            f"--token-key {path} holds a private key; give the relay only the public key: "
            f"{PUBLIC_KEY_COMMAND}"
        ) from None
    except ProtocolError as error:
        raise KeySetError(f"--token-key {error}") from None


def parse_jwks(data: bytes) -> dict[str, PublicIdentity]:
    """Parse a JWKS document; keep its Ed25519 relay-token keys, known by thumbprint and ``kid``.

    Keys published for any other purpose (JWT issuer, audit, policy) are skipped; a document
    with no relay-token key is refused, so a refresh keeps the keys it had.
    """
    if len(data) > MAX_JWKS_SIZE:
        raise KeySetError(f"JWKS is larger than {MAX_JWKS_SIZE} bytes")
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        raise KeySetError("JWKS is not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list) or len(entries) > MAX_JWKS_KEYS:
        raise KeySetError(f"JWKS must have a 'keys' list of at most {MAX_JWKS_KEYS} keys")
    keys: dict[str, PublicIdentity] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("purpose") != RELAY_TOKEN_PURPOSE:
            continue
        if entry.get("use", "sig") != "sig":
            continue
        if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            continue
        try:
            key = PublicIdentity(b64url_decode(str(entry.get("x", "")), max_size=64))
        except ProtocolError:
            raise KeySetError("JWKS has a malformed Ed25519 key") from None
        keys[key.key_id] = key
        kid = entry.get("kid")
        if isinstance(kid, str) and kid:
            keys[kid] = key
    if not keys:
        raise KeySetError(
            f'JWKS has no relay-token key (purpose "{RELAY_TOKEN_PURPOSE}"); --jwks must be '
            f"the rendezvous's https://HOST{JWKS_PATH}"
        )
    return keys


async def fetch_jwks(url: str, ca_file: str | None) -> dict[str, PublicIdentity]:
    """Fetch and parse the JWKS at an https URL, verifying the server certificate."""
    if not url.startswith("https://"):
        raise KeySetError("the JWKS URL must be https://")
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as error:
        raise KeySetError(f"--jwks-ca {ca_file}: cannot load ({_reason_of(error)})") from None
    try:
        async with httpx.AsyncClient(
            verify=context, timeout=JWKS_FETCH_TIMEOUT_SECONDS, follow_redirects=False
        ) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise KeySetError(
                        f"JWKS fetch from {url} returned HTTP {response.status_code}"
                        + (f" (the rendezvous serves it at {JWKS_PATH})"
                           if response.status_code == 404 else "")
                    )
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_SIZE:
                        raise KeySetError(f"JWKS is larger than {MAX_JWKS_SIZE} bytes")
    except httpx.HTTPError as error:
        raise KeySetError(f"JWKS fetch from {url} failed: {_reason_of(error, ca_file)}") from None
    return parse_jwks(bytes(body))


def _reason_of(error: BaseException, ca_file: str | None = None) -> str:
    """What really went wrong under an httpx error (it says only ``ConnectError``)."""
    failure = classify_connection_failure(
        error,
        timeout_types=(httpx.TimeoutException,),
        timeout_seconds=JWKS_FETCH_TIMEOUT_SECONDS,
    )
    if failure.kind is FailureKind.UNTRUSTED_CERTIFICATE:
        trusted_by = f"--jwks-ca {ca_file}" if ca_file else "the system trust store"
        return f"TLS certificate not trusted by {trusted_by} ({failure.detail})"
    return failure.words


class JwksRefresher:
    """Refetches the JWKS every ``interval`` s (sooner after a failure, or when asked).

    The keys it starts with were just fetched (the relay's start-up fetch), so the first
    refetch is one interval later. A refetch asked for with ``refresh_soon`` (SIGHUP) is a
    reload: its result is logged (``reload`` / ``reload_failed``) and passed to ``on_reload``
    (True when the keys were fetched), as a --token-key reload's is.
    """

    def __init__(
        self,
        key_set: TokenKeySet,
        url: str,
        ca_file: str | None,
        interval: float,
        on_failure: Callable[[], None] = lambda: None,
        on_reload: Callable[[bool], None] = lambda ok: None,
    ) -> None:
        self.key_set = key_set
        self.url = url
        self.ca_file = ca_file
        self.interval = interval
        self.on_failure = on_failure
        self.on_reload = on_reload
        self._wake = trio.Event()
        self._reload_asked = False

    def refresh_soon(self) -> None:
        """Refetch now, as a reload (SIGHUP): cut the current wait short."""
        self._reload_asked = True
        self._wake.set()

    async def run(self) -> None:
        """Refresh until cancelled; on failure keep the old keys and retry sooner.

        A failure is logged when its reason changes (not on every retry) and counted by
        ``on_failure`` every time; a recovery is logged once.
        """
        last_error: str | None = None
        delay = self.interval
        while True:
            with trio.move_on_after(delay):
                await self._wake.wait()
            # A new event before fetching: a SIGHUP during the fetch is a fetch more, not lost.
            self._wake = trio.Event()
            reload, self._reload_asked = self._reload_asked, False
            delay = self.interval
            before = self.key_set.fingerprints()
            try:
                keys = await fetch_jwks(self.url, self.ca_file)
                self.key_set.replace(keys)
            except KeySetError as error:
                self.on_failure()
                delay = min(self.interval, JWKS_RETRY_SECONDS)
                keeping = ",".join(self.key_set.fingerprints())
                if reload:
                    self.on_reload(False)
                    log.warning("reload_failed error=%s keeping=%s", error, keeping)
                if str(error) != last_error:
                    log.warning(
                        "jwks_refresh_failed error=%s keeping=%s retry_s=%g",
                        error, keeping, delay,
                    )
                    last_error = str(error)
                continue
            after = self.key_set.fingerprints()
            if after != before:
                log.info("jwks_keys_changed keys=%s", ",".join(after))
            if reload:
                self.on_reload(True)
                log.info(
                    "reload jwks=%s keys=%s changed=%s (other settings take effect on restart)",
                    self.url, ",".join(after), "yes" if after != before else "no",
                )
            if last_error is not None:
                log.info("jwks_refresh_recovered keys=%s", ",".join(after))
                last_error = None
