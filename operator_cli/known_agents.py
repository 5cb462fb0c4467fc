"""Known agents, the operator's known_hosts: each agent id pinned to the public key first seen.

A later connection that presents another key is refused loudly, naming both fingerprints and the
command that accepts the new key. The file is JSON, mode 0600, replaced atomically, and updated
under an exclusive lock so two concurrent ``tucdesk`` commands do not lose each other's pins.
"""

from __future__ import annotations

import fcntl
import hmac
import json
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from protocol.identity import PublicIdentity, b64url, b64url_decode, write_private_file

KNOWN_AGENTS_FILE_NAME = "known_agents.json"
KNOWN_AGENTS_FORMAT_VERSION = 1
MAX_KNOWN_AGENTS_FILE_SIZE = 4 * 1024 * 1024
MAX_KNOWN_AGENTS = 20_000
_AGENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")


class KnownAgentsError(Exception):
    """The known-agents file is unreadable, malformed, too large, or too open."""


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


class PinOutcome(Enum):
    """What ``verify_or_pin`` found."""

    FIRST_USE = "first-use"  # nothing was pinned; the presented key is pinned now
    MATCHED = "matched"  # the presented key is the pinned one


class KnownAgents:
    """The pins in one file (normally ``<CLI home>/known_agents.json``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def in_home(cls, cli_home: Path) -> KnownAgents:
        """The known-agents store under the CLI home directory."""
        return cls(Path(cli_home) / KNOWN_AGENTS_FILE_NAME)

    def pinned_key(self, agent_id: str) -> PublicIdentity | None:
        """The key pinned for ``agent_id``, or None."""
        _check_agent_id(agent_id)
        raw = self._read().get(agent_id)
        return None if raw is None else PublicIdentity(raw)

    def all_pins(self) -> dict[str, PublicIdentity]:
        """Every pin, by agent id."""
        return {agent_id: PublicIdentity(raw) for agent_id, raw in self._read().items()}

    def verify_or_pin(self, agent_id: str, presented: PublicIdentity) -> PinOutcome:
        """Accept the pinned key, pin a first-seen one, or raise AgentKeyChangedError."""
        _check_agent_id(agent_id)
        with self._locked():
            pins = self._read()
            pinned = pins.get(agent_id)
            if pinned is not None:
                if hmac.compare_digest(pinned, presented.raw):
                    return PinOutcome.MATCHED
                raise AgentKeyChangedError(agent_id, PublicIdentity(pinned), presented, self.path)
            pins[agent_id] = presented.raw
            self._write(pins)
            return PinOutcome.FIRST_USE

    def trust(self, agent_id: str, key: PublicIdentity) -> PublicIdentity | None:
        """Pin ``key`` for ``agent_id``, replacing any earlier pin; return the replaced key."""
        _check_agent_id(agent_id)
        with self._locked():
            pins = self._read()
            previous = pins.get(agent_id)
            pins[agent_id] = key.raw
            self._write(pins)
        return None if previous is None else PublicIdentity(previous)

    def forget(self, agent_id: str) -> bool:
        """Remove the pin for ``agent_id``; True if there was one."""
        _check_agent_id(agent_id)
        with self._locked():
            pins = self._read()
            if pins.pop(agent_id, None) is None:
                return False
            self._write(pins)
            return True

    @contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read(self) -> dict[str, bytes]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return {}
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

    def _write(self, pins: dict[str, bytes]) -> None:
        if len(pins) > MAX_KNOWN_AGENTS:
            raise KnownAgentsError(
                f"{self.path}: more than {MAX_KNOWN_AGENTS} pinned agents; remove stale entries "
                f"from it"
            )
        document = {
            "version": KNOWN_AGENTS_FORMAT_VERSION,
            "agents": {agent_id: {"public_key": b64url(raw)} for agent_id, raw in pins.items()},
        }
        text = json.dumps(document, indent=2, sort_keys=True) + "\n"
        write_private_file(self.path, text.encode())


def _parse(data: bytes, path: Path) -> dict[str, bytes]:
    unreadable = f"{path}: not a readable known-agents file; move it aside and reconnect to re-pin"
    try:
        document: Any = json.loads(data)
    except ValueError:
        raise KnownAgentsError(unreadable) from None
    if not isinstance(document, dict) or document.get("version") != KNOWN_AGENTS_FORMAT_VERSION:
        raise KnownAgentsError(unreadable)
    agents = document.get("agents")
    if not isinstance(agents, dict) or len(agents) > MAX_KNOWN_AGENTS:
        raise KnownAgentsError(unreadable)
    pins: dict[str, bytes] = {}
    for agent_id, entry in agents.items():
        if not isinstance(entry, dict) or not _AGENT_ID_PATTERN.fullmatch(agent_id):
            raise KnownAgentsError(f"{unreadable} (bad entry {agent_id[:40]!r})")
        try:
            pins[agent_id] = PublicIdentity(b64url_decode(entry["public_key"], 64)).raw
        except Exception:
            raise KnownAgentsError(f"{unreadable} (bad key for {agent_id[:40]!r})") from None
    return pins


def _check_agent_id(agent_id: str) -> None:
    if not isinstance(agent_id, str) or not _AGENT_ID_PATTERN.fullmatch(agent_id):
        raise KnownAgentsError(f"{agent_id!r} is not an agent id")
