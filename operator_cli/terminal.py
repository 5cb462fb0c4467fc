"""The operator's own terminal: raw mode that is always undone, the window size, and its changes.

Raw mode is restored on every way out of the block: normal exit, an exception, and SIGTERM or
SIGHUP (whose handlers restore the terminal first, then let the signal do what it would have
done). Only SIGKILL can leave the terminal raw, as with ssh.
"""

from __future__ import annotations

import os
import signal
import termios
import tty
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

import trio

DEFAULT_WINDOW_SIZE = (24, 80)
RESTORING_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

_SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


@dataclass(frozen=True)
class WindowSize:
    """A terminal's size in character cells."""

    rows: int
    cols: int


def read_window_size(fd: int) -> WindowSize:
    """The size of the terminal on ``fd``; 24x80 when ``fd`` is not a terminal or reports zero."""
    try:
        size = os.get_terminal_size(fd)
    except OSError:
        return WindowSize(*DEFAULT_WINDOW_SIZE)
    if size.lines <= 0 or size.columns <= 0:
        return WindowSize(*DEFAULT_WINDOW_SIZE)
    return WindowSize(size.lines, size.columns)


class RawTerminal:
    """Context manager: put the terminal on ``fd`` in raw mode and put it back however we leave.

    Does nothing when ``fd`` is not a terminal (input from a pipe or file).
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._saved: list[Any] | None = None
        self._previous_handlers: dict[int, _SignalHandler] = {}

    @property
    def active(self) -> bool:
        """True while the terminal is in raw mode because of this object."""
        return self._saved is not None

    def __enter__(self) -> RawTerminal:
        if not os.isatty(self._fd):
            return self
        self._saved = termios.tcgetattr(self._fd)
        self._install_signal_handlers()
        try:
            tty.setraw(self._fd, termios.TCSADRAIN)
        except BaseException:
            self.restore()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.restore()

    def suspend(self) -> None:
        """Stop this process as ^Z would (``~^Z``), with the terminal given back meanwhile; raw
        again once resumed (``fg``). Returns after the resume."""
        saved = self._saved
        if saved is not None:
            with suppress(termios.error):
                termios.tcsetattr(self._fd, termios.TCSADRAIN, saved)
        os.kill(os.getpid(), signal.SIGTSTP)  # default action: stop here until SIGCONT
        if saved is not None:
            with suppress(termios.error):
                tty.setraw(self._fd, termios.TCSADRAIN)

    def restore(self) -> None:
        """Put back the settings found on entry and the previous signal handlers. Idempotent."""
        saved, self._saved = self._saved, None
        if saved is not None:
            try:
                termios.tcsetattr(self._fd, termios.TCSADRAIN, saved)
            except termios.error:
                pass  # the terminal is gone (hung up): nothing left to restore
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _install_signal_handlers(self) -> None:
        for signum in RESTORING_SIGNALS:
            previous = signal.getsignal(signum)
            if previous == signal.SIG_IGN:
                continue  # the signal will not end us, so there is nothing to restore for
            self._previous_handlers[signum] = previous
            signal.signal(signum, self._restore_then_deliver)

    def _restore_then_deliver(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        self.restore()
        if callable(previous):
            previous(signum, frame)
            return
        # Default action: die of the same signal, so the parent sees the true cause.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


async def send_window_size_changes(
    fd: int,
    channel: trio.MemorySendChannel[WindowSize],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """On each SIGWINCH, send the terminal's new size on ``channel`` (repeats are skipped).

    Start it with ``nursery.start`` so the handler is in place before anything else runs.
    """
    last = read_window_size(fd)
    with trio.open_signal_receiver(signal.SIGWINCH) as signals:
        task_status.started()
        async for _ in signals:
            current = read_window_size(fd)
            if current != last:
                last = current
                await channel.send(current)
