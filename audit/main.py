"""Entry point for `tucdesk-audit`: the offline audit verifier (verify)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, so --help describes what exists today."""
    return argparse.ArgumentParser(
        prog="tucdesk-audit",
        description="TucDesk the offline audit verifier (verify). Not built yet: arrives with issue 3 (audit).",
    )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; say plainly that this command is not built yet."""
    build_parser().parse_args(argv)
    print("tucdesk-audit: not built yet; it arrives with issue 3 (audit).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
