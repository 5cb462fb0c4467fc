"""`tucdesk-rendezvous backup`: a consistent SQLite copy while serving; pg_dump advice."""

from __future__ import annotations

import os
import shutil
import sqlite3
from pathlib import Path

import pytest
import trio

from rendezvous.main import main
from rendezvous.store import open_store
from rendezvous.store.backup import TEMPORARY_SUFFIX

NOW = 1_800_000_000.0
TEAMS = 20


def _teams_in(path: Path) -> set[str]:
    connection = sqlite3.connect(path)
    try:
        return {row[0] for row in connection.execute("SELECT name FROM teams")}
    except sqlite3.DatabaseError:
        return set()
    finally:
        connection.close()


@pytest.mark.anyio
async def test_backup_while_serving_holds_rows_still_in_the_wal_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert await trio.to_thread.run_sync(main, ["init", "--data-dir", str(data)]) == 0
    database = data / "rendezvous.db"
    backup = tmp_path / "backup.db"
    async with open_store(f"sqlite://{database}") as store:
        names = {f"team-{number}" for number in range(TEAMS)}
        for name in sorted(names):
            await store.create_team(name, NOW)
        # The commits are in the -wal file, not yet in the database file.
        assert os.stat(f"{database}-wal").st_size > 0
        # What a plain cp of the database file would have kept:
        shutil.copyfile(database, tmp_path / "cp.db")
        assert not names & _teams_in(tmp_path / "cp.db")

        arguments = ["backup", str(backup), "--data-dir", str(data)]
        assert await trio.to_thread.run_sync(main, arguments) == 0
        # Serving goes on: a write after the backup still works and is not in the copy.
        await store.create_team("after-backup", NOW)

    assert names <= _teams_in(backup)
    assert "after-backup" not in _teams_in(backup)
    assert os.stat(backup).st_mode & 0o777 == 0o600
    assert f"{backup.name}-wal" not in os.listdir(tmp_path)
    connection = sqlite3.connect(backup)
    try:
        assert connection.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        connection.close()
    # The copy is a working store.
    async with open_store(f"sqlite://{backup}") as restored:
        assert names <= {team.name for team in await restored.list_teams()}


def test_backup_refuses_an_existing_output_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = ["--data-dir", str(tmp_path / "data")]
    assert main(["init", *data]) == 0
    output = tmp_path / "backup.db"
    output.write_bytes(b"keep me")
    capsys.readouterr()
    assert main(["backup", str(output), *data]) == 1
    error = capsys.readouterr().err
    assert "exists" in error and "--force" in error and error.count("\n") == 1
    assert output.read_bytes() == b"keep me"
    assert main(["backup", str(output), "--force", *data]) == 0
    assert output.read_bytes().startswith(b"SQLite format 3\0")
    assert output.stat().st_mode & 0o777 == 0o600
    assert not output.with_name(output.name + TEMPORARY_SUFFIX).exists()


def test_backup_out_of_a_missing_store_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["backup", str(tmp_path / "b.db"), "--data-dir", str(tmp_path / "nope")]) == 1
    assert "no rendezvous store" in capsys.readouterr().err
    assert not (tmp_path / "b.db").exists()


def test_backup_on_postgres_gives_the_pg_dump_command_without_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "postgresql://tucdesk:s3cr3t%2Fpw@db.internal:5433/tucdesk_prod"
    output = tmp_path / "rendezvous.dump"
    assert main(["backup", str(output), "--data-dir", str(tmp_path), "--database", url]) == 1
    error = capsys.readouterr().err
    assert f"pg_dump -Fc -h db.internal -p 5433 -U tucdesk -d tucdesk_prod -f {output}" in error
    assert "s3cr3t" not in error and "pw" not in error.replace("pg_", "")
    assert "keys" in error
    assert not output.exists()
