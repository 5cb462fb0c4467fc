"""Enrollment: make the agent's identity, register it with a registration key, pin the service
keys and the team's policy trust (its admin keys and the rendezvous policy key, docs/sessions.md
§6), and seal everything into the machine-bound state file.

The registration key is a one-time secret: it is sent once inside the signed registration
payload over HTTPS and is never stored, logged or echoed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import rfc8785
from cryptography import x509

from agent.connection_failure import describe_connection_failure
from agent.errors import EnrollmentError
from agent.machine_identity import MachineIdentifiers
from agent.server_address import check_server_url, tls_context
from agent.state_file import AgentState, StateFileError, load_state, save_state
from protocol.connection_failure import FailureKind, classify_connection_failure
from protocol.domains import Purpose
from protocol.errors import ProtocolError
from protocol.identity import (
    PublicIdentity,
    SigningIdentity,
    b64url,
    b64url_decode,
    write_private_file,
)
from protocol.policy import PinnedPolicyTrust
from protocol.signed_payload import create_signed_payload

MAX_REGISTRATION_WARNINGS = 8
MAX_REGISTRATION_WARNING_LENGTH = 1000
REGISTER_PATH = "/v1/agents/register"
REQUEST_TIMEOUT_SECONDS = 30.0
MAX_RESPONSE_BYTES = 64 * 1024
MAX_SERVICE_KEYS = 32
GRANT_SIGNER_PURPOSE = "jwt-issuer"
POLICY_SIGNER_PURPOSE = "policy-signer"
RETIRED_KEY_STATE = "retired"
_STATEMENT_FIELDS = frozenset(
    {"purpose", "old_key_id", "new_key", "new_key_id", "rotated_at", "signature"}
)
# Per purpose: statements past this for one purpose are refused (that purpose's chain is not
# followed); the rendezvous sends at most this many per purpose (rendezvous/service_keys.py).
MAX_ROTATION_STATEMENTS = 256
# The whole message: bounds the work of reading it; a message longer than this is refused.
MAX_ROTATION_MESSAGE_STATEMENTS = 4096
MAX_PINNED_ADMIN_KEYS = 64
REGISTRATION_KEY_PREFIX = "rk_live_"
MAX_REGISTRATION_KEY_LENGTH = 256
STATE_DIRECTORY_MODE = 0o700
# More than a sealed state file takes (a few KiB), so a nearly full disk fails the test too.
WRITE_TEST_BYTES = 64 * 1024
HOSTNAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,252}")
# Enrollment keeps its own copy of the --ca-file it was given, beside the state: the daemon then
# does not depend on a file an admin may move or delete later (it is read again at every
# connection attempt, so appending a new CA to it rolls the rendezvous's CA without a restart).
SAVED_CA_FILE_NAME = "rendezvous-ca.pem"
MAX_CA_FILE_SIZE = 1024 * 1024


@dataclass(frozen=True)
class EnrollmentRequest:
    """What ``tucdesk-agent enroll`` was asked to do."""

    server_url: str
    registration_key: str
    state_file: Path
    name: str | None = None
    ca_file: Path | None = None
    force: bool = False

    def __repr__(self) -> str:
        # The registration key is a secret: keep it out of any log or traceback.
        return (
            f"EnrollmentRequest(server_url={self.server_url!r}, state_file={self.state_file!r}, "
            f"name={self.name!r}, ca_file={self.ca_file!r}, force={self.force!r})"
        )


def check_registration_key(key: str) -> str:
    """The key with surrounding whitespace removed; EnrollmentError if it is not shaped like one."""
    key = key.strip()
    if not key.startswith(REGISTRATION_KEY_PREFIX) or len(key) > MAX_REGISTRATION_KEY_LENGTH:
        raise EnrollmentError(
            f"that is not a registration key (they start with {REGISTRATION_KEY_PREFIX!r}); "
            "ask an admin for one ('tucdesk keys create')"
        )
    return key


def agent_hostname(name: str | None) -> str:
    """The name to register: ``name`` or this host's name, checked against the server's rules."""
    chosen = name if name else socket.gethostname().split(".")[0] or "agent"
    if not HOSTNAME_PATTERN.fullmatch(chosen):
        raise EnrollmentError(
            f"agent name {chosen!r} must be letters, digits, '.', '_' or '-' (at most 253); "
            "pass --name"
        )
    return chosen


def parse_service_keys(jwks: object) -> dict[str, dict[str, PublicIdentity]]:
    """The pinned service keys from a JWK set, by purpose then kid; EnrollmentError if malformed.

    A key whose ``kid`` is not its own RFC 7638 thumbprint is refused.
    """
    if not isinstance(jwks, Mapping) or not isinstance(jwks.get("keys"), list):
        raise EnrollmentError("the server's service keys are not a JWK set")
    keys = jwks["keys"]
    if not 0 < len(keys) <= MAX_SERVICE_KEYS:
        raise EnrollmentError(f"the server sent {len(keys)} service keys (expected 1..32)")
    by_purpose: dict[str, dict[str, PublicIdentity]] = {}
    for entry in keys:
        if not isinstance(entry, Mapping):
            raise EnrollmentError("a service key is not a JSON object")
        if entry.get("kty") != "OKP" or entry.get("crv") != "Ed25519":
            continue
        if entry.get("state") == RETIRED_KEY_STATE:
            # Published only while what it signed before a rotation expires: never pinned.
            continue
        purpose, kid, x = entry.get("purpose"), entry.get("kid"), entry.get("x")
        if not isinstance(purpose, str) or not isinstance(kid, str) or not isinstance(x, str):
            raise EnrollmentError("a service key lacks purpose, kid or x")
        try:
            key = PublicIdentity(b64url_decode(x, max_size=64))
        except ProtocolError:
            raise EnrollmentError(f"service key {kid!r} is not an Ed25519 public key") from None
        if key.key_id != kid:
            raise EnrollmentError(f"service key {kid!r} does not match its key id")
        by_purpose.setdefault(purpose, {})[kid] = key
    if not by_purpose.get(GRANT_SIGNER_PURPOSE):
        raise EnrollmentError("the server sent no session-grant signing key (jwt-issuer)")
    return by_purpose


def grant_signing_keys(state: AgentState) -> Mapping[str, PublicIdentity]:
    """The pinned keys a session grant may be signed with, by kid.

    A live view of ``state.service_keys``: keys the agent follows to after a rotation
    (``follow_key_rotations``, applied by the control client) count from then on.
    """
    return _PinnedGrantKeys(state)


class _PinnedGrantKeys(Mapping[str, PublicIdentity]):
    """The grant keys ``state.service_keys`` pins now, parsed again when that changed."""

    def __init__(self, state: AgentState) -> None:
        self._state = state
        self._parsed_from: str | None = None
        self._keys: dict[str, PublicIdentity] = {}

    def _current(self) -> dict[str, PublicIdentity]:
        # A grant check asks a few times per session: compare the pinned set's text, and parse
        # only after a rotation changed it.
        text = json.dumps(self._state.service_keys, sort_keys=True)
        if text != self._parsed_from:
            self._keys = parse_service_keys(self._state.service_keys)[GRANT_SIGNER_PURPOSE]
            self._parsed_from = text
        return self._keys

    def __getitem__(self, kid: str) -> PublicIdentity:
        return self._current()[kid]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._current()))

    def __len__(self) -> int:
        return len(self._current())


@dataclass(frozen=True)
class KeyRotationOutcome:
    """What following the rendezvous's rotation statements changed in the pinned keys."""

    service_keys: dict[str, Any]
    """The JWK set to pin from now on."""
    added: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()
    """Why each statement that does not chain from a pinned key was refused."""

    @property
    def changed(self) -> bool:
        """Whether any key was added or dropped."""
        return bool(self.added or self.dropped)


