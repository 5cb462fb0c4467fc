"""Helpers for driving local sessions from trio in tests: a transcript that can be waited on."""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from typing import ParamSpec

import trio

from agent.process_group import OutputStream

TEST_TIMEOUT_SECONDS = 20
WAIT_SECONDS = 10
P = ParamSpec("P")


def trio_test(test: Callable[P, Awaitable[None]]) -> Callable[P, None]:
    """Run an async test under trio with an overall deadline."""

    @functools.wraps(test)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        async def bounded() -> None:
            with trio.fail_after(TEST_TIMEOUT_SECONDS):
                await test(*args, **kwargs)

        trio.run(bounded)

    return wrapper


class Transcript:
    """Collects session output per stream; tests wait for text to appear."""

    def __init__(self) -> None:
        self.streams: dict[OutputStream, bytearray] = {
            OutputStream.STDOUT: bytearray(),
            OutputStream.STDERR: bytearray(),
        }
        self._changed = trio.Event()

    async def on_output(self, stream: OutputStream, data: bytes) -> None:
        self.streams[stream].extend(data)
        self._changed.set()
        self._changed = trio.Event()

    @property
    def stdout(self) -> bytes:
        return bytes(self.streams[OutputStream.STDOUT])

    @property
    def stderr(self) -> bytes:
        return bytes(self.streams[OutputStream.STDERR])

    async def wait_for(self, needle: bytes, start: int = 0) -> int:
        """Wait until ``needle`` is in stdout at or after ``start``; return the offset after it."""
        with trio.fail_after(WAIT_SECONDS):
            while True:
                found = self.stdout.find(needle, start)
                if found >= 0:
                    return found + len(needle)
                await self._changed.wait()


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` with a deadline, for state that has no event to wait on."""
    with trio.fail_after(WAIT_SECONDS):
        # Process state has no event to wait on, so this polls.
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.01)


def pid_is_gone(pid: int) -> bool:
    """True when ``pid`` no longer exists or is a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            state = handle.read().rpartition(")")[2].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def is_root() -> bool:
    return os.geteuid() == 0
