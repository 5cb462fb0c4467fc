"""Text someone else chose (a command to approve, a reason, a hostname, an audit record) as a
terminal may show it; shared by the CLI and the offline verifier.

A terminal acts on control characters: ESC sequences move the cursor and erase, CR returns to
the start of the line, bidi overrides reorder what follows. Text another person chose must never
reach the terminal raw, or it can show an approver one command while another is signed — the
trick OpenSSH closed for scp in CVE-2019-6109 by printing such characters visibly. Here every
character a terminal would not simply print (C0, DEL, C1, format characters such as the bidi
overrides U+202A-U+202E and U+2066-U+2069, separators other than the space) is written as a
visible escape: ``\\e``, ``\\n``, ``\\x9b``, ``\\u202e``.

``shown_command`` quotes an argv as ``shlex.join`` does, but an argument holding such a
character is written in bash's ``$'…'`` form, so what is shown is exactly what runs. Nothing
here does I/O.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

# The C escapes both a reader and bash's $'…' know; everything else is \xHH, \uHHHH or \UHHHHHHHH.
_NAMED_ESCAPES = {
    "\a": "\\a", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\v": "\\v", "\f": "\\f", "\r": "\\r",
    "\x1b": "\\e",
}  # fmt: skip


def visible(text: str) -> str:
    """``text`` with every character a terminal would act on, rather than print, escaped."""
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else _escape(char, ascii_only=False)
                   for char in text)  # fmt: skip


def shown_argument(argument: str) -> str:
    """One argument quoted for a POSIX shell; with control characters, in bash's ``$'…'``."""
    if argument.isprintable():
        return shlex.quote(argument)
    quoted = []
    for char in argument:
        if char in "\\'":
            quoted.append("\\" + char)
        elif char.isprintable():
            quoted.append(char)
        else:
            quoted.append(_escape(char, ascii_only=True))
    return "$'" + "".join(quoted) + "'"


def shown_command(command: Sequence[str]) -> str:
    """The argv as one line a shell would run as exactly this argv, with nothing left raw."""
    return " ".join(shown_argument(argument) for argument in command)


def _escape(char: str, *, ascii_only: bool) -> str:
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    # bash's $'\xHH' is one byte, not a character: beyond ASCII the command form needs \u.
    if code < 0x80 or (code < 0x100 and not ascii_only):
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
