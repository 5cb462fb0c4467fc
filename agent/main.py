"""Entry point for `tucdesk-agent`: the agent daemon (enroll, run, status)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, so --help describes what exists today."""
    return argparse.ArgumentParser(
        prog="tucdesk-agent",
        description=(
            "TucDesk agent daemon (enroll, run, status). "
            "Not built yet: arrives with issue 6 (sessions end to end)."
        ),
    )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; say plainly that this command is not built yet."""
    build_parser().parse_args(argv)
    print(
        "tucdesk-agent: not built yet; it arrives with issue 6 (sessions end to end).",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())
