"""The pinned relay-token public keys: from PEM files, or from the rendezvous JWKS over TLS.

The rendezvous publishes all four of its service keys in one JWK set, each with a ``purpose``
(service_keys.jwks). Only the ``relay-token`` keys may verify relay tokens: trusting the JWT
issuer or audit signer key here would let a token signed for another purpose open a relay session.

A rotated relay-token key appears in the JWKS only once the rendezvous signs with it, so a token
whose ``kid`` the relay does not know asks for a refetch at once rather than at the next periodic
refresh. Such refetches are single-flight (tokens that arrive during one wait for it) and at most
one per ``unknown_key_refetch`` seconds: a flood of tokens with made-up key ids costs the
rendezvous no more than that. A TCP token also waits for a refetch that is due to start before
its hello_timeout runs out, and the relay spaces refetches by at most half of hello_timeout
(unknown_key_refetch_for), so a made-up key id that just spent the refetch cannot get a genuine
token signed with a newly rotated key refused: it waits for the next refetch instead, until that
fetch's start plus JWKS_FETCH_TIMEOUT_SECONDS at most (and never past its hello_timeout). A token
that found a fetch already running (started by another token, its request maybe sent before the
rotation) and still finds its key id unknown after it asks once more the same way. UDP hellos
cannot wait (a datagram is answered at once); one with an unknown key id may bring a refetch
forward too (its source may be spoofed), which for the same reason costs a TCP token nothing.
"""

from __future__ import annotations

import json
import logging
import math
import re
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
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
from protocol.relay_token import relay_token_key_id
from relay.errors import KeySetError

MAX_JWKS_SIZE = 64 * 1024
MAX_JWKS_KEYS = 32
JWKS_FETCH_TIMEOUT_SECONDS = 10.0
JWKS_RETRY_SECONDS = 10.0
# At most one refetch per this many seconds for tokens naming a key id the relay does not know.
UNKNOWN_KEY_REFETCH_SECONDS = 10.0
MIN_UNKNOWN_KEY_REFETCH_SECONDS = 1.0
# A token waits for a refetch until its start plus this (the fetch's own timeout) at most, and
# never beyond what is left of its connection's hello_timeout.
UNKNOWN_KEY_WAIT_SECONDS = JWKS_FETCH_TIMEOUT_SECONDS
# A relay whose JWKS has not been fetched for more than this many refresh intervals answers a
# health probe with no_keys: the rendezvous may have rotated its relay-token key since, and the
# relay cannot learn the new one, so new sessions are better sent to another relay. Three
# intervals (15 minutes at the default 300 s) ride out a short rendezvous outage or restart.
JWKS_STALE_INTERVALS = 3
# At most this many connections wait for one refetch; more are refused at once. Waiting ones
# keep their hello slot, so they are also within max_pending (and the descriptor budget).
MAX_TOKENS_WAITING_FOR_KEYS = 256
# Longest key id shown in a log line (it comes from an unverified token header).
MAX_SHOWN_KEY_ID = 64
_UNSHOWN_KEY_ID_CHARACTERS = re.compile(r"[^A-Za-z0-9_-]")
# The ``purpose`` the rendezvous gives its relay-token signer in the JWK set (KEY_ROLES).
RELAY_TOKEN_PURPOSE = "relay-token"  # noqa: S105 (a key role name, not a secret)
JWKS_PATH = "/.well-known/jwks.json"
PUBLIC_KEY_COMMAND = "tucdesk-rendezvous keys show --pem relay-token"

log = logging.getLogger("tucdesk.relay")


@dataclass(frozen=True)
class DueFetch:
    """A JWKS fetch a token with an unknown key id may wait for: when it starts (trio time)
    and an event set when it ends; ``running`` when it had already started when asked for."""

    done: trio.Event
    starts_at: float
    running: bool


