"""Which of trio's lock operations a piece of code performs: the keystroke path's free-turn
sends and writes must not take their lock at all (each take and release costs a parking-lot
registration), while every send that has to wait must."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

LOCK_OPERATIONS = frozenset({"acquire", "acquire_nowait", "release"})


@contextmanager
def lock_operations() -> Iterator[list[str]]:
    """Record the names of trio lock operations (acquire, acquire_nowait, release) called in
    the block, in order, into the yielded list."""
    called: list[str] = []

    def profile(frame: FrameType, event: str, arg: Any) -> None:
        code = frame.f_code
        if (
            event == "call"
            and code.co_name in LOCK_OPERATIONS
            and Path(code.co_filename).name == "_sync.py"
            and "trio" in code.co_filename
        ):
            called.append(code.co_name)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield called
    finally:
        sys.setprofile(previous)
