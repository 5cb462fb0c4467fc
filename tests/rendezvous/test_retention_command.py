"""`tucdesk-rendezvous db prune`: counts with --dry-run, deletes in batches with progress on
stderr, audits history.pruned before deleting, and refuses a cutoff younger than the minimum."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest
import trio

from audit.main import main as audit_main
from rendezvous.main import main
from rendezvous.store import ApprovalState, SessionState, open_store
from tests.rendezvous.test_retention_store import _agent, _request, _session


def _store(tmp_path: Path, database_url: str) -> list[str]:
    return ["--data-dir", str(tmp_path / "data"), "--database", database_url]


def _history(database_url: str) -> dict[str, list[str]]:
    """Old ended sessions and requests of a team 'ops', and one open session and request."""

    async def fill() -> dict[str, list[str]]:
        async with open_store(database_url, migrate=False) as store:
            team, agent = await _agent(store, "ops")
            ended = [await _session(store, team, agent, SessionState.ENDED) for _ in range(3)]
            # The agent was seen since (it holds no spooled events of these sessions).
            await store.touch_agent(team, agent, time.time())
            denied = await _request(store, team, agent, ApprovalState.DENIED)
            kept = [
                await _session(store, team, agent, SessionState.ACCEPTED),
                await _request(store, team, agent, ApprovalState.PENDING),
            ]
            return {"team": [team], "gone": [*ended, denied], "kept": kept}

    return trio.run(fill)


def _rows(database_url: str, team: str, ids: list[str]) -> list[bool]:
    async def look() -> list[bool]:
        async with open_store(database_url, migrate=False) as store:
            found = []
            for row_id in ids:
                if row_id.startswith("apr"):
                    found.append(await store.get_approval_request(team, row_id) is not None)
                else:
                    found.append(await store.get_session(team, row_id) is not None)
            return found

    return trio.run(look)


def test_prune_counts_then_deletes_old_history_audited_and_the_log_still_verifies(
    tmp_path: Path, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = _store(tmp_path, database_url)
    assert main(["init", *store]) == 0
    history = _history(database_url)
    team = history["team"][0]
    capsys.readouterr()

    assert main(["db", "prune", "--older-than", "30d", "--dry-run", *store]) == 0
    out = capsys.readouterr().out
    assert "would delete 3 sessions and 1 approval requests" in out
    assert _rows(database_url, team, history["gone"]) == [True] * 4

    assert main(["db", "prune", "--older-than", "30d", *store]) == 0
    printed = capsys.readouterr()
    assert "deleted 3 sessions and 1 approval requests" in printed.out
    assert "team ops: deleted" in printed.err  # progress
    assert _rows(database_url, team, history["gone"]) == [False] * 4
    assert _rows(database_url, team, history["kept"]) == [True] * 2
    # Nothing left: a second prune deletes nothing and records nothing.
    assert main(["db", "prune", "--older-than", "30d", *store]) == 0
    assert "deleted 0 sessions and 0 approval requests" in capsys.readouterr().out

    main(["keys", "show", "--pem", "audit-signer", *store])
    key = tmp_path / "audit.pem"
    key.write_text(capsys.readouterr().out)
    bundle = tmp_path / "ops.jsonl"
    assert main(["audit", "export", "--team", "ops", *store, "-o", str(bundle)]) == 0
    assert audit_main(["verify", str(bundle), "--key", str(key)]) == 0
    events = [json.loads(line)["event"] for line in bundle.read_text().splitlines()[1:-1]]
    plan, pruned = [event for event in events if event["action"] == "history.pruned"]
    assert plan["context"]["stage"] == "planned" and pruned["context"]["stage"] == "completed"
    assert pruned["actor"]["kind"] == "service"
    assert pruned["context"]["sessions"] == 3 and pruned["context"]["approval_requests"] == 1
    before = datetime.strptime(pruned["context"]["before"], "%Y-%m-%dT%H:%M:%S%z")
    assert abs(before.timestamp() - (time.time() - 30 * 86400)) < 120


def test_prune_refuses_a_cutoff_younger_than_a_week(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = ["--data-dir", str(tmp_path / "data")]
    assert main(["init", *store]) == 0
    capsys.readouterr()
    assert main(["db", "prune", "--older-than", "1d", *store]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "at least 7d" in error
