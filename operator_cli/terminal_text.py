"""Text from elsewhere as the CLI lays it out: escaped by protocol/terminal_text.py (never raw
to the terminal), then cut or wrapped to a column. Nothing here does I/O.
"""

from __future__ import annotations

from protocol.terminal_text import shown_argument, shown_command, visible

__all__ = ["ELLIPSIS", "cut", "shown_argument", "shown_command", "visible", "wrapped"]

ELLIPSIS = "…"


def cut(text: str, width: int) -> tuple[str, bool]:
    """``text`` (already visible) at most ``width`` characters, ending in an ellipsis when cut;
    and whether it was cut."""
    if len(text) <= width:
        return text, False
    return text[: max(width - 1, 0)] + ELLIPSIS, True


def wrapped(text: str, width: int) -> list[str]:
    """``text`` (already visible) in lines of at most ``width`` characters, no character lost
    (spaces at a break stay where they were, unlike textwrap)."""
    width = max(width, 1)
    return [text[start : start + width] for start in range(0, len(text), width)] or [""]
