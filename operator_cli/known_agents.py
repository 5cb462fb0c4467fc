"""Known agents, the operator's known_hosts: each agent id, and each agent name on a server,
pinned to the key first seen.

A later connection that presents another key for a pinned id is refused loudly, naming both
fingerprints and the command that accepts the new key. So is one where the rendezvous hands out,
for a name already pinned on that server, another agent id with another key: re-enrolling makes
a new id, and a rendezvous must not be able to swap the machine behind a name by minting one
(ssh's "REMOTE HOST IDENTIFICATION HAS CHANGED" for a host name). The file is JSON, mode 0600,
replaced atomically, and updated under an exclusive lock so two concurrent ``tucdesk`` commands
do not lose each other's pins. Version 1 files (ids only) are read and rewritten as version 2.
Names are pinned under the server URL in its normal form (``server_scope``: case, a default
port and a trailing slash do not count, as for ``tucdesk login``); entries written under
another spelling are read, and rewritten, under it.

Checking a key that is already pinned only reads the file, so a read-only CLI home (a CI
image, a mounted secret) still connects, as ssh does with a read-only ~/.ssh; a pin that must
be written and cannot be fails naming the file and why. In strict mode (``--strict-agent-keys``
or TUCDESK_STRICT_AGENT_KEYS=1, ssh's StrictHostKeyChecking=yes) an agent with no pin is refused
instead of pinned on first use; ``tucdesk agents trust AGENT --fingerprint SHA256:…`` pins an
expected key ahead of time.
"""

from __future__ import annotations

import fcntl
import hmac
import json
import os
import re
import stat
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from operator_cli.home import server_key
from protocol.identity import PublicIdentity, b64url, b64url_decode, write_private_file

KNOWN_AGENTS_FILE_NAME = "known_agents.json"
KNOWN_AGENTS_FORMAT_VERSION = 2
ID_ONLY_FORMAT_VERSION = 1  # before names were pinned: read, then rewritten as version 2
MAX_KNOWN_AGENTS_FILE_SIZE = 4 * 1024 * 1024
MAX_KNOWN_AGENTS = 20_000
MAX_KNOWN_NAMES = 20_000  # over every server
MAX_IDS_PER_NAME = 64  # agents sharing one name on one server that the operator accepted
MAX_SERVER_LENGTH = 2048
# Pins made without a server (library use); the CLI always scopes names by its server URL.
NO_SERVER = ""
_AGENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
# An agent's name is its host name as enrolled, or its id when it has none.
_AGENT_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,252}")


# Strict mode from the environment (the global --strict-agent-keys flag sets it too, so that
# the `tucdesk exec` children of exec --tag inherit it).
STRICT_AGENT_KEYS_ENV = "TUCDESK_STRICT_AGENT_KEYS"
_STRICT_ON = frozenset({"1", "true", "yes", "on"})
_STRICT_OFF = frozenset({"", "0", "false", "no", "off"})


class KnownAgentsError(Exception):
    """The known-agents file is unreadable, malformed, too large, too open, or cannot be
    written when a pin must be."""


class AgentKeyNotPinnedError(KnownAgentsError):
    """Strict mode: the agent has no pinned key, and pinning on first use is off."""

    def __init__(self, agent_id: str, name: str | None, path: Path) -> None:
        self.agent_id = agent_id
        shown = agent_id if name is None or name == agent_id else f"{name} ({agent_id})"
        target = agent_id if name is None else name
        super().__init__(
            f"no key is pinned for agent {shown} and strict agent key checking is on "
            f"(--strict-agent-keys or {STRICT_AGENT_KEYS_ENV}); the connection was refused. "
            f"Pin the key you expect (tucdesk-agent status on the host shows it) with: "
            f"tucdesk agents trust {target} --fingerprint SHA256:... (pins are kept in {path})"
        )


class AgentKeyChangedError(KnownAgentsError):
    """An agent presented a key other than the one pinned for it. Possibly an attack."""

    def __init__(
        self, agent_id: str, pinned: PublicIdentity, presented: PublicIdentity, path: Path
    ) -> None:
        self.agent_id = agent_id
        self.pinned = pinned
        self.presented = presented
        super().__init__(
            f"WARNING: the key of agent {agent_id} has changed!\n"
            f"  pinned key:    {pinned.fingerprint}\n"
            f"  presented key: {presented.fingerprint}\n"
            f"Someone may be intercepting this connection, or the agent was re-enrolled. "
            f"The connection was refused. If you have verified the new key, accept it with:\n"
            f"  tucdesk agents trust {agent_id}\n"
            f"(pins are kept in {path})"
        )


