"""`db prune` records what it really deleted (a plan, then the outcome, also when stopped by
Ctrl-C, which prints one line), and durations are parsed strictly."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from rendezvous.errors import ConfigError
from rendezvous.main import MAX_DURATION_SECONDS, main, parse_duration
from rendezvous.retention import prune_team_history
from rendezvous.store import SessionState, Store, open_store
from rendezvous.store.base import PrunedHistory
from rendezvous.store.sql_store import SqlStore
from tests.rendezvous.test_retention_store import CUTOFF, NOW, _agent, _session

pytestmark = pytest.mark.anyio


class _Trail:
    """Collects the records a prune would append (the real trail is exercised by the CLI test)."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    async def record(self, team_id: str, **record: Any) -> None:
        self.records.append(record["details"])


async def _old_sessions(store: Store, count: int) -> str:
    team, agent = await _agent(store, "ops")
    for _ in range(count):
        await _session(store, team, agent, SessionState.ENDED)
    await store.touch_agent(team, agent, NOW)
    return team


async def test_a_stopped_prune_records_the_rows_it_really_deleted(store: Store) -> None:
    team = await _old_sessions(store, 5)
    trail = _Trail()
    batches: list[PrunedHistory] = []
    pruned = await prune_team_history(
        store, trail, team, CUTOFF, batch_rows=2,  # type: ignore[arg-type]
        progress=batches.append, stop_requested=lambda: len(batches) >= 1,
    )  # fmt: skip
    assert pruned == PrunedHistory(sessions=2)
    assert [(r["stage"], r["sessions"]) for r in trail.records] == [
        ("planned", 5),
        ("interrupted", 2),
    ]
    trail = _Trail()
    rest = await prune_team_history(store, trail, team, CUTOFF, batch_rows=2)  # type: ignore[arg-type]
    assert rest == PrunedHistory(sessions=3)
    assert [(r["stage"], r["sessions"]) for r in trail.records] == [
        ("planned", 3),
        ("completed", 3),
    ]


async def test_a_failed_batch_is_recorded_with_what_was_deleted_before_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    team = await _old_sessions(store, 3)
    original = type(store).prune_history
    calls = 0

    async def failing_second(self: Any, *args: Any) -> PrunedHistory:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError("disk went away")
        return await original(self, *args)

    monkeypatch.setattr(type(store), "prune_history", failing_second)
    trail = _Trail()
    with pytest.raises(OSError, match="disk went away"):
        await prune_team_history(store, trail, team, CUTOFF, batch_rows=1)  # type: ignore[arg-type]
    assert [(r["stage"], r["sessions"]) for r in trail.records] == [
        ("planned", 3),
        ("interrupted", 1),
    ]


def test_ctrl_c_stops_the_prune_after_a_batch_with_one_line_and_the_outcome_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store_args = ["--data-dir", str(tmp_path / "data")]
    assert main(["init", *store_args]) == 0
    url = f"sqlite:///{next((tmp_path / 'data').glob('*.db'))}"

    async def fill() -> None:
        async with open_store(url, migrate=False) as store:
            await _old_sessions(store, 3)

    trio.run(fill)
    original = SqlStore.prune_history

    async def interrupted_after_first(self: Any, *args: Any) -> PrunedHistory:
        done = await original(self, args[0], args[1], 1)  # one row per batch
        signal.raise_signal(signal.SIGINT)  # the operator presses Ctrl-C
        return done

    monkeypatch.setattr(SqlStore, "prune_history", interrupted_after_first)
    capsys.readouterr()
    assert main(["db", "prune", "--older-than", "30d", *store_args]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "db prune interrupted: deleted 1 sessions" in err.splitlines()[-1]
    monkeypatch.undo()

    async def records() -> list[dict[str, Any]]:
        async with open_store(url, migrate=False) as store:
            team = (await store.list_teams())[-1].id
            rows = await store.audit.read_records(team, 0, 100)
            events = [json.loads(row.canonical)["event"] for row in rows]
            return [e["context"] for e in events if e["action"] == "history.pruned"]

    assert [(r["stage"], r["sessions"]) for r in trio.run(records)] == [
        ("planned", 3),
        ("interrupted", 1),
    ]


@pytest.mark.parametrize(
    "text", ["²d", "٣٠d", "99999999999999999d", "3000000d", "1e3d", "-8d", "0d", "7dd", "", "d"]
)
def test_a_duration_that_is_not_ascii_digits_and_a_unit_in_range_is_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_a_bad_older_than_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store_args = ["--data-dir", str(tmp_path / "data")]
    assert main(["init", *store_args]) == 0
    for text in ("²d", "99999999999999999d", "3000000d"):
        capsys.readouterr()
        assert main(["db", "prune", "--older-than", text, *store_args]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "duration" in err and "unexpected" not in err


@given(st.text(max_size=24))
def test_parse_duration_returns_a_bounded_positive_number_or_refuses(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ConfigError:
        return
    assert 0 < seconds <= MAX_DURATION_SECONDS
    assert text.strip().lower().rstrip("smhd").isascii()


def test_durations_that_were_valid_still_are() -> None:
    assert [parse_duration(t) for t in ("90s", "30m", "24h", "7d", " 7D ", "120")] == [
        90,
        1800,
        86400,
        604800,
        604800,
        120,
    ]
    assert parse_duration("36500d") == MAX_DURATION_SECONDS
