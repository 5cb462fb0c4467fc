"""Entry point for `tucdesk-relay`: the ciphertext-only relay (serve)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, so --help describes what exists today."""
    return argparse.ArgumentParser(
        prog="tucdesk-relay",
        description="TucDesk the ciphertext-only relay (serve). Not built yet: arrives with issue 5 (relay).",
    )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; say plainly that this command is not built yet."""
    build_parser().parse_args(argv)
    print("tucdesk-relay: not built yet; it arrives with issue 5 (relay).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
