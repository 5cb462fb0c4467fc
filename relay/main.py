"""Entry point for `tucdesk-relay`: ``serve`` runs the ciphertext-only relay."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import trio

from protocol.stdio_fds import open_dev_null_on_closed_standard_fds
from protocol.version import installed_version
from relay.config import OPTIONS, RelayConfig, load_config
from relay.errors import RelayError
from relay.fdlimit import raise_open_file_limit
from relay.server import Relay

PROGRAM = "tucdesk-relay"

log = logging.getLogger("tucdesk.relay")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; every option's help names its default and environment variable."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="TucDesk relay: pairs the two sides of a session by their signed relay "
        "tokens and forwards their (already encrypted) bytes. It holds no session keys.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {installed_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the relay",
        description="Run the relay. Precedence: flags, then TUCDESK_RELAY_* environment "
        "variables, then the --config TOML file (keys as below without dashes, optionally "
        "under [relay]), then defaults.",
    )
    serve.add_argument("--config", type=Path, default=None, metavar="FILE", help="TOML config file")
    for option in OPTIONS:
        help_text = f"{option.help} [env {option.environment_variable}]"
        if option.kind == "bool":
            serve.add_argument(
                option.flag, dest=option.name, action="store_const", const=True,
                default=None, help=f"{help_text} (default: {option.default})",
            )
        elif option.kind == "paths":
            serve.add_argument(
                option.flag, dest=option.name, action="append", metavar="FILE",
                default=None, help=help_text,
            )
        else:
            serve.add_argument(
                option.flag, dest=option.name, default=None,
                metavar=option.name.upper() if option.kind != "address" else "HOST:PORT",
                help=help_text
                + ("" if option.default is None else f" (default: {option.default})"),
            )
    return parser


def configure_logging(config: RelayConfig) -> None:
    """Log lines to stderr; with --blur-logs, timestamps only to the minute."""
    time_format = "%Y-%m-%dT%H:%MZ" if config.blur_logs else "%Y-%m-%dT%H:%M:%SZ"
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s", time_format)
    formatter.converter = time.gmtime
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger("tucdesk")
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())
    root.propagate = False


async def run(config: RelayConfig) -> None:
    """Serve until SIGINT or SIGTERM, then shut down gracefully (a second signal is immediate).

    SIGHUP re-reads the relay-token keys (``Relay.reload``) and never stops the relay.
    """
    relay = Relay(config)
    async with trio.open_nursery() as nursery:
        # Started (its handlers installed) before the sockets are bound and the start logged.
        await nursery.start(_watch_signals, relay, nursery.cancel_scope)
        await relay.serve()
        nursery.cancel_scope.cancel()


async def _watch_signals(
    relay: Relay, everything: trio.CancelScope, *, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        task_status.started()
        stopping = False
        async for signal_number in signals:
            if signal_number == signal.SIGHUP:
                log.info("signal=SIGHUP reload")
                relay.reload()
                continue
            if stopping:
                log.warning("second signal: stopping now")
                everything.cancel()
                return
            log.info("signal=%s graceful_shutdown", signal.Signals(signal_number).name)
            stopping = True
            relay.shutdown()


def _first_relay_error(error: BaseException) -> RelayError | None:
    """The RelayError inside ``error`` (trio wraps task errors in exception groups)."""
    if isinstance(error, RelayError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _first_relay_error(inner)
            if found is not None:
                return found
    return None


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the command; print one line and exit non-zero on error."""
    open_dev_null_on_closed_standard_fds()  # before any socket can take fd 0-2
    parser = build_parser()
    arguments = parser.parse_args(argv)
    # Until the signal watcher takes over, a reload request must not kill the relay (SIGHUP's
    # default action); the watcher restores this when the relay stops.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        flags = {option.name: getattr(arguments, option.name, None) for option in OPTIONS}
        config = load_config(flags, os.environ, arguments.config)
        configure_logging(config)
        limit, warning = raise_open_file_limit(config.file_descriptors_needed)
        if warning:
            log.warning(
                "fd_limit open_files=%d needed=%d sessions_allowed=%d of max_sessions=%d: %s",
                limit, config.file_descriptors_needed, config.sessions_allowed_by(limit),
                config.max_sessions, warning,
            )
        else:
            log.info("fd_limit open_files=%d needed=%d", limit, config.file_descriptors_needed)
        trio.run(run, config)
    except (RelayError, BaseExceptionGroup) as error:
        relay_error = _first_relay_error(error)
        if relay_error is None or arguments.debug:
            raise
        print(f"tucdesk-relay: {relay_error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
