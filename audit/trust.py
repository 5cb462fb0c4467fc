"""Which keys may sign records in a team's log.

Trust starts only from pinned audit keys (the rendezvous audit key, and older ones kept for
rotation). Agents are not pinned one by one: an agent's key becomes trusted when an earlier
record in the same log, signed by a pinned audit key, has action ``agent.registered``, the agent
id as target, and the agent's public key and key id in its context. From then on records signed
by that key are accepted, but only with an ``agent`` actor whose id is that agent's id, so one
agent can never speak for another. The other way round, an audit key never speaks for an agent
about what it ran: a ``session.started``, ``session.command`` or ``session.ended`` with an
``agent`` actor must be signed by that agent's key (``AGENT_SELF_SIGNED_ACTIONS``); what the
rendezvous records in an agent's name under the audit key (it connected, used a registration
key, refused a session or a policy) stays valid. Keys listed in an export bundle are hints,
never anchors. A record of an action this release does not know (a newer release's,
``record.UnknownAction``) is held to the same signer rules, but introduces, retires and
removes nothing here, and a newer agent-only action signed by an audit key in an agent's name
cannot be told apart: the verifier reports such records (NEWER), it cannot vouch for them.

An audit key is rotated the same way: a ``service_key.rotated`` record for the ``audit-signer``
purpose, signed by the trusted audit key it retires (``old_fingerprint`` must be the signer's),
introduces the new key named in its context as an audit key from then on. So an auditor who
pinned only the original key verifies a log across any number of rotations, each one vouched for
by the key before it; a key no such record introduced is refused like any unknown signer.

A rotated-out key is retired from its rotation record on. Records and checkpoints it signs after
that still verify, since an instance keeps signing with the old key until it is reloaded
(SIGHUP), for as long as the runbook's steps take, but they are counted (``late_signatures``)
and reported, because a leaked key would sign the same way; refusing them would make an honest
log unverifiable for good. A second rotation signed by a key that already rotated (a fork:
whoever holds a leaked old key naming a successor of their own) is refused. Only a checkpoint
kept from after the rotation (``--previous-checkpoint``) keeps a leaked old key from rewriting
what came before it (docs/self-hosting.md, "Rotating service keys").

Whoever holds the audit key can introduce agent keys, so the log is held to what an honest
rendezvous writes: an agent id is registered once (re-enrolling makes a new agent id), so a
second ``agent.registered`` for it is refused. After an ``agent.removed`` the agent's key never
authenticates again and the rendezvous refuses its events, but an event it signed later may
still land: the check and the removal race (on several instances the agent's channel on another
instance stays open until that instance hears of the removal). Such events (dated more than
``REMOVED_AGENT_CLOCK_SKEW`` after the removal: an event spooled before it may be delivered
after it, and the agent's clock may run that far ahead) are reported (``signed_after_removal``),
not refused: refusing them would make an honest log unverifiable for good, and closing the race
would couple the log to the agent table. An auditor who knows agents' fingerprints out of band
pins them (``agent_pins``: agent id, name or hostname -> fingerprint): a registration of a pinned
agent with another key is refused. A pin no registration matches checked nothing, and whoever
registers an agent chooses its name and hostname (``web-l`` for ``web-1``), so such pins are
reported (``unmatched_agent_pins``) with the registered names that look like them; a pin by
agent id is the robust form (the rendezvous makes the id).
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from audit.actions import Action, ActorKind
from audit.errors import RecordError, UnknownSigner
from audit.record import MAX_EVENT_FUTURE_SKEW, AuditEvent, JsonValue, SignedEvent
from protocol.errors import ProtocolError
from protocol.identity import PUBLIC_KEY_SIZE, PublicIdentity, b64url, b64url_decode

AGENT_PUBLIC_KEY_FIELD = "agent_public_key"
AGENT_KEY_ID_FIELD = "agent_key_id"
AUDIT_SIGNER_PURPOSE = "audit-signer"
ROTATION_PURPOSE_FIELD = "purpose"
ROTATION_OLD_FINGERPRINT_FIELD = "old_fingerprint"
ROTATION_NEW_FINGERPRINT_FIELD = "new_fingerprint"
ROTATION_NEW_PUBLIC_KEY_FIELD = "new_public_key"
ROTATION_NEW_KEY_ID_FIELD = "new_key_id"
AGENT_HOSTNAME_FIELD = "hostname"
AGENT_NAME_FIELD = "name"
# What only an agent's own key signs in its name: what it ran in a session (the agent signs
# these on its host; the rendezvous records a session's end itself as the service). The
# rendezvous records other actions with an agent actor under the audit key (agent.connected,
# registration_key.used, agent.registered, session.refused and policy.refused as the agent
# answered them), so only these are refused when an audit key signs them.
AGENT_SELF_SIGNED_ACTIONS = frozenset(
    {Action.SESSION_STARTED, Action.SESSION_COMMAND, Action.SESSION_ENDED}
)
# How far an agent's clock may run ahead of the log's: the same allowance as the log's own
# check on agent events (an event dated later than this after the removal was signed after it).
REMOVED_AGENT_CLOCK_SKEW = MAX_EVENT_FUTURE_SKEW
# Record numbers kept per agent for the signed-after-removal warning (the count is exact).
MAX_LISTED_AFTER_REMOVAL = 20
# Registered names (ids, names, hostnames) named beside a pin that matched none of them.
MAX_SIMILAR_NAMES = 3
# Lookalikes are searched for the first pins only (each search walks every registered name:
# about 50 ms for 200,000 names), as many as the OK line lists.
MAX_PINS_WITH_SIMILAR = 20
SIMILAR_NAME_CUTOFF = 0.75  # difflib ratio: "web-1" and "web-l" (or "Web-1") score 0.8


def agent_registration_context(
    agent_key: PublicIdentity, **extra: JsonValue
) -> dict[str, JsonValue]:
    """The context an ``agent.registered`` record needs to introduce ``agent_key``."""
    return {
        **extra,
        AGENT_PUBLIC_KEY_FIELD: b64url(agent_key.raw),
        AGENT_KEY_ID_FIELD: agent_key.key_id,
    }


def introduced_agent_key(event: AuditEvent) -> tuple[str, PublicIdentity]:
    """The (agent id, public key) an ``agent.registered`` event introduces, or RecordError."""
    if event.action is not Action.AGENT_REGISTERED:
        raise RecordError("only agent.registered records introduce agent keys")
    if not event.target:
        raise RecordError("agent.registered must name the agent id as its target")
    encoded = event.context.get(AGENT_PUBLIC_KEY_FIELD)
    key_id = event.context.get(AGENT_KEY_ID_FIELD)
    if not isinstance(encoded, str) or not isinstance(key_id, str):
        raise RecordError(
            f"agent.registered context needs {AGENT_PUBLIC_KEY_FIELD} and {AGENT_KEY_ID_FIELD}"
        )
    try:
        key = PublicIdentity(b64url_decode(encoded, max_size=PUBLIC_KEY_SIZE))
    except ProtocolError:
        raise RecordError(f"agent.registered {AGENT_PUBLIC_KEY_FIELD} is not a key") from None
    if b64url(key.raw) != encoded or key.key_id != key_id:
        raise RecordError(f"agent.registered {AGENT_KEY_ID_FIELD} does not match the key")
    return event.target, key


def service_key_rotation_context(
    purpose: str, old_key: PublicIdentity, new_key: PublicIdentity, **extra: JsonValue
) -> dict[str, JsonValue]:
    """The context of a ``service_key.rotated`` record replacing ``old_key`` by ``new_key``."""
    return {
        **extra,
        ROTATION_PURPOSE_FIELD: purpose,
        ROTATION_OLD_FINGERPRINT_FIELD: old_key.fingerprint,
        ROTATION_NEW_FINGERPRINT_FIELD: new_key.fingerprint,
        ROTATION_NEW_PUBLIC_KEY_FIELD: b64url(new_key.raw),
        ROTATION_NEW_KEY_ID_FIELD: new_key.key_id,
    }


def introduced_audit_key(event: AuditEvent, signer: PublicIdentity) -> PublicIdentity | None:
    """The new audit key a ``service_key.rotated`` event signed by ``signer`` introduces; None
    for a rotation of another purpose. RecordError if it is malformed or ``signer`` is not the
    key it retires."""
    if event.action is not Action.SERVICE_KEY_ROTATED:
        raise RecordError("only service_key.rotated records introduce audit keys")
    if event.context.get(ROTATION_PURPOSE_FIELD) != AUDIT_SIGNER_PURPOSE:
        return None
    if event.actor.kind is not ActorKind.SERVICE:
        raise RecordError("an audit key rotation must be recorded by the service")
    if event.context.get(ROTATION_OLD_FINGERPRINT_FIELD) != signer.fingerprint:
        raise RecordError(
            "an audit key rotation must be signed by the key it retires "
            f"({event.context.get(ROTATION_OLD_FINGERPRINT_FIELD)!s:.80}), not {signer.fingerprint}"
        )
    encoded = event.context.get(ROTATION_NEW_PUBLIC_KEY_FIELD)
    key_id = event.context.get(ROTATION_NEW_KEY_ID_FIELD)
    fingerprint = event.context.get(ROTATION_NEW_FINGERPRINT_FIELD)
    if not isinstance(encoded, str) or not isinstance(key_id, str):
        raise RecordError(
            f"service_key.rotated context needs {ROTATION_NEW_PUBLIC_KEY_FIELD} and "
            f"{ROTATION_NEW_KEY_ID_FIELD}"
        )
    try:
        key = PublicIdentity(b64url_decode(encoded, max_size=PUBLIC_KEY_SIZE))
    except ProtocolError:
        raise RecordError(
            f"service_key.rotated {ROTATION_NEW_PUBLIC_KEY_FIELD} is not a key"
        ) from None
    if b64url(key.raw) != encoded or key.key_id != key_id or key.fingerprint != fingerprint:
        raise RecordError("service_key.rotated names a new key id or fingerprint of another key")
    if key.key_id == signer.key_id:
        raise RecordError("an audit key rotation must introduce a different key")
    return key


def agent_names(event: AuditEvent, agent_id: str) -> list[str]:
    """The names an ``agent.registered`` event gives its agent: its id, then its name (what
    ``tucdesk agents`` shows) and hostname from the context, as an auditor may pin it with
    ``--agent-key`` (records from before the name was logged give only the hostname)."""
    names = [agent_id]
    for field_name in (AGENT_NAME_FIELD, AGENT_HOSTNAME_FIELD):
        value = event.context.get(field_name)
        if isinstance(value, str) and value and value not in names:
            names.append(value)
    return names


@dataclass(frozen=True)
class AgentRegistration:
    """An agent key introduced by the ``agent.registered`` record at ``seq``."""

    seq: int
    agent_id: str
    key: PublicIdentity
    name: str | None
    """The name (else the hostname) the registration gives, for people."""


@dataclass(frozen=True)
class AgentRemoval:
    """An ``agent.removed`` record: at ``seq``, logged at ``time``."""

    seq: int
    time: datetime | None


@dataclass
class RemovedAgentSignatures:
    """Records an agent signed after its ``agent.removed`` (record ``removal_seq``): ``count``
    of them, the first MAX_LISTED_AFTER_REMOVAL in ``seqs``."""

    agent_id: str
    removal_seq: int
    count: int = 0
    seqs: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class UnmatchedAgentPin:
    """An agent pin (``name`` -> ``fingerprint``) that no registration in the log matched, so it
    checked nothing; ``similar`` holds registered (name, agent id) pairs that look like it."""

    name: str
    fingerprint: str
    similar: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AuditKeyRotation:
    """An audit key introduced by a rotation record its predecessor signed."""

    old_key: PublicIdentity
    new_key: PublicIdentity


class SignerTrust:
    """The keys trusted to sign one log's records, growing as ``agent.registered`` records pass."""

    def __init__(
        self,
        audit_keys: Sequence[PublicIdentity],
        agent_pins: Mapping[str, str] | None = None,
    ) -> None:
        self._audit_keys = {key.key_id: key for key in audit_keys}
        self._agent_keys: dict[str, tuple[str, PublicIdentity]] = {}
        self._agent_pins = dict(agent_pins or {})
        self._matched_pins: set[str] = set()
        # Every id, name and hostname registrations gave (-> agent id), kept only with pins.
        self._registered_names: dict[str, str] = {}
        # Registrations and removals by agent id, as the audit-key-signed records made them.
        self.registrations: dict[str, AgentRegistration] = {}
        self._removals: dict[str, AgentRemoval] = {}
        self.rotations: list[AuditKeyRotation] = []
        self._records = 0  # records accepted so far
        # Retired audit keys: key id -> (records accepted when its rotation was, its successor)
        self._retired: dict[str, tuple[int, PublicIdentity]] = {}
        # Signatures by a retired audit key after its rotation record, by key id (reported).
        self.late_signatures: dict[str, int] = {}
        # Agent-signed records dated after their agent's removal, by agent id (reported).
        self.signed_after_removal: dict[str, RemovedAgentSignatures] = {}

    @property
    def audit_keys(self) -> list[PublicIdentity]:
        """The pinned audit keys and those rotations introduced so far, in that order."""
        return list(self._audit_keys.values())

    @property
    def agent_keys(self) -> dict[str, PublicIdentity]:
        """Agent keys introduced so far, by key id."""
        return {key_id: key for key_id, (_, key) in self._agent_keys.items()}

    def is_audit_key(self, key_id: str) -> bool:
        """Whether ``key_id`` names a pinned audit key."""
        return key_id in self._audit_keys

    def accept(self, signed: SignedEvent, log_time: datetime | None = None) -> None:
        """Verify ``signed`` (the record at position ``records accepted so far``, logged at
        ``log_time``) against a trusted key, then learn any agent key it introduces."""
        self._accept(signed, log_time)
        self._records += 1

    def _accept(self, signed: SignedEvent, log_time: datetime | None) -> None:
        signer = signed.event.signer
        if signer in self._audit_keys:
            audit_key = self._audit_keys[signer]
            signed.verify(audit_key)
            actor = signed.event.actor
            if actor.kind is ActorKind.AGENT and signed.event.action in AGENT_SELF_SIGNED_ACTIONS:
                raise RecordError(
                    f"{signed.event.action.value} by agent {actor.id:.80} is signed by an audit "
                    "key, not the agent's: only the agent's own key signs what it ran, so "
                    "whoever holds the audit key wrote this in the agent's name"
                )
            self.note_retired_signature(signer, self._records + 1)
            if signed.event.action is Action.AGENT_REGISTERED:
                agent_id, key = introduced_agent_key(signed.event)
                self._register_agent(signed.event, agent_id, key)
            elif signed.event.action is Action.AGENT_REMOVED and signed.event.target:
                self._removals.setdefault(
                    signed.event.target, AgentRemoval(self._records, log_time)
                )
            elif signed.event.action is Action.SERVICE_KEY_ROTATED:
                new_key = introduced_audit_key(signed.event, audit_key)
                if new_key is not None:
                    self._follow_rotation(audit_key, new_key)
            return
        if signer in self._agent_keys:
            agent_id, key = self._agent_keys[signer]
            actor = signed.event.actor
            if actor.kind is not ActorKind.AGENT or actor.id != agent_id:
                raise RecordError(f"agent key {signer} may only sign as agent {agent_id}")
            signed.verify(key)
            self._note_if_removed(signed.event, agent_id)
            return
        raise UnknownSigner(signer)

    def _register_agent(self, event: AuditEvent, agent_id: str, key: PublicIdentity) -> None:
        """Learn ``key`` as ``agent_id``'s; RecordError for a second registration of one agent
        id, or a key other than the one the auditor pinned for it."""
        earlier = self.registrations.get(agent_id)
        if earlier is not None:
            raise RecordError(
                f"agent {agent_id} was already registered by record {earlier.seq} (key "
                f"{earlier.key.fingerprint}); this second agent.registered names key "
                f"{key.fingerprint}: re-enrolling makes a new agent id, so an honest log never "
                "registers one twice (whoever held the audit key added it?)"
            )
        names = agent_names(event, agent_id)
        for name in names:
            pinned = self._agent_pins.get(name)
            if pinned is None:
                continue
            if pinned != key.fingerprint:
                raise RecordError(
                    f"agent {name} is registered with key {key.fingerprint}, but --agent-key "
                    f"pins {pinned} for it"
                )
            self._matched_pins.add(name)
        if self._agent_pins:
            for name in names:
                self._registered_names.setdefault(name, agent_id)
        self.registrations[agent_id] = AgentRegistration(
            self._records, agent_id, key, names[1] if len(names) > 1 else None
        )
        self._agent_keys[key.key_id] = (agent_id, key)

    def _note_if_removed(self, event: AuditEvent, agent_id: str) -> None:
        """Note the record being accepted in ``signed_after_removal`` if ``agent_id`` was
        removed earlier in the log and signed ``event`` after that (an event signed before, and
        delivered late, is fine)."""
        removal = self._removals.get(agent_id)
        if removal is None:
            return
        if removal.time is not None and event.occurred_at <= (
            removal.time + REMOVED_AGENT_CLOCK_SKEW
        ):
            return
        noted = self.signed_after_removal.setdefault(
            agent_id, RemovedAgentSignatures(agent_id, removal.seq)
        )
        noted.count += 1
        if len(noted.seqs) < MAX_LISTED_AFTER_REMOVAL:
            noted.seqs.append(self._records)

    def _follow_rotation(self, old_key: PublicIdentity, new_key: PublicIdentity) -> None:
        """Retire ``old_key`` in favour of ``new_key``; RecordError if it already rotated to
        another key (a fork)."""
        earlier = self._retired.get(old_key.key_id)
        if earlier is not None:
            if earlier[1].key_id == new_key.key_id:
                return  # the same rotation recorded again (instances writing it twice)
            raise RecordError(
                f"audit key {old_key.fingerprint} already rotated to {earlier[1].fingerprint}; "
                f"a second rotation to {new_key.fingerprint} is a fork (the old key leaked?)"
            )
        self._retired[old_key.key_id] = (self._records, new_key)
        if new_key.key_id not in self._audit_keys:
            self._audit_keys[new_key.key_id] = new_key
            self.rotations.append(AuditKeyRotation(old_key, new_key))

    def note_retired_signature(self, key_id: str, at_size: int) -> None:
        """Count a signature by ``key_id`` over the first ``at_size`` records (a record at that
        position, or a checkpoint of that size) made after its rotation record, if it was
        retired (``late_signatures``: key id -> count)."""
        retired = self._retired.get(key_id)
        if retired is not None and at_size > retired[0] + 1:
            self.late_signatures[key_id] = self.late_signatures.get(key_id, 0) + 1

    def unmatched_agent_pins(self) -> list[UnmatchedAgentPin]:
        """The agent pins no registration so far matched (by id, name or hostname), in the
        order given, the first MAX_PINS_WITH_SIMILAR with the registered names closest to it."""
        unmatched: list[UnmatchedAgentPin] = []
        for name, fingerprint in self._agent_pins.items():
            if name in self._matched_pins:
                continue
            similar = (
                difflib.get_close_matches(
                    name, self._registered_names, MAX_SIMILAR_NAMES, SIMILAR_NAME_CUTOFF
                )
                if len(unmatched) < MAX_PINS_WITH_SIMILAR
                else []
            )
            unmatched.append(
                UnmatchedAgentPin(
                    name,
                    fingerprint,
                    tuple((alike, self._registered_names[alike]) for alike in similar),
                )
            )
        return unmatched

    def agent_name(self, agent_id: str) -> str | None:
        """The name (else the hostname) the registration of ``agent_id`` gave, if any."""
        registration = self.registrations.get(agent_id)
        return None if registration is None else registration.name

    def describe(self, key_id: str) -> tuple[str, str | None, PublicIdentity] | None:
        """(role ``audit`` or ``agent``, agent id for an agent key, the key) of a trusted key."""
        if key_id in self._audit_keys:
            return "audit", None, self._audit_keys[key_id]
        if key_id in self._agent_keys:
            agent_id, key = self._agent_keys[key_id]
            return "agent", agent_id, key
        return None
