"""``tucdesk-rendezvous backup``: a consistent copy of a SQLite store, safe while serving.

A plain ``cp`` of a live SQLite database copies the main file without what is still in its
``-wal`` file (recent commits, audit records included). SQLite's online backup API reads the
database as one consistent snapshot through SQLite itself, WAL included, while the service
keeps writing. The copy is written to a temporary file beside the output (0600, as the store
is) and renamed into place, so a half-written backup never carries the output's name.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

from protocol.identity import sync_directory
from rendezvous.store.base import StoreError, StoreUnavailable

BACKUP_FILE_MODE = 0o600
TEMPORARY_SUFFIX = ".partial"
BUSY_TIMEOUT_SECONDS = 10.0


class BackupRefused(StoreError):
    """The backup was not written (output exists, source missing); the message says why."""


def backup_sqlite(source: str, output: Path, *, force: bool = False) -> int:
    """Copy the SQLite database ``source`` to ``output`` with the online backup API; return the
    size written. Refused if ``output`` exists, unless ``force``."""
    output = Path(output)
    if not Path(source).is_file():
        raise BackupRefused(f"no SQLite store at {source}")
    if output.exists() and not force:
        raise BackupRefused(f"{output} exists; choose another name or pass --force")
    if output.resolve() == Path(source).resolve():
        raise BackupRefused("the backup cannot overwrite the database itself")
    temporary = output.with_name(output.name + TEMPORARY_SUFFIX)
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    # O_EXCL: never write through a file or link someone else put there.
    os.close(os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, BACKUP_FILE_MODE))
    try:
        _copy(source, temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        if force:
            os.replace(temporary, output)
        else:
            # link() refuses an existing name: no race can make this overwrite an output.
            try:
                os.link(temporary, output)
            except FileExistsError:
                raise BackupRefused(
                    f"{output} exists; choose another name or pass --force"
                ) from None
            temporary.unlink()
        sync_directory(output.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    return output.stat().st_size


def _copy(source: str, destination: Path) -> None:
    try:
        # Read-write like the service's own connections (a read-only one cannot always share
        # the WAL index); the backup only reads.
        reader = sqlite3.connect(source, timeout=BUSY_TIMEOUT_SECONDS)
    except sqlite3.Error as error:
        raise StoreUnavailable(f"cannot open SQLite database {source}: {error}") from error
    try:
        target = sqlite3.connect(destination)
        try:
            reader.backup(target)
            # One self-contained file: no -wal beside the copy to forget when moving it.
            target.execute("PRAGMA journal_mode = DELETE")
            check = target.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StoreUnavailable(f"the backup copy failed its integrity check: {check}")
        finally:
            target.close()
    except sqlite3.Error as error:
        raise StoreUnavailable(f"backing up {source} failed: {error}") from error
    finally:
        reader.close()