class AgentNameKeyChangedError(AgentKeyChangedError):
    """The name of a pinned agent now leads to another agent id with another key."""

    def __init__(
        self,
        name: str,
        pinned: Mapping[str, PublicIdentity],
        agent_id: str,
        presented: PublicIdentity,
        path: Path,
    ) -> None:
        self.agent_id = agent_id
        self.name = name
        self.pinned_ids = dict(pinned)
        self.pinned = next(iter(self.pinned_ids.values()))
        self.presented = presented
        pinned_lines = "".join(
            f"  pinned key:    {key.fingerprint}  ({pinned_id})\n"
            for pinned_id, key in sorted(self.pinned_ids.items())
        )
        KnownAgentsError.__init__(
            self,
            f"WARNING: the agent called {name} has changed: another agent id with another key!\n"
            f"{pinned_lines}"
            f"  presented key: {presented.fingerprint}  ({agent_id})\n"
            f"Someone may be intercepting this connection, or the agent was re-enrolled. "
            f"The connection was refused. If you have verified the new key (tucdesk-agent "
            f"status on the host), accept it with:\n"
            f"  tucdesk agents trust {name}\n"
            f"(or, while several agents are called {name}: tucdesk agents trust {agent_id}; "
            f"pins are kept in {path})",
        )


class PinOutcome(Enum):
    """What ``verify_or_pin`` found."""

    FIRST_USE = "first-use"  # nothing was pinned; the presented key is pinned now
    MATCHED = "matched"  # the presented key is the pinned one
    NEW_ID_SAME_KEY = "new-id-same-key"  # the name's pinned key, under a new id: pin moved


@dataclass
class _Pins:
    """The file's content: keys by agent id; agent ids by server, then by agent name."""

    agents: dict[str, bytes] = field(default_factory=dict)
    names: dict[str, dict[str, set[str]]] = field(default_factory=dict)

    def ids_named(self, server: str, name: str) -> set[str]:
        """The agent ids accepted for ``name`` on ``server`` (a live set: changes stick)."""
        return self.names.setdefault(server, {}).setdefault(name, set())

    def keys_of(self, agent_ids: Collection[str]) -> dict[str, bytes]:
        """The pinned keys of those of ``agent_ids`` that have one."""
        return {agent_id: self.agents[agent_id]
                for agent_id in agent_ids if agent_id in self.agents}