def follow_key_rotations(
    pinned_jwks: Mapping[str, Any], message: Mapping[str, Any]
) -> KeyRotationOutcome:
    """Follow the ``service_keys`` control message's rotation statements from ``pinned_jwks``.

    A statement is followed only if the key it retires is pinned (at enrollment, or by a
    statement followed before it) and that key signed it: so every key added chains back to
    what the agent pinned. A retired key is dropped once a followed statement replaced it and
    the message no longer lists it (the rendezvous stops listing it when what it signed has
    expired). Statements for a purpose this agent pins no key of are ignored; a purpose with
    more than MAX_ROTATION_STATEMENTS statements is not followed (the others still are).
    EnrollmentError if the message is malformed as a whole.
    """
    pinned = parse_service_keys(pinned_jwks)
    statements = message.get("rotations")
    listed = message.get("keys")
    if not isinstance(statements, list) or len(statements) > MAX_ROTATION_MESSAGE_STATEMENTS:
        raise EnrollmentError(
            f"the rendezvous's rotation statements are not a list of at most "
            f"{MAX_ROTATION_MESSAGE_STATEMENTS}"
        )
    if not isinstance(listed, list):
        raise EnrollmentError("the rendezvous's service keys are not a list")
    entries = [dict(entry) for entry in pinned_jwks["keys"] if isinstance(entry, Mapping)]
    added: list[str] = []
    refused: list[str] = []
    replaced: set[tuple[str, str]] = set()
    by_purpose: dict[str, list[Mapping[str, Any]]] = {}
    for statement in statements:
        purpose = statement.get("purpose") if isinstance(statement, Mapping) else None
        if not isinstance(purpose, str):
            refused.append("a rotation statement names no purpose")
        elif pinned.get(purpose):  # a purpose this agent pins no key of is none of its concern
            by_purpose.setdefault(purpose, []).append(statement)
    pending: list[tuple[Mapping[str, Any], str, str, PublicIdentity]] = []
    for purpose, purpose_statements in by_purpose.items():
        if len(purpose_statements) > MAX_ROTATION_STATEMENTS:
            refused.append(
                f"{len(purpose_statements)} rotation statements for {purpose[:32]}, more than "
                f"{MAX_ROTATION_STATEMENTS}: not followed (re-enroll if its keys changed)"
            )
            continue
        for statement in purpose_statements:
            try:
                pending.append((statement, *_rotation_statement(statement)))
            except EnrollmentError as error:
                refused.append(str(error))
    # Statements come oldest first; passes until none is left that chains, whatever the order.
    progress = True
    while pending and progress:
        progress = False
        for item in list(pending):
            statement, purpose, old_kid, new_key = item
            held = pinned.setdefault(purpose, {})
            if old_kid not in held:
                continue  # may chain from a key a later pass adds
            pending.remove(item)
            try:
                _check_statement_signature(statement, held[old_kid])
            except EnrollmentError as error:
                refused.append(str(error))
                continue
            progress = True
            replaced.add((purpose, old_kid))
            if new_key.key_id not in held:
                held[new_key.key_id] = new_key
                entries.append(_pinned_entry(purpose, new_key))
                added.append(f"{purpose} {new_key.fingerprint}")
    for _, purpose, old_kid, _ in _not_leading_to(pending, pinned):
        refused.append(
            f"rotation statement for {purpose[:32]} retires key {old_kid[:64]}, which this "
            "agent never pinned: it does not chain from the keys pinned at enrollment"
        )
    published = {
        (entry.get("purpose"), entry.get("kid")) for entry in listed if isinstance(entry, Mapping)
    }
    dropped: list[str] = []
    for purpose, kid in sorted(replaced):
        if (purpose, kid) in published or len(pinned.get(purpose, {})) <= 1:
            continue
        del pinned[purpose][kid]
        entries = [e for e in entries if (e.get("purpose"), e.get("kid")) != (purpose, kid)]
        dropped.append(f"{purpose} {kid}")
    return KeyRotationOutcome(
        {**pinned_jwks, "keys": entries}, tuple(added), tuple(dropped), tuple(refused)
    )


