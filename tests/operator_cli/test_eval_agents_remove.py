"""`tucdesk agents remove` without a terminal and without --yes says "would remove:" before the
agent's details, so they do not read as if it had acted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.operator_cli.test_agents_remove_cli import _listed, _run, anyio_backend, logged_in
from tests.rendezvous.conftest import database_url, postgres_cluster

pytestmark = pytest.mark.anyio
__all__ = ["anyio_backend", "database_url", "logged_in", "postgres_cluster"]


async def test_remove_without_a_terminal_says_would_remove_before_the_details(
    logged_in: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    home, _, _ = logged_in
    capsys.readouterr()
    assert await _run(home, "agents", "remove", "web-1") == 1
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "would remove:"
    assert lines[1].startswith("agent web-1 (agt_")
    assert "not removed: run it in a terminal to confirm, or pass --yes" in captured.err
    assert "removed agent" not in captured.out
    assert await _listed(home, capsys) == ["db-1", "db-1", "web-1"]