class TokenKeySet:
    """The current relay-token verification keys, by key id; replaced whole on refresh."""

    def __init__(self, keys: Mapping[str, PublicIdentity]) -> None:
        self._keys: dict[str, PublicIdentity] = dict(keys)
        # Set by a JwksRefresher: who can fetch keys the set does not have yet.
        self.refresher: JwksRefresher | None = None
        self._waiting_for_keys = 0

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

    def unknown_key_id(self, token: str) -> str | None:
        """The ``kid`` a token names if this set has no such key (None: known, or no kid).

        Read from the unverified header: use it only to decide whether to refetch and to say
        why a token was refused.
        """
        key_id = relay_token_key_id(token)
        return key_id if key_id is not None and key_id not in self._keys else None

    def serving(self, now: float) -> bool:
        """Whether the set can verify tokens the rendezvous signs now: it has keys, and with a
        JWKS, one was fetched within JWKS_STALE_INTERVALS refresh intervals (trio time ``now``)."""
        return bool(self._keys) and (self.refresher is None or not self.refresher.stale(now))

    def ask_for_unknown_key(self, token: str) -> DueFetch | None:
        """If ``token`` names an unknown key id, ask for a JWKS refetch (rate-limited).

        Returns the fetch that may bring the key (its ``done`` is set when it ends), or None
        when none is running or about to start now (no JWKS, the key id is known, or a refetch
        ran less than UNKNOWN_KEY_REFETCH_SECONDS ago: one is then due when that time is up).
        """
        if self.refresher is None or self.unknown_key_id(token) is None:
            return None
        return self.refresher.fetch_for_unknown_key()

    async def wait_for_unknown_key(self, token: str, deadline: float) -> bool:
        """Wait, until ``deadline`` (trio time) at most, for the refetch a token with an
        unknown key id asked for: one running, or one due to start by then; return whether the
        set now knows its key id, so the token is worth checking again.

        A fetch that was already running began before the token arrived, so its answer may
        predate the key that signed it: if it ends without the key id, the next one is awaited
        too (still by ``deadline``). Each wait lasts until its fetch's start plus
        UNKNOWN_KEY_WAIT_SECONDS at most.
        """
        key_id = self.unknown_key_id(token)
        if (
            key_id is None
            or self.refresher is None
            or self._waiting_for_keys >= MAX_TOKENS_WAITING_FOR_KEYS
        ):
            return False
        self._waiting_for_keys += 1
        try:
            for _attempt in range(2):
                fetch = self.refresher.fetch_for_unknown_key(start_by=deadline)
                if fetch is None:
                    break
                with trio.move_on_at(min(deadline, fetch.starts_at + UNKNOWN_KEY_WAIT_SECONDS)):
                    await fetch.done.wait()
                if key_id in self._keys or not fetch.running or trio.current_time() >= deadline:
                    break
        finally:
            self._waiting_for_keys -= 1
        return key_id in self._keys

    def refusal_detail(self, token: str) -> str | None:
        """Why a token_invalid refusal happened, when the set can tell: its unknown key id."""
        key_id = self.unknown_key_id(token)
        if key_id is None:
            return None
        # From an unverified header: only [A-Za-z0-9_-] is shown (the others as "?"), so a
        # made-up key id cannot forge fields (" peer=... sid=...") in the refusal line.
        shown = _UNSHOWN_KEY_ID_CHARACTERS.sub("?", key_id[:MAX_SHOWN_KEY_ID])
        return f"unknown key id {shown}"

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


def unknown_key_refetch_for(hello_timeout: float) -> float:
    """The least time between unknown-key refetches for a relay whose hello_timeout is this:
    at most half of it, so a TCP token always finds a refetch starting within what is left of
    its hello_timeout (UNKNOWN_KEY_REFETCH_SECONDS at most, MIN_UNKNOWN_KEY_REFETCH_SECONDS at
    least: the rendezvous serves no more JWKS fetches than that under a flood)."""
    return min(UNKNOWN_KEY_REFETCH_SECONDS, max(MIN_UNKNOWN_KEY_REFETCH_SECONDS, hello_timeout / 2))


