"""The pinned relay-token public keys: from PEM files, or from the rendezvous JWKS over TLS."""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import Iterable, Mapping
from pathlib import Path

import httpx
import trio

from protocol.errors import ProtocolError
from protocol.identity import PublicIdentity, b64url_decode, load_public_key_file
from relay.errors import KeySetError

MAX_JWKS_SIZE = 64 * 1024
MAX_JWKS_KEYS = 32
JWKS_FETCH_TIMEOUT_SECONDS = 10.0
JWKS_RETRY_SECONDS = 10.0

log = logging.getLogger("tucdesk.relay")


class TokenKeySet:
    """The current relay-token verification keys, by key id; replaced whole on refresh."""

    def __init__(self, keys: Mapping[str, PublicIdentity]) -> None:
        self._keys: dict[str, PublicIdentity] = dict(keys)

    @property
    def keys(self) -> Mapping[str, PublicIdentity]:
        """Key id → public key, for verify_relay_token."""
        return self._keys

    def replace(self, keys: Mapping[str, PublicIdentity]) -> None:
        """Swap in a new set of keys (an empty set is refused: keep the old keys instead)."""
        if not keys:
            raise KeySetError("a key set with no keys would refuse every token")
        self._keys = dict(keys)

    @classmethod
    def from_files(cls, paths: Iterable[Path]) -> TokenKeySet:
        """Load PEM Ed25519 public keys; each is known by its RFC 7638 key id."""
        keys: dict[str, PublicIdentity] = {}
        for path in paths:
            try:
                key = load_public_key_file(path)
            except ProtocolError as error:
                raise KeySetError(f"--token-key {path}: {error}") from None
            keys[key.key_id] = key
        return cls(keys)


def parse_jwks(data: bytes) -> dict[str, PublicIdentity]:
    """Parse a JWKS document; keep its Ed25519 (OKP) keys, known by thumbprint and by ``kid``."""
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
        if not isinstance(entry, dict):
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
        raise KeySetError("JWKS has no Ed25519 keys")
    return keys


async def fetch_jwks(url: str, ca_file: str | None) -> dict[str, PublicIdentity]:
    """Fetch and parse the JWKS at an https URL, verifying the server certificate."""
    if not url.startswith("https://"):
        raise KeySetError("the JWKS URL must be https://")
    context = ssl.create_default_context(cafile=ca_file)
    try:
        async with httpx.AsyncClient(
            verify=context, timeout=JWKS_FETCH_TIMEOUT_SECONDS, follow_redirects=False
        ) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise KeySetError(f"JWKS fetch returned HTTP {response.status_code}")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JWKS_SIZE:
                        raise KeySetError(f"JWKS is larger than {MAX_JWKS_SIZE} bytes")
    except httpx.HTTPError as error:
        raise KeySetError(f"JWKS fetch from {url} failed: {type(error).__name__}") from None
    return parse_jwks(bytes(body))


async def refresh_jwks_forever(
    key_set: TokenKeySet, url: str, ca_file: str | None, interval: float
) -> None:
    """Refetch the JWKS every ``interval`` s; on failure keep the old keys and retry sooner."""
    while True:
        delay = interval
        try:
            key_set.replace(await fetch_jwks(url, ca_file))
        except KeySetError as error:
            log.warning("jwks_refresh_failed error=%s keeping=%d", error, len(key_set.keys))
            delay = min(interval, JWKS_RETRY_SECONDS)
        await trio.sleep(delay)
