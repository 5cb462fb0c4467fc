"""Reading a service's TOML configuration file: bounded in size, one table, clear errors.

The agent, relay and rendezvous each take an optional ``--config FILE``. Whatever the path names
(a huge file, a FIFO, ``/dev/zero``), at most ``max_size + 1`` bytes are read before it is refused.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any


def read_config_table(
    path: Path, table: str, max_size: int, error: type[Exception]
) -> dict[str, Any]:
    """The ``[table]`` of the TOML file at ``path`` (or its top level when it has no such table),
    with dashes in keys read as underscores; ``error`` (the caller's ConfigError) otherwise."""
    try:
        with path.open("rb") as handle:
            data = handle.read(max_size + 1)
    except FileNotFoundError:
        raise error(f"{path}: no such config file") from None
    except OSError as failure:
        raise error(f"{path}: cannot read the config file ({failure.strerror})") from None
    if len(data) > max_size:
        raise error(f"{path}: config file is larger than {max_size} bytes")
    try:
        parsed = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as failure:
        raise error(f"{path}: not valid TOML ({failure})") from None
    section = parsed.get(table, parsed)
    if not isinstance(section, dict):
        raise error(f"{path}: [{table}] must be a table")
    # Beside a [table], plain keys at the top level would be silently ignored: refuse them.
    # (Other tables are another part's settings in a shared file.)
    stray = [key for key, value in parsed.items() if key != table and not isinstance(value, dict)]
    if section is not parsed and stray:
        raise error(
            f"{path}: {', '.join(sorted(stray))} must go inside the [{table}] table "
            "(keys above it are not read)"
        )
    return {key.replace("-", "_"): value for key, value in section.items()}