def _not_leading_to(
    pending: list[tuple[Mapping[str, Any], str, str, PublicIdentity]],
    pinned: Mapping[str, Mapping[str, PublicIdentity]],
) -> list[tuple[Mapping[str, Any], str, str, PublicIdentity]]:
    """The statements left over that are not history of a pinned key (rotations made before
    this agent enrolled, or before a key it pinned since): those do not chain."""
    ancestors = {(purpose, kid) for purpose, keys in pinned.items() for kid in keys}
    grew = True
    while grew:
        grew = False
        for _, purpose, old_kid, new_key in pending:
            if (purpose, new_key.key_id) in ancestors and (purpose, old_kid) not in ancestors:
                ancestors.add((purpose, old_kid))
                grew = True
    return [item for item in pending if (item[1], item[3].key_id) not in ancestors]


def _rotation_statement(statement: object) -> tuple[str, str, PublicIdentity]:
    """(purpose, retired kid, new key) of a well-formed statement; EnrollmentError if not."""
    if not isinstance(statement, Mapping) or set(statement) != _STATEMENT_FIELDS:
        raise EnrollmentError("a rotation statement is not an object with the expected fields")
    purpose, old_kid = statement["purpose"], statement["old_key_id"]
    new_text, new_kid = statement["new_key"], statement["new_key_id"]
    texts = (purpose, old_kid, new_text, new_kid, statement["signature"])
    if not all(isinstance(text, str) and len(text) <= 128 for text in texts):
        raise EnrollmentError("a rotation statement has a field that is not a short string")
    if not isinstance(statement["rotated_at"], int):
        raise EnrollmentError("a rotation statement's rotated_at is not an integer")
    try:
        new_key = PublicIdentity(b64url_decode(new_text, max_size=64))
    except ProtocolError:
        raise EnrollmentError("a rotation statement's new key is not an Ed25519 key") from None
    if new_key.key_id != new_kid:
        raise EnrollmentError("a rotation statement's new key does not match its key id")
    return purpose, old_kid, new_key


