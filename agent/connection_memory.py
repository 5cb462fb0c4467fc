"""The control connection an agent was last welcomed on, kept in its state dir across restarts.

An agent that reconnects names the connection it last held (``replaces``, see
agent/control_client.py), so the rendezvous drops that one instead of taking the agent for a
clone of itself. Kept in memory only, the name would die with the process: after a crash, a
kill -9, an OOM kill or a host reset, the old TCP connection may have died silently (no FIN ever
reached the rendezvous), and the restarted process, back within the heartbeat timeout, would be
flagged as a clone. So each welcome writes the id to ``<state_dir>/connection``
(AgentConfig.connection_file; atomically, 0600, fsynced) and the next process starts from it.

The file holds one connection id and nothing secret; a connection id only ever removes a
connection of the same agent, team and machine fingerprint. It is left in place on a clean
shutdown: the rendezvous has then forgotten the connection already, and naming it removes
nothing. A file that is missing, too large, not a regular file, a symlink or not an id of the
right shape is ignored (with a warning unless missing): the agent then names no connection, as
it did before this file existed, and is at worst flagged once.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from protocol.errors import KeyFileError
from protocol.identity import write_private_file

logger = logging.getLogger("tucdesk.agent.control")

# The shape of the rendezvous's connection ids (rendezvous/control_channel.py), which it checks
# ``replaces`` against; an id of any other shape is neither remembered nor named.
CONNECTION_ID_PATTERN = re.compile(r"conn_[0-9a-f]{24}")
# An id and a newline fit many times over; anything larger is not this file.
MAX_CONNECTION_FILE_SIZE = 256


def is_connection_id(text: object) -> bool:
    """True for a string of the rendezvous's connection id shape (``conn_`` + 24 hex digits)."""
    return isinstance(text, str) and CONNECTION_ID_PATTERN.fullmatch(text) is not None


def parse_connection_file(data: bytes) -> str | None:
    """The connection id in a connection file's bytes, or None when they hold no valid one."""
    if len(data) > MAX_CONNECTION_FILE_SIZE:
        return None
    try:
        text = data.decode("ascii").removesuffix("\n")
    except UnicodeDecodeError:
        return None
    return text if is_connection_id(text) else None


def load_last_connection(path: Path) -> str | None:
    """The id of the connection the previous agent process was last welcomed on, if known.

    Never raises: an unreadable or garbled file is logged and ignored.
    """
    path = Path(path)
    try:
        # O_NOFOLLOW: a symlink planted at the path is refused; O_NONBLOCK: a FIFO cannot hang us.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        logger.warning("ignoring %s: cannot open it (%s)", path, error.strerror)
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            logger.warning("ignoring %s: not a regular file", path)
            return None
        data = os.read(fd, MAX_CONNECTION_FILE_SIZE + 1)
    except OSError as error:
        logger.warning("ignoring %s: cannot read it (%s)", path, error.strerror)
        return None
    finally:
        os.close(fd)
    connection_id = parse_connection_file(data)
    if connection_id is None:
        logger.warning(
            "ignoring %s: it does not hold a connection id (conn_ and 24 hex digits, at most %d "
            "bytes); this start names no earlier connection", path, MAX_CONNECTION_FILE_SIZE,
        )  # fmt: skip
    return connection_id


def remember_connection(path: Path, connection_id: str | None) -> bool:
    """Keep ``connection_id`` for the next process (None: forget it); False if that failed.

    Atomic (a temporary 0600 file, fsynced, renamed over the old one), so a crash mid-write
    leaves the previous id or the new one, never a torn file. Failures are logged, not raised:
    the control channel matters more than this note.
    """
    path = Path(path)
    try:
        if connection_id is None:
            path.unlink(missing_ok=True)
            return True
        if not is_connection_id(connection_id):
            raise ValueError("not a connection id")
        write_private_file(path, (connection_id + "\n").encode("ascii"))
    except (OSError, KeyFileError, ValueError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        logger.warning(
            "cannot keep the connection id in %s (%s): after a restart this agent may be "
            "reported as a clone of itself once", path, reason,
        )  # fmt: skip
        return False
    return True
