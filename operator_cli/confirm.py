"""The one y/N question the CLI asks before something it cannot take back."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO


def answered_yes(ask: Callable[[str], str], question: str, *, echo: TextIO | None = None) -> bool:
    """Ask ``question`` (it ends in ``[y/N]``): only ``y`` or ``yes`` is yes; ^D is no.

    ``echo`` gets the line break ^D leaves out (standard output unless said otherwise).
    """
    try:
        answer = ask(question)
    except EOFError:  # ^D at the prompt: no answer is no
        print(file=echo or sys.stdout)
        return False
    return answer.strip().lower() in ("y", "yes")
