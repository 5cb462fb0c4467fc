"""A one-line progress report on stderr for long work (verifying an export, downloading one).

The line is rewritten in place (carriage return, then erase to the end of the line) at most
``REFRESH_PER_SECOND`` times a second, and erased before the command prints its result, so
stdout (a summary, ``--json``) is byte for byte what it is without progress. By default it is
shown only when stderr is a terminal; ``--progress`` / ``--no-progress`` override that.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

REFRESH_PER_SECOND = 4
REFRESH_INTERVAL_SECONDS = 1 / REFRESH_PER_SECOND
FALLBACK_COLUMNS = 80
ERASE_LINE = "\r\x1b[K"
_KIB = 1024


def wants_progress(choice: bool | None, stream: TextIO) -> bool:
    """The ``--progress``/``--no-progress`` choice when one was given, else: is ``stream`` a tty."""
    if choice is not None:
        return choice
    try:
        return stream.isatty()
    except (AttributeError, OSError, ValueError):
        return False


def format_bytes(count: float) -> str:
    """A byte count for people: ``812 B``, ``64.0 KiB``, ``1.5 GiB``."""
    if count < _KIB:
        return f"{count:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        count /= _KIB
        if count < _KIB or unit == "GiB":
            break
    return f"{count:.1f} {unit}"


class ProgressLine:
    """One status line rewritten in place on ``stream``; ``clear()`` or leaving ``with`` erases it.

    Writing it never fails the work it reports on: if the stream cannot be written (a closed
    terminal), the line silently stops.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        clock: Callable[[], float] = time.monotonic,
        interval: float = REFRESH_INTERVAL_SECONDS,
    ) -> None:
        self._stream = stream
        self._clock = clock
        self._interval = interval
        self.started = clock()
        self._next_at = self.started
        self._shown = False
        self._broken = False

    def elapsed(self) -> float:
        """Seconds since the line was created."""
        return self._clock() - self.started

    def due(self) -> bool:
        """Whether ``show`` would draw now: callers skip formatting the text when it would not."""
        return not self._broken and self._clock() >= self._next_at

    def show(self, text: str) -> None:
        """Replace the line with ``text`` (cut to the terminal's width) if it is due."""
        now = self._clock()
        if self._broken or now < self._next_at:
            return
        self._next_at = now + self._interval
        # Marked shown before writing: a Ctrl-C landing mid-write must still get the line erased.
        self._shown = True
        self._write(ERASE_LINE + text[: self._columns() - 1])

    def clear(self) -> None:
        """Erase the line, if one was drawn, so the next output starts on a clean line."""
        if self._shown:
            self._write(ERASE_LINE)
            self._shown = False

    def __enter__(self) -> ProgressLine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.clear()

    def _columns(self) -> int:
        # Read each time (a few times a second at most): the user may resize the window.
        try:
            return os.get_terminal_size(self._stream.fileno()).columns or FALLBACK_COLUMNS
        except (AttributeError, OSError, ValueError):
            return FALLBACK_COLUMNS

    def _write(self, text: str) -> None:
        if self._broken:
            return
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            self._broken = True