class KnownAgents:
    """The pins in one file (normally ``<CLI home>/known_agents.json``); names are pinned under
    ``server`` (the rendezvous URL the CLI is logged in to)."""

    def __init__(self, path: Path, server: str = NO_SERVER, *, strict: bool = False) -> None:
        self.path = Path(path)
        if len(server) > MAX_SERVER_LENGTH:
            raise KnownAgentsError(f"server URL longer than {MAX_SERVER_LENGTH} characters")
        self.server = server_scope(server)
        # Refuse (AgentKeyNotPinnedError) an agent with no pin instead of pinning it.
        self.strict = strict

    @classmethod
    def in_home(
        cls, cli_home: Path, server: str = NO_SERVER, environ: Mapping[str, str] | None = None
    ) -> KnownAgents:
        """The known-agents store under the CLI home directory, names scoped to ``server``,
        strict when ``environ`` (default: this process's) sets TUCDESK_STRICT_AGENT_KEYS."""
        return cls(Path(cli_home) / KNOWN_AGENTS_FILE_NAME, server,
                   strict=strict_agent_keys(os.environ if environ is None else environ))

    def pinned_key(self, agent_id: str) -> PublicIdentity | None:
        """The key pinned for ``agent_id``, or None."""
        _check_agent_id(agent_id)
        raw = self._read().agents.get(agent_id)
        return None if raw is None else PublicIdentity(raw)

    def pins_for_name(self, name: str) -> dict[str, PublicIdentity]:
        """The agent ids (and their keys) accepted for ``name`` on this server."""
        _check_agent_name(name)
        pins = self._read()
        named = pins.names.get(self.server, {}).get(name, set())
        return {agent_id: PublicIdentity(raw) for agent_id, raw in pins.keys_of(named).items()}

    def all_pins(self) -> dict[str, PublicIdentity]:
        """Every pin, by agent id."""
        return {agent_id: PublicIdentity(raw) for agent_id, raw in self._read().agents.items()}

    def verify_or_pin(
        self,
        agent_id: str,
        presented: PublicIdentity,
        name: str | None = None,
        addressed_by_id: bool = False,
    ) -> PinOutcome:
        """Accept the pinned key, pin a first-seen one, or raise AgentKeyChangedError.

        With ``name``, also refuse (AgentNameKeyChangedError) an id new to a pinned name unless
        it presents that name's pinned key; the name is pinned to the id from then on. With
        ``addressed_by_id`` (the operator typed this agent's id, not its name) only the id's pin
        judges: several agents may share a host name (cloned images), as ssh pins by host and
        not by what the host calls itself; the id joins the name's pins only when the name has
        none yet or the id presents one of its keys.
        """
        _check_agent_id(agent_id)
        if name is not None:
            _check_agent_name(name)
        # A key already pinned is checked from a plain read (no lock file: a read-only home
        # still connects); only a pin to write takes the lock and judges again under it.
        outcome, changed = self._judge(self._read(), agent_id, presented, name, addressed_by_id)
        if not changed:
            return outcome
        purpose = f"pin the key of agent {name or agent_id} ({presented.fingerprint})"
        with self._locked(purpose):
            pins = self._read()
            outcome, changed = self._judge(pins, agent_id, presented, name, addressed_by_id)
            if changed:
                self._write(pins, purpose)
            return outcome

    def _judge(
        self,
        pins: _Pins,
        agent_id: str,
        presented: PublicIdentity,
        name: str | None,
        addressed_by_id: bool,
    ) -> tuple[PinOutcome, bool]:
        """``verify_or_pin``'s decision on ``pins``, which it updates: (outcome, whether the
        pins changed and must be written). Raises as ``verify_or_pin`` does."""
        pinned = pins.agents.get(agent_id)
        if pinned is not None and not hmac.compare_digest(pinned, presented.raw):
            raise AgentKeyChangedError(agent_id, PublicIdentity(pinned), presented, self.path)
        outcome = PinOutcome.FIRST_USE if pinned is None else PinOutcome.MATCHED
        changed = pinned is None
        if name is not None:
            named = pins.ids_named(self.server, name)
            if agent_id not in named and addressed_by_id:
                # The id alone is pinned; the name takes it only when the name has no pin
                # yet or this is one of its keys: else one connection by id would let that
                # agent answer for the name from then on (`agents trust` moves a name).
                others = pins.keys_of(named)
                if not others or any(
                    hmac.compare_digest(raw, presented.raw) for raw in others.values()
                ):
                    named.intersection_update(others)
                    named.add(agent_id)
                    changed = True
                # Else the name's pins stay as they are: nothing to write for them (a
                # read-only home still verifies this pinned agent by its id).
            elif agent_id not in named:
                others = pins.keys_of(named)
                same_key = self._same_key_ids_or_refuse(name, others, agent_id, presented)
                if same_key:
                    named -= same_key  # the same machine, re-registered under a new id
                    outcome = PinOutcome.NEW_ID_SAME_KEY
                named.intersection_update(others)  # drop ids whose pin was forgotten
                named.add(agent_id)
                changed = True
        if outcome is PinOutcome.FIRST_USE and self.strict:
            # Strict: nothing pinned this key (neither the id nor, with the same key, the name).
            raise AgentKeyNotPinnedError(agent_id, name, self.path)
        if changed:
            pins.agents[agent_id] = presented.raw
        return outcome, changed

    def check_name(self, name: str, agent_id: str, presented: PublicIdentity) -> None:
        """Raise AgentNameKeyChangedError if ``name`` is pinned on this server to other agent
        ids and ``presented`` is none of their keys; pins nothing."""
        _check_agent_id(agent_id)
        _check_agent_name(name)
        pins = self._read()
        named = pins.names.get(self.server, {}).get(name, set())
        if agent_id not in named:
            self._same_key_ids_or_refuse(name, pins.keys_of(named), agent_id, presented)

    def _same_key_ids_or_refuse(
        self, name: str, others: Mapping[str, bytes], agent_id: str, presented: PublicIdentity
    ) -> set[str]:
        """The ids pinned for ``name`` whose key is ``presented``; raise if there are pinned ids
        and none has it (the rendezvous would be swapping the machine behind the name)."""
        same_key = {other for other, key in others.items()
                    if hmac.compare_digest(key, presented.raw)}
        if others and not same_key:
            raise AgentNameKeyChangedError(
                name, {other: PublicIdentity(key) for other, key in others.items()},
                agent_id, presented, self.path,
            )
        return same_key

    def trust(
        self,
        agent_id: str,
        key: PublicIdentity,
        name: str | None = None,
        keep: Collection[str] = (),
    ) -> PublicIdentity | None:
        """Pin ``key`` for ``agent_id``, replacing any earlier pin; return the replaced key.

        With ``name``, the name is pinned to ``agent_id`` and, of the ids pinned for it before,
        only those in ``keep`` (agents still registered under that name) stay accepted.
        """
        _check_agent_id(agent_id)
        if name is not None:
            _check_agent_name(name)
        purpose = f"pin the key of agent {name or agent_id} ({key.fingerprint})"
        with self._locked(purpose):
            pins = self._read()
            previous = pins.agents.get(agent_id)
            pins.agents[agent_id] = key.raw
            if name is not None:
                named = pins.ids_named(self.server, name)
                named.intersection_update(keep)
                named.add(agent_id)
            self._write(pins, purpose)
        return None if previous is None else PublicIdentity(previous)

    def forget(self, agent_id: str) -> bool:
        """Remove the pin for ``agent_id``; True if there was one."""
        _check_agent_id(agent_id)
        purpose = f"forget the key of agent {agent_id}"
        with self._locked(purpose):
            pins = self._read()
            if pins.agents.pop(agent_id, None) is None:
                return False
            self._write(pins, purpose)
            return True

    @contextmanager
    def _locked(self, purpose: str) -> Iterator[None]:
        """Hold the file's update lock (for a write: ``purpose`` says which, if it fails)."""
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise self._not_writable(purpose, error, lock_path) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> _Pins:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return _Pins()
        except OSError as error:
            raise KnownAgentsError(f"{self.path}: cannot open ({error.strerror})") from None
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise KnownAgentsError(f"{self.path}: not a regular file")
            if info.st_mode & 0o022:
                raise KnownAgentsError(
                    f"{self.path}: others can change the pinned agent keys "
                    f"(permissions {stat.S_IMODE(info.st_mode):04o}); run 'chmod 600 {self.path}'"
                )
            data = handle.read(MAX_KNOWN_AGENTS_FILE_SIZE + 1)
        if len(data) > MAX_KNOWN_AGENTS_FILE_SIZE:
            raise KnownAgentsError(
                f"{self.path}: larger than {MAX_KNOWN_AGENTS_FILE_SIZE} bytes; it is not a "
                f"known-agents file, move it aside"
            )
        return _parse(data, self.path)

    def _not_writable(self, purpose: str, error: OSError, at: Path) -> KnownAgentsError:
        """The error for a pin that had to be written and could not be."""
        why = error.strerror or str(error)
        where = "" if at == self.path else f"; its lock file {at} cannot be created"
        return KnownAgentsError(
            f"cannot {purpose}: {self.path} cannot be written ({why}{where}). Keys already "
            f"pinned there are still checked; to pin a new agent, make the CLI home writable or "
            f"pin it ahead of time where it is (tucdesk agents trust AGENT --fingerprint "
            f"SHA256:...)"
        )

    def _write(self, pins: _Pins, purpose: str) -> None:
        if len(pins.agents) > MAX_KNOWN_AGENTS:
            raise KnownAgentsError(
                f"{self.path}: more than {MAX_KNOWN_AGENTS} pinned agents; remove stale entries "
                f"from it"
            )
        names = {
            server: {name: sorted(ids) for name, ids in named.items() if ids}
            for server, named in pins.names.items()
        }
        names = {server: named for server, named in names.items() if named}
        if sum(len(named) for named in names.values()) > MAX_KNOWN_NAMES:
            raise KnownAgentsError(
                f"{self.path}: more than {MAX_KNOWN_NAMES} pinned agent names; remove stale "
                f"entries from it"
            )
        document = {
            "version": KNOWN_AGENTS_FORMAT_VERSION,
            "agents": {
                agent_id: {"public_key": b64url(raw)} for agent_id, raw in pins.agents.items()
            },
            "names": names,
        }
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        try:
            write_private_file(self.path, text.encode())
        except OSError as error:
            raise self._not_writable(purpose, error, self.path) from None


