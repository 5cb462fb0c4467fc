"""Numbered schema migrations, one list per backend, applied in order at start-up.

A migration is never edited once released; a schema change is a new migration with the next
number (later issues add sessions and policy this way). Each backend records what it applied in
``schema_migrations(version, name, applied_at)``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    """One schema step: its number, a short name, and the statements it runs in one transaction."""

    version: int
    name: str
    statements: tuple[str, ...]


def check_sequence(migrations: tuple[Migration, ...]) -> None:
    """Raise ValueError unless versions run 1, 2, 3… without gaps or repeats."""
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise ValueError(f"migration {migration.name} has version {migration.version}, "
                             f"expected {expected}")
