"""Entry point for `tucdesk-audit`: verify an exported audit bundle (and recordings) offline."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from audit.checkpoint import Checkpoint
from audit.errors import BundleError
from audit.progress import ProgressLine, format_bytes, wants_progress
from audit.recording_check import check_recording
from audit.verify import (
    EXIT_CODES,
    ProgressCallback,
    Verdict,
    VerificationResult,
    load_previous_checkpoint,
    verify_bundle,
)
from protocol.errors import ProtocolError
from protocol.identity import PublicIdentity, load_public_key_file

EXIT_UNREADABLE = EXIT_CODES[Verdict.UNREADABLE]
MIN_RATE_SECONDS = 0.25

_RECORDING_EPILOG = """\
Exit status: 0 when the bundle verifies and the file matches its record (one-line summary), 1
when the bundle is invalid, no record names the file, or its size or hash differ (says which),
2 when an input cannot be read.
"""

_VERIFY_EPILOG = """\
Exit status: 0 when every check passes (one-line summary), 1 when the bundle is invalid (names
the first bad record and why), 2 when an input cannot be read or is not a bundle at all.

Only keys given with --key are trusted (PEM Ed25519 public keys, e.g. the rendezvous audit key;
give several across a key rotation). Agent-signed records are accepted only if the agent's key
was introduced earlier in the same log by an audit-key-signed agent.registered record. Keys listed
inside the bundle are never trusted.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, so --help describes what exists."""
    parser = argparse.ArgumentParser(
        prog="tucdesk-audit",
        description="Verify TucDesk audit exports offline, with nothing but the file and keys.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on internal errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    verify = commands.add_parser(
        "verify",
        help="verify an export bundle",
        description=(
            "Check every record's signature, canonical encoding, sequence, time order and\n"
            "hash chain, the Merkle root against the signed checkpoint, and consistency with\n"
            "earlier checkpoints: truncation, rollback, reordering, insertion, deletion, edits\n"
            "and forged signatures are all detected."
        ),
        epilog=_VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument("bundle", type=Path, metavar="BUNDLE", help="the .jsonl export bundle")
    _add_bundle_trust_arguments(verify)
    verify.add_argument(
        "--save-checkpoint",
        type=Path,
        metavar="FILE",
        help="when the bundle verifies, write its signed checkpoint here, to pass as "
        "--previous-checkpoint when verifying the next export (detects rollback)",
    )
    verify.add_argument("--json", action="store_true", help="print a JSON result instead")
    _add_progress_argument(verify)
    verify.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )

    recording = commands.add_parser(
        "recording",
        help="check a session recording against a verified export",
        description=(
            "Verify the export bundle exactly as 'verify' does, then find the agent-signed\n"
            "session.ended record that names the recording file and compare the file's size\n"
            "and SHA-256 with it: an edited, cut or extended recording is detected."
        ),
        epilog=_RECORDING_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    recording.add_argument("recording", type=Path, metavar="FILE", help="the .cast recording")
    recording.add_argument(
        "--export",
        dest="bundle",
        type=Path,
        required=True,
        metavar="BUNDLE",
        help="the .jsonl export bundle holding the session's session.ended record",
    )
    _add_bundle_trust_arguments(recording)
    _add_progress_argument(recording)
    recording.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    recording.set_defaults(json=False)
    return parser


def _add_bundle_trust_arguments(command: argparse.ArgumentParser) -> None:
    """The keys (and earlier checkpoints) a bundle is verified against: same for every command."""
    command.add_argument(
        "--key",
        dest="keys",
        type=Path,
        action="append",
        required=True,
        metavar="KEYFILE",
        help="a pinned audit public key (PEM); repeat for rotated keys",
    )
    command.add_argument(
        "--previous-checkpoint",
        dest="previous",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="an earlier signed checkpoint you kept; the bundle must extend it (repeatable)",
    )


def _add_progress_argument(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show (or never show) a progress line on stderr while verifying: records checked, "
        "share of the file read, rate; erased before the result (default: only when stderr is "
        "a terminal)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "recording":
            return _recording(arguments)
        return _verify(arguments)
    except Exception as error:
        if arguments.debug:
            raise
        print(
            f"tucdesk-audit: internal error ({type(error).__name__}); rerun with --debug",
            file=sys.stderr,
        )
        return EXIT_UNREADABLE


def _load_trust(
    arguments: argparse.Namespace,
) -> tuple[list[PublicIdentity], list[Checkpoint]] | str:
    """The pinned keys and earlier checkpoints, or why one cannot be read."""
    keys: list[PublicIdentity] = []
    for path in arguments.keys:
        try:
            keys.append(load_public_key_file(path))
        except (ProtocolError, OSError) as error:
            return f"key {path}: {error}"
    previous: list[Checkpoint] = []
    for path in arguments.previous:
        try:
            previous.append(load_previous_checkpoint(path, keys))
        except BundleError as error:
            return str(error)
    return keys, previous


def _recording(arguments: argparse.Namespace) -> int:
    trust = _load_trust(arguments)
    if isinstance(trust, str):
        return _unreadable(arguments, trust)
    keys, previous = trust
    with _verify_progress(arguments) as progress:
        verdict = check_recording(
            arguments.recording,
            arguments.bundle,
            keys,
            previous_checkpoints=previous,
            progress=progress,
        )
    if verdict.verdict is Verdict.VALID:
        print(verdict.message)
    else:
        print(f"tucdesk-audit: {verdict.message}", file=sys.stderr)
    return verdict.exit_code


def _verify(arguments: argparse.Namespace) -> int:
    trust = _load_trust(arguments)
    if isinstance(trust, str):
        return _unreadable(arguments, trust)
    keys, previous = trust
    with _verify_progress(arguments) as progress:
        result = verify_bundle(
            arguments.bundle, keys, previous_checkpoints=previous, progress=progress
        )
    if result.checkpoint_note is not None and arguments.save_checkpoint is not None:
        try:
            arguments.save_checkpoint.write_bytes(result.checkpoint_note)
        except OSError as error:
            return _unreadable(
                arguments, f"{arguments.save_checkpoint}: cannot write ({error.strerror})"
            )
    _report(arguments, result)
    return result.exit_code


@contextmanager
def _verify_progress(arguments: argparse.Namespace) -> Iterator[ProgressCallback | None]:
    """The verifier's progress callback drawing a line on stderr (or None), erased on exit."""
    if not wants_progress(arguments.progress, sys.stderr):
        yield None
        return
    with ProgressLine(sys.stderr) as line:
        yield _BundleProgress(line, arguments.bundle).update