def _parse(data: bytes, path: Path) -> _Pins:
    unreadable = f"{path}: not a readable known-agents file; move it aside and reconnect to re-pin"
    try:
        document: Any = json.loads(data)
    except ValueError:
        raise KnownAgentsError(unreadable) from None
    if not isinstance(document, dict) or document.get("version") not in (
        ID_ONLY_FORMAT_VERSION, KNOWN_AGENTS_FORMAT_VERSION,
    ):
        raise KnownAgentsError(unreadable)
    agents = document.get("agents")
    if not isinstance(agents, dict) or len(agents) > MAX_KNOWN_AGENTS:
        raise KnownAgentsError(unreadable)
    pins = _Pins()
    for agent_id, entry in agents.items():
        if not isinstance(entry, dict) or not _AGENT_ID_PATTERN.fullmatch(agent_id):
            raise KnownAgentsError(f"{unreadable} (bad entry {agent_id[:40]!r})")
        try:
            pins.agents[agent_id] = PublicIdentity(b64url_decode(entry["public_key"], 64)).raw
        except Exception:
            raise KnownAgentsError(f"{unreadable} (bad key for {agent_id[:40]!r})") from None
    if document["version"] == ID_ONLY_FORMAT_VERSION:
        return pins  # names were not pinned yet: each is pinned at its next connection
    pins.names = _parse_names(document.get("names"), unreadable)
    return pins


