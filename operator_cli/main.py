"""Entry point for `tucdesk`, the operator command line."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, so --help describes what exists today."""
    return argparse.ArgumentParser(
        prog="tucdesk",
        description=(
            "TucDesk operator command line. Not built yet: login and account commands arrive "
            "with issue 4 (rendezvous), connect/exec/demo with issue 6 (sessions)."
        ),
    )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the chosen command."""
    build_parser().parse_args(argv)
    print("tucdesk: not built yet; see --help.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
