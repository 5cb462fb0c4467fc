"""The version every TucDesk program reports: the installed distribution's, from its metadata."""

from __future__ import annotations

import argparse
import importlib.metadata

DISTRIBUTION = "tucdesk"
NOT_INSTALLED = "unknown (not installed)"


def installed_version() -> str:
    """The installed tucdesk distribution's version, or NOT_INSTALLED when run from a tree."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return NOT_INSTALLED


class VersionAction(argparse.Action):
    """``--version``: prints ``PROG VERSION`` and exits, reading the metadata only when asked
    (so a command's start-up does not pay for it)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        kwargs.setdefault("help", "show the version and exit")
        super().__init__(option_strings, dest, nargs=0, **kwargs)  # type: ignore[arg-type]

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        """Print the version and exit (argparse calls this when the option is given)."""
        print(f"{parser.prog} {installed_version()}")
        parser.exit()
