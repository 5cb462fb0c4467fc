"""`tucdesk agents` in a script: stdout is the table alone (a header, then one line an agent),
so `tucdesk agents | awk 'NR>1{print $1}'` gives agent names and nothing else; the notes under
it (the team's policy version, a --limit cut) go to stderr. Against a real rendezvous."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from operator_cli.main import main
from tests.operator_cli.test_agents_cli import NAMES, logged_in  # noqa: F401 - the fixture
from tests.rendezvous.conftest import database_url, postgres_cluster  # noqa: F401 - fixtures

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "trio"


async def _agents(
    home: Path, capsys: pytest.CaptureFixture[str], *options: str
) -> tuple[list[str], list[str]]:
    capsys.readouterr()
    assert await trio.to_thread.run_sync(main, ["--home", str(home), "agents", *options]) == 0
    captured = capsys.readouterr()
    return captured.out.splitlines(), captured.err.splitlines()


async def test_the_agents_table_is_alone_on_stdout_and_its_notes_on_stderr(
    logged_in: tuple[str, Path], capsys: pytest.CaptureFixture[str]  # noqa: F811
) -> None:
    _, home = logged_in
    out, err = await _agents(home, capsys, "--tag", "web")
    assert out[0].split()[:3] == ["NAME", "ID", "STATE"]
    # What `awk 'NR>1{print $1}'` prints: the agents' names, no "team" from a footer.
    assert [line.split()[0] for line in out[1:]] == ["web-1", "web-1", "web-2", "web-3"]
    assert err == ["team policy version: none signed"]
    out, err = await _agents(home, capsys, "--limit", "1")
    assert [line.split()[0] for line in out[1:]] == [sorted(NAMES)[0]]
    assert err == ["team policy version: none signed", "(stopped after 1 agents: --limit)"]
