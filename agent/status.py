"""The status file ``tucdesk-agent run`` keeps up to date and ``tucdesk-agent status`` reads.

It holds nothing secret: the daemon's pid, whether its control channel is up, when it last
connected, and what is wrong with its audit spool (agent/event_spool.py: while it is full or
unusable new sessions are refused). ``status`` trusts ``connected`` only while that pid is still
alive.
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.event_spool import remedy as spool_remedy
from protocol.identity import write_private_file

MAX_STATUS_FILE_SIZE = 16 * 1024
MAX_ERROR_LENGTH = 300


@dataclass(frozen=True)
class DaemonStatus:
    """What the running daemon last reported about itself."""

    pid: int
    server_url: str
    connected: bool
    updated_at: float
    last_connected_at: float | None = None
    last_error: str | None = None
    # Why new sessions are refused for want of room to audit them, or None.
    audit_spool_problem: str | None = None

    def is_running(self) -> bool:
        """True when the process that wrote this status still exists."""
        return process_exists(self.pid)

    def problem_lines(self) -> list[str]:
        """Lines for ``tucdesk-agent status`` about what keeps the daemon from working fully."""
        if self.audit_spool_problem is None:
            return []
        return [
            f"Audit spool:  {self.audit_spool_problem}",
            f"              new sessions are refused {spool_remedy(self.audit_spool_problem)}",
        ]


def write_status(path: Path, status: DaemonStatus) -> None:
    """Replace the status file atomically (0600, like everything in the state dir)."""
    directory = Path(path).parent
    if directory.exists() and not directory.is_dir():
        # Said plainly, not as the file writer's "cannot create key file (File exists)".
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(directory))
    document = asdict(status)
    for name in ("last_error", "audit_spool_problem"):
        if document[name] is not None:
            document[name] = document[name][:MAX_ERROR_LENGTH]
    write_private_file(path, json.dumps(document, sort_keys=True).encode())


def read_status(path: Path) -> DaemonStatus | None:
    """The last status written, or None when there is none or it cannot be parsed."""
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_STATUS_FILE_SIZE + 1)
    except OSError:
        return None
    if len(data) > MAX_STATUS_FILE_SIZE:
        return None
    try:
        document: Any = json.loads(data)
        return DaemonStatus(
            pid=_typed(document, "pid", int),
            server_url=_typed(document, "server_url", str),
            connected=_typed(document, "connected", bool),
            updated_at=float(_typed(document, "updated_at", (int, float))),
            last_connected_at=_optional_float(document.get("last_connected_at")),
            last_error=_optional_text(document.get("last_error")),
            audit_spool_problem=_optional_text(document.get("audit_spool_problem")),
        )
    except (ValueError, TypeError, KeyError):
        return None


def process_exists(pid: int) -> bool:
    """Whether a process with ``pid`` exists (it may belong to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def now() -> float:
    """Wall-clock seconds, for status timestamps."""
    return time.time()


def _typed(document: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    value = document[name]
    if not isinstance(value, kind):
        raise TypeError(name)
    return value


def _optional_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError("time")
    return float(value)


def _optional_text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError("text")
    return value[:MAX_ERROR_LENGTH]