def _check_statement_signature(statement: Mapping[str, Any], old_key: PublicIdentity) -> None:
    body = {name: value for name, value in statement.items() if name != "signature"}
    try:
        signature = b64url_decode(statement["signature"], max_size=64)
        old_key.verify(Purpose.SERVICE_KEY_ROTATION, rfc8785.dumps(body), signature)
    except ProtocolError:
        raise EnrollmentError(
            f"a rotation statement for {statement['purpose'][:32]} is not signed by the key it "
            f"retires ({old_key.fingerprint}): refused"
        ) from None


def _pinned_entry(purpose: str, key: PublicIdentity) -> dict[str, Any]:
    return {
        "kty": "OKP", "crv": "Ed25519", "x": b64url(key.raw), "kid": key.key_id, "use": "sig",
        "alg": "EdDSA", "purpose": purpose, "fingerprint": key.fingerprint,
    }  # fmt: skip


def parse_policy_trust(
    body: Mapping[str, Any], team_id: str, service_keys: Mapping[str, Mapping[str, PublicIdentity]]
) -> PinnedPolicyTrust:
    """The policy pins from the registration answer's ``policy_trust``; EnrollmentError if bad.

    ``policy_key`` must be the ``policy-signer`` key of the pinned service keys.
    """
    trust = body.get("policy_trust")
    if not isinstance(trust, Mapping):
        raise EnrollmentError(
            "the rendezvous sent no policy trust (admin keys) with the registration: the team "
            "has no admin yet, or the rendezvous is older than this agent; fix that, then enroll "
            "again with a new registration key"
        )
    admin_texts, policy_text = trust.get("admin_keys"), trust.get("policy_key")
    if (
        not isinstance(admin_texts, list)
        or not 0 < len(admin_texts) <= MAX_PINNED_ADMIN_KEYS
        or not all(isinstance(text, str) for text in admin_texts)
        or not isinstance(policy_text, str)
    ):
        raise EnrollmentError(
            f"the rendezvous's policy trust must list 1..{MAX_PINNED_ADMIN_KEYS} admin keys and "
            "the policy key; the team needs an admin before agents can enroll"
        )
    try:
        admins = [PublicIdentity(b64url_decode(text, max_size=64)) for text in admin_texts]
        policy_key = PublicIdentity(b64url_decode(policy_text, max_size=64))
    except ProtocolError:
        raise EnrollmentError("the rendezvous's policy trust holds an invalid key") from None
    if policy_key.key_id not in service_keys.get(POLICY_SIGNER_PURPOSE, {}):
        raise EnrollmentError(
            "the rendezvous's policy key is not its published policy-signer service key"
        )
    try:
        return PinnedPolicyTrust.at_enrollment(team_id, admins, policy_key)
    except ValueError as error:
        raise EnrollmentError(f"the rendezvous's policy trust is unusable: {error}") from None


def registration_payload(
    identity: SigningIdentity,
    registration_key: str,
    hostname: str,
    identifiers: MachineIdentifiers,
    now: float,
) -> dict[str, Any]:
    """The signed registration envelope (Purpose.REGISTER) the server expects."""
    return create_signed_payload(
        identity,
        Purpose.REGISTER,
        {
            "registration_key": registration_key,
            "public_key": b64url(identity.public.raw),
            "machine_fingerprint": identifiers.fingerprint(),
            "hostname": hostname,
        },
        now,
    )


