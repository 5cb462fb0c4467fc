"""The ssh-style escape sequences an operator can type into a session. Pure: bytes in, bytes and
actions out; the terminal and the network live elsewhere.

Recognised only at the start of a line (after CR or LF, or at session start), as in OpenSSH:
``~.`` disconnects, ``~^Z`` suspends the client, ``~?`` lists the escapes, ``~~`` sends one ``~``;
``~`` followed by anything else sends both characters. The escape character can be any byte,
written ``^]`` for a control character (``ssh -e``), or ``none``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

DEFAULT_ESCAPE_CHARACTER = ord("~")
_LINE_ENDS = (ord("\r"), ord("\n"))
_DISCONNECT = ord(".")
_HELP = ord("?")
_SUSPEND = 0x1A  # ^Z
_CONTROL_BIT = 0x40  # ^X is X with this bit cleared (^? is DEL, 0x7f)


class EscapeCharacterError(ValueError):
    """The -e value is not one character, a ^X control character, or 'none'."""


def parse_escape_character(text: str) -> int | None:
    """The -e value as a byte: ``~``, ``^]`` (a control character) or ``none`` (None: off)."""
    if text == "none":
        return None
    if len(text) == 2 and text[0] == "^" and (text[1] == "?" or "@" <= text[1].upper() <= "_"):
        return ord(text[1].upper()) ^ _CONTROL_BIT
    if len(text) == 1 and ord(text) < 128:
        return ord(text)
    raise EscapeCharacterError(
        "the escape character is one ASCII character, a control character written like ^], "
        "or 'none'"
    )


def escape_name(escape_character: int) -> str:
    """How to show the escape character: ``~`` as itself, a control character as ``^]``."""
    if escape_character < 0x20 or escape_character == 0x7F:
        return "^" + chr(escape_character ^ _CONTROL_BIT)
    return chr(escape_character)


class EscapeAction(Enum):
    """Something the operator asked the client itself (not the remote side) to do."""

    DISCONNECT = "disconnect"
    SUSPEND = "suspend"
    SHOW_HELP = "show-help"


@dataclass(frozen=True)
class EscapeResult:
    """What one call to ``feed`` produced: bytes to send on, then actions to take, in order."""

    forward: bytes
    actions: tuple[EscapeAction, ...] = ()


def escape_help(escape_character: int = DEFAULT_ESCAPE_CHARACTER) -> str:
    """The text shown for ``~?``, with CRLF line ends because the terminal is in raw mode."""
    marker = escape_name(escape_character)
    lines = [
        "Supported escape sequences:",
        f" {marker}.   - disconnect",
        f" {marker}^Z  - suspend tucdesk (fg resumes it)",
        f" {marker}?   - this message",
        f" {marker}{marker}   - send the escape character by typing it twice",
        "(Note that escapes are only recognized immediately after newline.)",
    ]
    return "\r\n".join(lines) + "\r\n"


class EscapeScanner:
    """Scans operator keystrokes for escape sequences; keeps state across ``feed`` calls.

    ``escape_character=None`` turns escapes off (``ssh -e none``): everything is forwarded.
    """

    def __init__(self, escape_character: int | None = DEFAULT_ESCAPE_CHARACTER) -> None:
        self._escape = escape_character
        self._at_line_start = True
        self._escape_pending = False
        self._disconnected = False

    @property
    def disconnected(self) -> bool:
        """True once ``~.`` was typed; later input is ignored."""
        return self._disconnected

    def feed(self, data: bytes) -> EscapeResult:
        """Process ``data``: the bytes to forward and the actions the escapes in it asked for."""
        if self._disconnected:
            return EscapeResult(b"")
        if self._escape is None:
            return EscapeResult(bytes(data))
        if not self._escape_pending and self._escape not in data:
            # No escape character: nothing to find, only where the line stands (a typed key
            # or a paste is not scanned byte by byte).
            if data:
                self._at_line_start = data[-1] in _LINE_ENDS
            return EscapeResult(bytes(data))
        forward = bytearray()
        actions: list[EscapeAction] = []
        for byte in data:
            if self._escape_pending:
                self._escape_pending = False
                if byte == _DISCONNECT:
                    self._disconnected = True
                    actions.append(EscapeAction.DISCONNECT)
                    break
                if byte == _HELP:
                    actions.append(EscapeAction.SHOW_HELP)
                    # Still at the start of a line: another escape may follow.
                    continue
                if byte == _SUSPEND:
                    # Taken after this chunk's bytes are sent (a typed ~^Z is a chunk of its own).
                    actions.append(EscapeAction.SUSPEND)
                    continue
                if byte != self._escape:
                    forward.append(self._escape)
            elif self._at_line_start and byte == self._escape:
                self._escape_pending = True
                continue
            self._at_line_start = byte in _LINE_ENDS
            forward.append(byte)
        return EscapeResult(bytes(forward), tuple(actions))
