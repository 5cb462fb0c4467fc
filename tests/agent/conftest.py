"""Fixtures shared by the agent's session tests."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids a test expects to outlive its session; killed afterwards whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