async def enroll(
    request: EnrollmentRequest,
    identifiers: MachineIdentifiers,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    warn: Callable[[str], None] | None = None,
) -> AgentState:
    """Register a fresh identity with the server and write the sealed state file; return it.

    ``warn`` gets each warning the rendezvous answered with (e.g. the name is already taken).
    """
    server_url = check_server_url(request.server_url)
    registration_key = check_registration_key(request.registration_key)
    hostname = agent_hostname(request.name)
    if request.state_file.exists() and not request.force:
        raise EnrollmentError(
            f"{request.state_file}: this agent is already enrolled; pass --force to register "
            "it again under a new identity (the old registration stays listed, and its state "
            "file could still connect, until an admin runs "
            "'tucdesk agents remove OLD_NAME_OR_ID')"
        )
    # Before the one-time key is spent: a state dir that cannot take the file fails here, and
    # so does a CA file that holds no certificate.
    prepare_state_dir(request.state_file)
    ca_file, skipped_copy_for = enrollment_ca_file(request, identifiers)
    ca_certificates = read_ca_certificates(ca_file) if ca_file is not None else None
    identity = SigningIdentity.generate()
    payload = registration_payload(
        identity, registration_key, hostname, identifiers, time.time()
    )
    verify: Any = tls_context(ca_file) if server_url.startswith("https:") else False
    try:
        async with httpx.AsyncClient(
            base_url=server_url,
            verify=verify,
            timeout=REQUEST_TIMEOUT_SECONDS,
            follow_redirects=False,
            transport=transport,
        ) as client:
            response = await client.post(REGISTER_PATH, json=payload)
    except httpx.HTTPError as error:
        reason = describe_connection_failure(error, ca_file=ca_file)
        untrusted = (
            classify_connection_failure(error).kind is FailureKind.UNTRUSTED_CERTIFICATE
        )
        if skipped_copy_for is not None and untrusted:
            reason += (
                f"; the CA copy {saved_ca_path(request.state_file)} was not used: it was "
                f"saved for {skipped_copy_for} (pass it as --ca-file if this server's "
                "certificate comes from the same CA)"
            )
        raise EnrollmentError(
            f"cannot reach the rendezvous at {server_url}: {reason}"
        ) from error
    body = _response_json(response)
    if not response.is_success:
        message = body.get("message") if isinstance(body, dict) else None
        raise EnrollmentError(
            f"the rendezvous refused the registration (HTTP {response.status_code}): "
            f"{message or 'no reason given'}"
        )
    if not isinstance(body, dict):
        raise EnrollmentError("the rendezvous answered the registration with no JSON object")
    service_keys = parse_service_keys(body.get("service_keys"))
    agent_id, team_id = body.get("agent_id"), body.get("team_id")
    if not isinstance(agent_id, str) or not isinstance(team_id, str) or not agent_id:
        raise EnrollmentError("the rendezvous's answer lacks the agent id or team id")
    policy_trust = parse_policy_trust(body, team_id, service_keys)
    tags = body.get("tags", [])
    saved_ca_file: str | None = None
    if ca_certificates is not None:
        saved_ca_file = str(saved_ca_path(request.state_file).resolve())
        try:
            write_private_file(Path(saved_ca_file), ca_certificates)
        except (OSError, ProtocolError) as error:
            raise EnrollmentError(
                f"registered as {agent_id}, but the CA file could not be copied into the "
                f"state dir: {error}; fix the state directory and enroll again with a new "
                "registration key"
            ) from None
    state = AgentState(
        agent_id=agent_id,
        team_id=team_id,
        server_url=server_url,
        identity_seed=identity.seed(),
        name=str(body.get("name") or hostname),
        tags=tuple(tag for tag in tags if isinstance(tag, str)) if isinstance(tags, list) else (),
        ca_file=saved_ca_file,
        service_keys=dict(body["service_keys"]),
        policy_trust=policy_trust.to_json(),
    )
    try:
        save_state(request.state_file, state, identifiers)
    except (OSError, ProtocolError, StateFileError) as error:
        raise EnrollmentError(
            f"registered as {agent_id}, but the state file could not be written: {error}; "
            "fix the state directory and enroll again with a new registration key"
        ) from None
    if warn is not None:
        for warning in registration_warnings(body):
            warn(warning)
    return state


