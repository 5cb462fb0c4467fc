"""The team roster: each operator key's thumbprint, email and role, as admins signed it.

Agents learn from the roster which keys may open sessions (admin, operator) and which may
approve (admin, approver). Keys are named by their RFC 7638 thumbprint, the same value as the
``cnf.jkt`` of access tokens and the operator key thumbprint in session grants.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from protocol.errors import ProtocolError
from protocol.identity import PublicIdentity, b64url, b64url_decode
from protocol.policy.request import RequestingOperator

MAX_ROSTER_ENTRIES = 4096
MAX_EMAIL_LENGTH = 254
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
_ENTRY_KEYS = frozenset({"public_key", "email", "role"})


class Role(StrEnum):
    """What an operator may do in their team."""

    ADMIN = "admin"
    OPERATOR = "operator"
    APPROVER = "approver"
    AUDITOR = "auditor"


SESSION_ROLES = frozenset({Role.ADMIN, Role.OPERATOR})
APPROVER_ROLES = frozenset({Role.ADMIN, Role.APPROVER})


class RosterError(ValueError):
    """A roster entry or the roster as a whole is malformed."""


@dataclass(frozen=True)
class RosterEntry:
    """One operator key with the email and role of the person holding it."""

    public_key: PublicIdentity
    email: str
    role: Role

    def __post_init__(self) -> None:
        if not isinstance(self.public_key, PublicIdentity):
            raise RosterError("a roster entry's key must be a PublicIdentity")
        if not isinstance(self.email, str) or not check_email(self.email):
            raise RosterError("a roster entry needs an email address")
        object.__setattr__(self, "email", self.email.lower())
        try:
            object.__setattr__(self, "role", Role(self.role))
        except ValueError:
            raise RosterError(
                f"role must be one of {', '.join(role.value for role in Role)}"
            ) from None

    @property
    def thumbprint(self) -> str:
        """The key's RFC 7638 thumbprint, by which grants and approvals name it."""
        return self.public_key.key_id

    def to_json(self) -> dict[str, str]:
        """The entry as a JSON object: base64url public key, email, role."""
        return {"public_key": b64url(self.public_key.raw), "email": self.email, "role": self.role}

    @classmethod
    def from_json(cls, data: object) -> RosterEntry:
        """Parse an entry written by to_json; raise RosterError if it is malformed."""
        if not isinstance(data, dict) or set(data) != _ENTRY_KEYS:
            raise RosterError(f"a roster entry has exactly the keys {sorted(_ENTRY_KEYS)}")
        key_text, email, role = data["public_key"], data["email"], data["role"]
        if not all(isinstance(value, str) for value in (key_text, email, role)):
            raise RosterError("roster entry values must be text")
        try:
            public_key = PublicIdentity(b64url_decode(key_text, max_size=64))
        except (ProtocolError, ValueError) as error:
            raise RosterError(f"a roster entry's public key is invalid: {error}") from None
        return cls(public_key, email, role)


@dataclass(frozen=True)
class Roster:
    """Every operator key of one team; at most one entry per key."""

    entries: tuple[RosterEntry, ...]  # in thumbprint order
    _by_thumbprint: Mapping[str, RosterEntry] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Kept in thumbprint order, so equal rosters compare and encode equal.
        entries = tuple(sorted(self.entries, key=_thumbprint_of))
        if len(entries) > MAX_ROSTER_ENTRIES:
            raise RosterError(f"a roster has at most {MAX_ROSTER_ENTRIES} entries")
        by_thumbprint: dict[str, RosterEntry] = {}
        for entry in entries:
            if not isinstance(entry, RosterEntry):
                raise RosterError("roster entries must be RosterEntry values")
            if entry.thumbprint in by_thumbprint:
                raise RosterError(f"key {entry.thumbprint} is in the roster twice")
            by_thumbprint[entry.thumbprint] = entry
        object.__setattr__(self, "entries", entries)
        object.__setattr__(self, "_by_thumbprint", by_thumbprint)

    def entry_for(self, thumbprint: str) -> RosterEntry | None:
        """The roster entry of the key with this thumbprint, or None if it is not a team key."""
        return self._by_thumbprint.get(thumbprint)

    def may_open_sessions(self, thumbprint: str) -> bool:
        """Whether the key is in the roster with a role that may open sessions."""
        entry = self.entry_for(thumbprint)
        return entry is not None and entry.role in SESSION_ROLES

    def may_approve(self, thumbprint: str) -> bool:
        """Whether the key is in the roster with a role that may approve requests."""
        entry = self.entry_for(thumbprint)
        return entry is not None and entry.role in APPROVER_ROLES

    def admin_keys(self) -> dict[str, PublicIdentity]:
        """The admins' keys by thumbprint: who may sign the next policy and roster."""
        return {
            entry.thumbprint: entry.public_key for entry in self.entries if entry.role is Role.ADMIN
        }

    def requesting_operator(self, thumbprint: str) -> RequestingOperator:
        """The operator, as decide() takes it, for a key in the roster; KeyError if absent."""
        entry = self.entry_for(thumbprint)
        if entry is None:
            raise KeyError("the key is not in the team roster")
        return RequestingOperator(email=entry.email, role=entry.role, key_thumbprint=thumbprint)

    def to_json(self) -> list[dict[str, str]]:
        """The roster as a JSON list, in thumbprint order so its encoding is canonical."""
        return [entry.to_json() for entry in self.entries]

    @classmethod
    def from_json(cls, data: object) -> Roster:
        """Parse a roster written by to_json; raise RosterError if it is malformed."""
        if not isinstance(data, list):
            raise RosterError("a roster is a list of entries")
        if len(data) > MAX_ROSTER_ENTRIES:
            raise RosterError(f"a roster has at most {MAX_ROSTER_ENTRIES} entries")
        return cls(tuple(RosterEntry.from_json(item) for item in data))

    @classmethod
    def of(cls, entries: Iterable[RosterEntry]) -> Roster:
        """A roster of ``entries``."""
        return cls(tuple(entries))


def _thumbprint_of(entry: object) -> str:
    if not isinstance(entry, RosterEntry):
        raise RosterError("roster entries must be RosterEntry values")
    return entry.thumbprint


def check_email(text: str) -> bool:
    """Whether ``text`` looks like one email address of a sane length (no full RFC 5322 check)."""
    return (
        len(text) <= MAX_EMAIL_LENGTH
        and text.isprintable()
        and _EMAIL.fullmatch(text) is not None
    )