class JwksRefresher:
    """Refetches the JWKS every ``interval`` s (sooner after a failure, or when asked).

    The keys it starts with were just fetched (the relay's start-up fetch), so the first
    refetch is one interval later. A refetch asked for with ``refresh_soon`` (SIGHUP) is a
    reload: its result is logged (``reload`` / ``reload_failed``) and passed to ``on_reload``
    (True when the keys were fetched), as a --token-key reload's is. A token naming an unknown
    key id brings the next refetch forward (``fetch_for_unknown_key``), rate-limited.
    """

    def __init__(
        self,
        key_set: TokenKeySet,
        url: str,
        ca_file: str | None,
        interval: float,
        on_failure: Callable[[], None] = lambda: None,
        on_reload: Callable[[bool], None] = lambda ok: None,
        *,
        unknown_key_refetch: float = UNKNOWN_KEY_REFETCH_SECONDS,
    ) -> None:
        self.key_set = key_set
        self.url = url
        self.ca_file = ca_file
        self.interval = interval
        self.on_failure = on_failure
        self.on_reload = on_reload
        self.unknown_key_refetch = unknown_key_refetch
        self._wake = trio.Event()
        self._reload_asked = False
        self._next_fetch_at: float | None = None  # trio time; set when run starts
        self._last_fetch_at = -math.inf
        self._in_flight: trio.Event | None = None  # set when the running fetch ends
        self._last_success_at: float | None = None  # trio time; set when run starts
        self._next_fetch_done = trio.Event()
        key_set.refresher = self

    def refresh_soon(self) -> None:
        """Refetch now, as a reload (SIGHUP): cut the current wait short."""
        self._reload_asked = True
        self._wake.set()

    def stale(self, now: float) -> bool:
        """Whether no fetch has worked for over JWKS_STALE_INTERVALS intervals (trio time)."""
        last = self._last_success_at
        return last is not None and now - last > JWKS_STALE_INTERVALS * self.interval

    def fetch_for_unknown_key(self, start_by: float | None = None) -> DueFetch | None:
        """Bring the next fetch forward for a token with an unknown key id, at most one such
        fetch per ``unknown_key_refetch`` seconds; return the fetch running now, or the next one
        if it starts by ``start_by`` (trio time; default now) (None: the next one is later)."""
        if self._in_flight is not None:
            return DueFetch(self._in_flight, self._last_fetch_at, running=True)
        now = trio.current_time()
        due = max(now, self._last_fetch_at + self.unknown_key_refetch)
        if self._next_fetch_at is None or due < self._next_fetch_at:
            self._next_fetch_at = due
            self._wake.set()
        else:
            due = self._next_fetch_at  # a fetch is due sooner anyway (periodic, or asked for)
        wait_until = now if start_by is None else max(now, start_by)
        if due > wait_until:
            return None
        return DueFetch(self._next_fetch_done, due, running=False)

    async def run(self) -> None:
        """Refresh until cancelled; on failure keep the old keys and retry sooner.

        A failure is logged when its reason changes (not on every retry) and counted by
        ``on_failure`` every time; a recovery is logged once.
        """
        try:
            await self._refresh_forever()
        finally:
            # Nobody is left to fetch: let tokens waiting for a fetch be answered now.
            self._next_fetch_done.set()

    async def _refresh_forever(self) -> None:
        last_error: str | None = None
        if self._next_fetch_at is None:
            self._next_fetch_at = trio.current_time() + self.interval
        if self._last_success_at is None:
            self._last_success_at = trio.current_time()  # the start-up fetch
        while True:
            while not self._reload_asked and trio.current_time() < self._next_fetch_at:
                with trio.move_on_at(self._next_fetch_at):
                    await self._wake.wait()
                # A new event each time: a wake during the fetch below is seen, not lost.
                self._wake = trio.Event()
            reload, self._reload_asked = self._reload_asked, False
            self._in_flight, self._next_fetch_done = self._next_fetch_done, trio.Event()
            self._last_fetch_at = trio.current_time()
            try:
                last_error = await self._fetch(reload, last_error)
                if last_error is None:
                    self._last_success_at = trio.current_time()
            finally:
                self._in_flight.set()
                self._in_flight = None
            delay = self.interval if last_error is None else min(self.interval, JWKS_RETRY_SECONDS)
            self._next_fetch_at = trio.current_time() + delay

    async def _fetch(self, reload: bool, last_error: str | None) -> str | None:
        """Fetch once and swap the keys in; return the error, or None when it worked."""
        before = self.key_set.fingerprints()
        try:
            keys = await fetch_jwks(self.url, self.ca_file)
            self.key_set.replace(keys)
        except KeySetError as error:
            self.on_failure()
            keeping = ",".join(self.key_set.fingerprints())
            if reload:
                self.on_reload(False)
                log.warning("reload_failed error=%s keeping=%s", error, keeping)
            if str(error) != last_error:
                log.warning(
                    "jwks_refresh_failed error=%s keeping=%s retry_s=%g",
                    error, keeping, min(self.interval, JWKS_RETRY_SECONDS),
                )
            return str(error)
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
        return None
