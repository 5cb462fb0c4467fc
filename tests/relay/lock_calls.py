"""Which functions a piece of code calls, recorded with a profile hook: the keystroke path's
free-turn sends and writes must not take their trio lock at all (each take and release costs a
parking-lot registration), while every send that has to wait must; the relay's data path must
make no metric update per message."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

LOCK_OPERATIONS = frozenset({"acquire", "acquire_nowait", "release"})


@contextmanager
def calls_recorded(label: Callable[[FrameType], str | None]) -> Iterator[list[str]]:
    """Record, in order, what ``label`` says of each Python function called in the block (a
    call it labels None is left out), into the yielded list."""
    called: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and (name := label(frame)) is not None:
            called.append(name)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield called
    finally:
        sys.setprofile(previous)


def calls_to(
    names: frozenset[str], in_file: Callable[[Path], bool]
) -> AbstractContextManager[list[str]]:
    """Record the functions called in the block that are in ``names`` and defined in a file
    ``in_file`` accepts."""

    def label(frame: FrameType) -> str | None:
        code = frame.f_code
        return code.co_name if code.co_name in names and in_file(Path(code.co_filename)) else None

    return calls_recorded(label)


def lock_operations() -> AbstractContextManager[list[str]]:
    """Record the trio lock operations (acquire, acquire_nowait, release) called in the block."""
    return calls_to(LOCK_OPERATIONS, lambda path: path.name == "_sync.py" and "trio" in path.parts)
