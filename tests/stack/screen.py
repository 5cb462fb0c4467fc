"""A program running in a real PTY, whose output is rendered by pyte so tests check the screen.

``TerminalProgram`` spawns a command under pexpect (a real pseudo-terminal, as a person's
terminal would be), feeds everything it prints into a pyte screen of the same size, and lets a
test wait — with a deadline, never a sleep — until the screen or the raw output shows something.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence

import pexpect  # type: ignore[import-untyped]
import pyte

DEFAULT_ROWS = 24
DEFAULT_COLUMNS = 80
DEFAULT_WAIT_SECONDS = 20.0
_READ_CHUNK = 65536
_READ_POLL_SECONDS = 0.05


class _Screen(pyte.Screen):
    """pyte's screen, tolerating the private SGR sequences vim sends (``CSI > 4 ; 2 m``,
    xterm's modifyOtherKeys), which pyte dispatches with a keyword it does not accept."""

    def select_graphic_rendition(self, *attrs: int, private: bool = False) -> None:
        if not private:
            super().select_graphic_rendition(*attrs)


class ScreenTimeout(AssertionError):
    """What the test waited for did not appear in time; the message shows the screen."""


class TerminalProgram:
    """One command in a PTY with a pyte screen mirroring its output."""

    def __init__(
        self,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        rows: int = DEFAULT_ROWS,
        columns: int = DEFAULT_COLUMNS,
    ) -> None:
        self.screen = _Screen(columns, rows)
        self.stream = pyte.ByteStream(self.screen)
        self.output = bytearray()
        self.child = pexpect.spawn(
            argv[0],
            list(argv[1:]),
            env=dict(env if env is not None else os.environ),
            dimensions=(rows, columns),
            echo=False,
        )

    # ---- input ---------------------------------------------------------------------------

    def send(self, data: str | bytes) -> None:
        """Type ``data`` (keys, as a person at the terminal would)."""
        self.child.send(data)

    def resize(self, rows: int, columns: int) -> None:
        """Change the terminal size (the child gets SIGWINCH, as from a real terminal)."""
        self.screen.resize(rows, columns)
        self.child.setwinsize(rows, columns)

    # ---- output --------------------------------------------------------------------------

    def pump(self, timeout: float = _READ_POLL_SECONDS) -> bool:
        """Read what the program printed so far into the screen; False once it has exited."""
        try:
            data = self.child.read_nonblocking(_READ_CHUNK, timeout=timeout)
        except pexpect.TIMEOUT:
            return True
        except pexpect.EOF:
            return False
        self.output.extend(data)
        self.stream.feed(data)
        return True

    def display(self) -> list[str]:
        """The screen's lines, right-trimmed."""
        return [line.rstrip() for line in self.screen.display]

    def text(self) -> str:
        """The screen as one string, a line per row."""
        return "\n".join(self.display())

    def wait_until(
        self,
        condition: Callable[[TerminalProgram], bool],
        what: str,
        timeout: float = DEFAULT_WAIT_SECONDS,
    ) -> None:
        """Pump output until ``condition(self)`` holds; ScreenTimeout naming ``what`` if not."""
        deadline = time.monotonic() + timeout
        while not condition(self):
            alive = self.pump()
            if condition(self):
                return
            if not alive:
                raise ScreenTimeout(f"the program exited before {what}:\n{self._report()}")
            if time.monotonic() > deadline:
                raise ScreenTimeout(f"timed out waiting for {what}:\n{self._report()}")

    def wait_for_screen(self, needle: str, timeout: float = DEFAULT_WAIT_SECONDS) -> None:
        """Wait until ``needle`` is visible somewhere on the screen."""
        self.wait_until(lambda program: needle in program.text(), f"{needle!r} on screen", timeout)

    def wait_for_output(
        self, needle: bytes, start: int = 0, timeout: float = DEFAULT_WAIT_SECONDS
    ) -> int:
        """Wait for ``needle`` in the raw output after ``start``; return the offset after it."""
        self.wait_until(
            lambda program: program.output.find(needle, start) >= 0,
            f"{needle!r} in the output",
            timeout,
        )
        return self.output.find(needle, start) + len(needle)

    def wait_for_exit(self, timeout: float = DEFAULT_WAIT_SECONDS) -> int:
        """Wait for the program to end; its exit status (128 + signal if it was killed)."""
        deadline = time.monotonic() + timeout
        while self.pump():
            if time.monotonic() > deadline:
                raise ScreenTimeout(f"the program did not exit in time:\n{self._report()}")
        self.child.close()
        if self.child.signalstatus is not None:
            return 128 + int(self.child.signalstatus)
        return int(self.child.exitstatus)

    def close(self) -> None:
        """Stop the program if it still runs."""
        if self.child.isalive():
            self.child.close(force=True)

    def _report(self) -> str:
        tail = bytes(self.output[-1500:]).decode("utf-8", "replace")
        return f"--- screen ---\n{self.text()}\n--- last output ---\n{tail}"