def _parse_names(names: Any, unreadable: str) -> dict[str, dict[str, set[str]]]:
    if not isinstance(names, dict):
        raise KnownAgentsError(unreadable)
    parsed: dict[str, dict[str, set[str]]] = {}
    count = 0
    for server, named in names.items():
        if len(server) > MAX_SERVER_LENGTH or not isinstance(named, dict):
            raise KnownAgentsError(f"{unreadable} (bad server {server[:40]!r})")
        count += len(named)
        if count > MAX_KNOWN_NAMES:
            raise KnownAgentsError(unreadable)
        scoped = parsed.setdefault(server_scope(server), {})
        for name, agent_ids in named.items():
            if (not _AGENT_NAME_PATTERN.fullmatch(name) or not isinstance(agent_ids, list)
                    or len(agent_ids) > MAX_IDS_PER_NAME
                    or not all(isinstance(agent_id, str) and _AGENT_ID_PATTERN.fullmatch(agent_id)
                               for agent_id in agent_ids)):
                raise KnownAgentsError(f"{unreadable} (bad entry for name {name[:40]!r})")
            # Entries written before servers were normalized merge into the normalized scope.
            scoped.setdefault(name, set()).update(agent_ids)
    return parsed


def server_scope(server: str) -> str:
    """The form names are pinned under: the server URL normalized as ``home.server_key``
    compares them (case, default port and a trailing slash do not count); NO_SERVER stays."""
    if not server.strip():
        return NO_SERVER
    scheme, host, port, path = server_key(server)
    if not host:
        return server.strip().rstrip("/")  # not a URL the CLI would log in to: keep it as typed
    return f"{scheme}://{host}{'' if port is None else f':{port}'}{path}"


def _check_agent_id(agent_id: str) -> None:
    if not isinstance(agent_id, str) or not _AGENT_ID_PATTERN.fullmatch(agent_id):
        raise KnownAgentsError(f"{agent_id!r} is not an agent id")


def _check_agent_name(name: str) -> None:
    if not isinstance(name, str) or not _AGENT_NAME_PATTERN.fullmatch(name):
        raise KnownAgentsError(f"{name[:40]!r} is not an agent name")


def strict_agent_keys(environ: Mapping[str, str]) -> bool:
    """Whether TUCDESK_STRICT_AGENT_KEYS in ``environ`` asks for strict agent key checking; a
    value that is neither on nor off is an error (a typo must not turn strictness off)."""
    value = environ.get(STRICT_AGENT_KEYS_ENV, "").strip().lower()
    if value in _STRICT_ON:
        return True
    if value in _STRICT_OFF:
        return False
    raise KnownAgentsError(
        f"{STRICT_AGENT_KEYS_ENV}={value[:20]!r} is neither on (1, true, yes) nor off (0, false, "
        f"no)"
    )
