"""Agent fingerprints an auditor pins out of band (``--agent-key`` / ``--agent-keys``).

The log introduces agent keys itself (audit/trust.py), so whoever holds the audit key could
register a key of their own for an agent. An auditor who learnt an agent's fingerprint out of
band (``tucdesk-agent status`` on the host) pins it: a registration of that agent, named by its
agent id or its hostname, with any other key makes the bundle INVALID.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from audit.verify import read_small_file

# "SHA256:" and the 43 characters of unpadded base64 of a SHA-256 digest (PublicIdentity).
FINGERPRINT_PATTERN = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")
MAX_AGENT_KEYS_FILE_BYTES = 1024 * 1024
MAX_AGENT_NAME_LENGTH = 320  # the longest actor display a record holds


class AgentPinError(Exception):
    """An --agent-key pin (or a line of an --agent-keys file) cannot be used; says why."""


def parse_agent_pin(text: str, where: str = "--agent-key") -> tuple[str, str]:
    """``NAME_OR_ID=FINGERPRINT`` as (name or id, fingerprint); AgentPinError otherwise."""
    name, separator, fingerprint = text.strip().rpartition("=")
    name, fingerprint = name.strip(), fingerprint.strip()
    if not separator or not name or len(name) > MAX_AGENT_NAME_LENGTH:
        raise AgentPinError(
            f"{where}: expected NAME_OR_ID=SHA256:<fingerprint>, got {text.strip()[:80]!r}"
        )
    if not FINGERPRINT_PATTERN.fullmatch(fingerprint):
        raise AgentPinError(
            f"{where}: {fingerprint[:80]!r} is not a key fingerprint (SHA256: and 43 base64 "
            "characters, as 'tucdesk-agent status' prints it)"
        )
    return name, fingerprint


def load_agent_pins(pins: Iterable[str], files: Iterable[Path]) -> dict[str, str]:
    """The pins given on the command line and in files (one ``NAME_OR_ID=FINGERPRINT`` a line;
    blank lines and ``#`` comments skipped); AgentPinError for a bad line or two different
    fingerprints pinned for one name."""
    pinned: dict[str, str] = {}
    entries: list[tuple[str, str]] = [(pin, "--agent-key") for pin in pins]
    for path in files:
        try:
            data = read_small_file(path, MAX_AGENT_KEYS_FILE_BYTES + 1)
        except OSError as error:
            raise AgentPinError(f"{path}: cannot read agent keys ({error.strerror})") from None
        if len(data) > MAX_AGENT_KEYS_FILE_BYTES:
            raise AgentPinError(f"{path}: more than {MAX_AGENT_KEYS_FILE_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise AgentPinError(f"{path}: not UTF-8 text") from None
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                entries.append((line, f"{path} line {number}"))
    for text, where in entries:
        name, fingerprint = parse_agent_pin(text, where)
        if pinned.setdefault(name, fingerprint) != fingerprint:
            raise AgentPinError(f"{where}: agent {name} is already pinned to {pinned[name]}")
    return pinned
