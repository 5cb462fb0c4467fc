"""Entry point for `tucdesk-rendezvous`: the rendezvous control plane (init, serve, team, invite, keys)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, so --help describes what exists today."""
    return argparse.ArgumentParser(
        prog="tucdesk-rendezvous",
        description="TucDesk the rendezvous control plane (init, serve, team, invite, keys). Not built yet: arrives with issue 4 (rendezvous).",
    )


def main(argv: list[str] | None = None) -> int:
    """Parse arguments; say plainly that this command is not built yet."""
    build_parser().parse_args(argv)
    print("tucdesk-rendezvous: not built yet; it arrives with issue 4 (rendezvous).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
