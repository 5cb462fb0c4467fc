"""How long an exec command may be: the limits a session grant can carry, and their check.

Kept apart from ``protocol.session_grant`` (which loads the JWT library) so that the CLI checks
a command before it contacts anyone without paying for that import on every `tucdesk exec`.

The grant carries the command, and a grant is a JWT of at most 8 KiB (``protocol.tokens``): with
every other claim at the longest the rendezvous mints (a 320-byte email, an approval, long rule
ids and issuer) a command of 4,321 bytes still fits (measured), so MAX_COMMAND_SIZE keeps a
margin. The size is the command as the grant encodes it (compact JSON, non-ASCII escaped): each
argument's UTF-8 bytes plus 3, a non-ASCII or control character 6 (12 outside the BMP). The
SessionStart control message carries 256 arguments (``protocol.control``), the policy matcher
1,024: the smaller one is the limit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from protocol.errors import TokenError

MAX_COMMAND_ARGUMENTS = 256
MAX_COMMAND_SIZE = 4096
LONG_INPUT_HINT = "tucdesk exec AGENT -- sh -s < script.sh"


class CommandTooLargeError(TokenError):
    """An exec command is over the limits a session grant can carry; the message says which."""


def command_size(argv: Sequence[str]) -> int:
    """The size of ``argv`` as a grant carries it: compact JSON with non-ASCII escaped."""
    return len(json.dumps(list(argv), separators=(",", ":"), ensure_ascii=True))


def check_exec_command(argv: Sequence[str]) -> None:
    """Raise CommandTooLargeError unless a grant can carry ``argv`` (count and total size)."""
    if len(argv) > MAX_COMMAND_ARGUMENTS:
        raise CommandTooLargeError(
            f"the command has {len(argv)} arguments; at most {MAX_COMMAND_ARGUMENTS} fit in a "
            "session"
        )
    size = command_size(argv)
    if size > MAX_COMMAND_SIZE:
        raise CommandTooLargeError(
            f"the command is {size} bytes as sent (each argument's bytes plus 3; a non-ASCII "
            f"or control character counts 6); at most {MAX_COMMAND_SIZE} fit in a session"
        )