class _BundleProgress:
    """Renders ``records checked, share of the file read, rate`` for one bundle."""

    def __init__(self, line: ProgressLine, bundle: Path) -> None:
        self._line = line
        self._name = bundle.name
        try:
            self._size = os.stat(bundle).st_size
        except OSError:
            self._size = 0  # the verifier reports the unreadable file; just show no share

    def update(self, records: int, bytes_read: int) -> None:
        if not self._line.due():
            return
        share = ""
        if self._size > 0:
            share = f", {min(100, bytes_read * 100 // self._size)}% of {format_bytes(self._size)}"
        elapsed = self._line.elapsed()
        # A rate over the first few milliseconds would be noise.
        rate = f", {records / elapsed:,.0f} records/s" if elapsed >= MIN_RATE_SECONDS else ""
        self._line.show(f"verifying {self._name}: {records:,} records{share}{rate}")


def _unreadable(arguments: argparse.Namespace, reason: str) -> int:
    _report(arguments, VerificationResult(Verdict.UNREADABLE, reason))
    return EXIT_UNREADABLE


def _report(arguments: argparse.Namespace, result: VerificationResult) -> None:
    if arguments.json:
        print(json.dumps(result.to_json(), indent=2, sort_keys=True))
    elif result.verdict is Verdict.UNREADABLE:
        print(f"tucdesk-audit: {result.summary()}", file=sys.stderr)
    else:
        print(result.summary())


if __name__ == "__main__":
    sys.exit(main())