def registration_warnings(body: Mapping[str, Any]) -> list[str]:
    """The rendezvous's warnings about a registration, as printable one-line text (a server
    that predates them sends none)."""
    warnings = body.get("warnings")
    if not isinstance(warnings, list):
        return []
    return [
        "".join(character if character.isprintable() else "?" for character in warning)
        [:MAX_REGISTRATION_WARNING_LENGTH]
        for warning in warnings[:MAX_REGISTRATION_WARNINGS] if isinstance(warning, str)
    ]


def enrollment_ca_file(
    request: EnrollmentRequest, identifiers: MachineIdentifiers
) -> tuple[Path | None, str | None]:
    """The CA file to trust, and the server a CA copy left unused was saved for (or None).

    The CA file is --ca-file, or on --force the copy the last enrollment saved when that
    enrollment was with the same server (scheme, host and port): a re-enrollment against a
    private CA then works without the original CA file, which the admin may well have deleted
    once the first enrollment had copied it, while a move to another server is not judged by
    the old server's CA. A state file this machine cannot unseal proves no server: its copy is
    not used either.
    """
    if request.ca_file is not None:
        return request.ca_file, None
    saved = saved_ca_path(request.state_file)
    if not request.force or not saved.is_file():
        return None, None
    try:
        previous_server = load_state(request.state_file, identifiers).server_url
    except StateFileError:
        return None, "an enrollment this host can no longer read"
    if same_origin(previous_server, request.server_url):
        return saved, None
    return None, previous_server


def same_origin(first_url: str, second_url: str) -> bool:
    """Whether two server URLs name the same scheme, host and port."""

    def origin(url: str) -> tuple[str, str, int | None]:
        parts = urlsplit(url)
        try:
            port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
        except ValueError:
            port = None
        return parts.scheme, (parts.hostname or "").lower().rstrip("."), port

    return origin(first_url) == origin(second_url)


def saved_ca_path(state_file: Path) -> Path:
    """Where enrollment keeps its copy of the rendezvous CA: beside the state file."""
    return Path(state_file).parent / SAVED_CA_FILE_NAME


def read_ca_certificates(path: Path) -> bytes:
    """The contents of the CA file at ``path``; EnrollmentError unless it is readable and holds
    one or more PEM certificates (what the TLS context will trust)."""
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_CA_FILE_SIZE + 1)
    except OSError as error:
        raise EnrollmentError(f"{path}: cannot read the CA file ({error.strerror})") from None
    if len(data) > MAX_CA_FILE_SIZE:
        raise EnrollmentError(f"{path}: larger than any CA file ({MAX_CA_FILE_SIZE} bytes)")
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise EnrollmentError(
            f"{path}: holds no PEM certificate (-----BEGIN CERTIFICATE-----); pass the CA "
            "certificate that signed the rendezvous's TLS certificate"
        ) from None
    return data


def prepare_state_dir(state_file: Path) -> None:
    """Create the state dir (0700) and prove a file of a state file's size can be written in
    it; EnrollmentError naming the problem (not a directory, read-only, full disk) if not."""
    directory = Path(state_file).parent
    if directory.exists() and not directory.is_dir():
        raise EnrollmentError(f"{directory}: the state directory is a file, not a directory")
    try:
        directory.mkdir(mode=STATE_DIRECTORY_MODE, parents=True, exist_ok=True)
    except OSError as error:
        raise EnrollmentError(
            f"{directory}: cannot create the state directory ({error.strerror})"
        ) from None
    if state_file.is_symlink() or (state_file.exists() and not state_file.is_file()):
        raise EnrollmentError(f"{state_file}: exists and is not a regular file; remove it")
    probe = directory / f".write-test-{secrets.token_hex(8)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, bytes(WRITE_TEST_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as error:
        raise EnrollmentError(
            f"{directory}: cannot write the state file there ({error.strerror}); fix that "
            "before enrolling (the registration key has not been used)"
        ) from None
    finally:
        probe.unlink(missing_ok=True)


def _response_json(response: httpx.Response) -> Any:
    if len(response.content) > MAX_RESPONSE_BYTES:
        raise EnrollmentError("the rendezvous's answer is larger than any registration answer")
    try:
        return response.json()
    except ValueError:
        return None
