"""The exit statuses the self-hosting guide gives auditors are the verifier's own (audit/README
has the full table; the two must not drift apart)."""

from __future__ import annotations

import re
from pathlib import Path

from audit.main import EXIT_CHECKPOINT_NOT_SAVED, EXIT_INTERRUPTED
from audit.verify import EXIT_CODES, Verdict

ROOT = Path(__file__).resolve().parents[2]
SIGPIPE_EXIT = 141


def _table_exits(text: str) -> dict[int, str]:
    """Exit status -> the rest of its row, from every ``| 0 | …`` style table row in ``text``."""
    exits: dict[int, str] = {}
    for line in text.splitlines():
        match = re.match(r"\| (\d+(?:, \d+)*) \|(.*)", line)
        if match:
            for number in match.group(1).split(", "):
                exits[int(number)] = match.group(2)
    return exits


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def test_the_guide_lists_the_verifiers_exit_statuses_with_their_meaning() -> None:
    guide = (ROOT / "docs" / "self-hosting.md").read_text(encoding="utf-8")
    exits = _table_exits(_section(guide, "## Auditing the log"))
    readme = _table_exits((ROOT / "audit" / "README.md").read_text(encoding="utf-8"))
    expected = {*EXIT_CODES.values(), EXIT_CHECKPOINT_NOT_SAVED, EXIT_INTERRUPTED, SIGPIPE_EXIT}
    assert set(exits) == expected
    assert expected <= set(readme)
    assert "OK" in exits[EXIT_CODES[Verdict.VALID]]
    assert "INVALID" in exits[EXIT_CODES[Verdict.INVALID]]
    assert "unreadable" in exits[EXIT_CODES[Verdict.UNREADABLE]]
    assert "wrong key" in exits[EXIT_CODES[Verdict.WRONG_KEY]]
    assert "--save-checkpoint" in exits[EXIT_CHECKPOINT_NOT_SAVED]
