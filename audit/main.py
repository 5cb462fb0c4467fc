"""Entry point for `tucdesk-audit`: verify an exported audit bundle (and recordings) offline."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import signal
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, NoReturn

from audit.actions import PolicyOutcome
from audit.agent_pins import AgentPinError, load_agent_pins
from audit.checkpoint import Checkpoint, open_checkpoint
from audit.errors import AuditError, BundleError
from audit.pinned_keys import PinnedKeyError, load_pinned_key
from audit.progress import ProgressLine, format_bytes, wants_progress
from audit.recording_check import check_recording
from audit.show import (
    MAX_SHOWN_DETAIL,
    MAX_SHOWN_DETAILS,
    RecordFilter,
    TimeError,
    parse_when,
    show_records,
)
from audit.verify import (
    EXIT_CODES,
    EarlierCheckpoint,
    KeyNames,
    ProgressCallback,
    Verdict,
    VerificationResult,
    load_previous_checkpoint,
    read_checkpoint_note,
    read_small_file,
    verify_bundle,
)
from protocol.identity import PublicIdentity
from protocol.stdio_fds import open_dev_null_on_closed_standard_fds
from protocol.terminal_text import visible
from protocol.version import VersionAction

EXIT_UNREADABLE = EXIT_CODES[Verdict.UNREADABLE]
EXIT_CHECKPOINT_NOT_SAVED = 4
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
MIN_RATE_SECONDS = 0.25
STDIN_NAME = "-"
MAX_CHECKPOINT_FILE_BYTES = 64 * 1024

_EXIT_CODES_HELP = """\
Exit status:
  0    OK: every check passed (a summary naming the pinned key(s) and agent keys that signed,
       and warnings, e.g. an --agent-key that matched no agent; without
       --previous-checkpoint a second line says rollback was not checked)
  1    INVALID: the bundle was tampered with, damaged or transformed (CRLF, byte-order mark);
       names the first bad record and why
  2    UNREADABLE: an input cannot be read or is not a bundle / key / checkpoint at all, or is
       the wrong one (--previous-checkpoint of another log, a malformed --agent-key)
  3    WRONG KEY: no pinned key signed the bundle's first record (--key is not its audit key,
       or is a key an audit key rotation introduced later: pin the first one, once you have
       it from a source other than this bundle)
  4    the bundle verified but --save-checkpoint FILE was left unchanged (it keeps a larger
       checkpoint, or one of another log, or one not signed by a pinned key); never for a
       bundle that does not verify. It wins over 5 for a NEWER bundle: the save asked for
       failed (the next rollback check would run against FILE's older checkpoint); the
       output still says NEWER (--json: "verdict": "newer" and "newer_actions")
  5    NEWER: every check passed, but some records name actions this tucdesk-audit does not
       know (a newer TucDesk release wrote them): a line says how many records use which
       actions and the first one's record and line; their chain and signatures verified,
       what they mean was not checked: upgrade tucdesk-audit (see 'verify --help')
  130  interrupted (Ctrl-C)
  141  the reader of the output went away (SIGPIPE, e.g. piped into head): ends quietly
With --json the same outcome is in the "code" field: valid, invalid, unreadable, wrong_key,
newer, checkpoint_not_saved (and for 'recording' the finer codes its --help lists).
"""

_RECORDING_EPILOG = """\
Exit status: 0 when the bundle verifies and the file matches its record (one-line summary), 1
when the bundle is invalid, no record names the file, or its size or hash differ (says which:
cut short, extended, edited, and which session's record the file's content matches, if any),
2 when an input cannot be read (the recording is checked first), 3 when no pinned key signed
the bundle, 5 when the file matches its record but the bundle is NEWER (it also holds records
of actions this tucdesk-audit does not know, their meaning unchecked: the summary says so;
upgrade tucdesk-audit), 130 when interrupted,
141 when the reader of the output went away (SIGPIPE).
A file that differs exits 1 in a NEWER bundle too.
With --json, "code" is one of: matches, cut_short, extended, edited, not_named, named_twice,
export_invalid, wrong_key, unreadable; "ok" is true when the file matches its record, and
"newer" true when the bundle verified as NEWER.
"""

_VERIFY_EPILOG = (
    _EXIT_CODES_HELP
    + """
Only keys given with --key are trusted (PEM Ed25519 public keys, e.g. the rendezvous audit key;
give several across a key rotation). Agent-signed records are accepted only if the agent's key
was introduced earlier in the same log by an audit-key-signed agent.registered record. Keys listed
inside the bundle are never trusted. An OK may carry WARNINGs: a retired audit key still signing
after its rotation, an agent's records signed after its removal (with their record numbers).
Compare a key's fingerprint out of band with 'tucdesk-audit key KEYFILE' and
'tucdesk-rendezvous keys show'. BUNDLE '-' reads standard input (e.g. tucdesk audit export |
tucdesk-audit verify - --key audit.pub).

Records of a newer TucDesk release (exit 5, NEWER): a record whose action this verifier does not
know, but which is of the form of today's (word.word: lowercase letters, digits, '_'), is held
to every other check (canonical form, sequence, time, hash chain, team, its signature by a
pinned audit key, one the chain's rotations introduced, or an agent key signing as its own
agent; the checkpoint and rollback checks). What such a record means is not checked, and an
unknown action can hide what this verifier would otherwise act on:
  - it may be a new kind of key rotation or registration: a record signed by a key it
    introduced fails as an unknown signer, which stays INVALID, naming that record (the message
    names the unknown action before it: verify with an upgraded tucdesk-audit);
  - it may be a new kind of record only an agent's own key may sign: one that names an agent
    as the actor but is signed by the service's audit key is verified only as far as that
    signature goes (the NEWER line counts them);
  - it may be a new kind of agent removal or audit key retirement: the records signed after
    it raise no "signed after its removal" or "retired key still signing" WARNING, since this
    verifier does not know the record removed the agent or retired the key.
An action not of that form (another shape, over 64 characters, control characters) is INVALID.
Upgrade tucdesk-audit together with the rendezvous; --save-checkpoint still saves the checkpoint
of a NEWER bundle (its signature and Merkle root were checked).
"""
)

_SHOW_EPILOG = """\
Exit status as for 'verify' (0 shown, 1 invalid, 2 unreadable, 3 wrong key, 5 newer, 130,
141): on any failure nothing but the verdict is printed; with 5 the records are printed (a
record of an action this tucdesk-audit does not know with its action as is) and the NEWER lines
go to stderr. With --json: {"records": [...], "verification":
<the verify --json result>}; each record has seq, time, action, actor (kind, id, display: who
acted, by= on a line), agent_id, agent_name, operator and operator_id (as in earlier releases:
the operator who acted, else the operator of the record's session), subject and subject_id
(whom the record is about, operator= on a line: the target of operator.*, the requester of
approval.*, the operator of session.*), session_id, command, approved_by, policy_result
(outcome, rule_id, reason, from a record the service signed; else null), agent_policy_result
(the same from a record the agent's own key signed: the agent's word), signed_by, signer_key_id.
"""

_KEY_EPILOG = """\
Prints "FILE: SHA256:<base64> kid=<key id>", the format of 'tucdesk-rendezvous keys show', so a
pinned key can be compared out of band. Exit 0, or 2 when a file is not a PEM Ed25519 public
key (a private key is refused: an auditor never needs the signer's private key).
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, so --help describes what exists."""
    parser = argparse.ArgumentParser(
        prog="tucdesk-audit",
        description="Verify TucDesk audit exports offline, with nothing but the file and keys.",
        epilog=_EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=VersionAction)
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
    verify.add_argument(
        "bundle", type=Path, metavar="BUNDLE", help="the .jsonl export bundle ('-': stdin)"
    )
    _add_bundle_trust_arguments(verify)
    verify.add_argument(
        "--save-checkpoint",
        type=Path,
        metavar="FILE",
        help="when the bundle verifies, write its signed checkpoint here, to pass as "
        "--previous-checkpoint when verifying the next export (detects rollback); a checkpoint "
        "already in FILE is never replaced by a smaller one, one of another log, or a "
        "conflicting one (exit 4, or 1 if the bundle rewrites the history FILE holds)",
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
        help="the .jsonl export bundle holding the session's session.ended record ('-': stdin)",
    )
    _add_bundle_trust_arguments(recording)
    recording.add_argument("--json", action="store_true", help="print a JSON result instead")
    _add_progress_argument(recording)
    recording.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )

    show = commands.add_parser(
        "show",
        help="print the records of a verified bundle, one per line",
        description=(
            "Verify the bundle exactly as 'verify' does, then print the records that match,\n"
            "one per line: log time (UTC), action, who acted (by=), the agent and the\n"
            "operator it is about (operator=: the target of operator.*, the requester of\n"
            "approval.*, the operator of session.*), session, policy decision and rule\n"
            "(decision=, rule=: the service's; agent_decision=, agent_rule=: what the agent's\n"
            "own key signed, never matched by --decision), who approved a session, and the\n"
            "command; then what the record acted on (target=, unless agent= or operator=\n"
            "names it) and its context as details.KEY=VALUE (why a session ended, the keys\n"
            "a revocation revoked, an API key's scopes, an approved command): a value over\n"
            f"{MAX_SHOWN_DETAIL} characters is cut with '…', and past {MAX_SHOWN_DETAILS} "
            "characters of details the rest\n"
            "is only counted (details_omitted=N); --json gives target and details whole.\n"
            "A value holding whitespace, '=', '\"' or '\\' is quoted (\"…\", with \\\"\n"
            "and \\\\), so no record can add a field; an operator email an agent wrote is shown\n"
            "as operator= only if it is an email. A session record's argv or command is left\n"
            "out of its details only when command= shows that very field, and a record with a\n"
            "command of its own never shows another record's. Nothing is shown from a bundle\n"
            "that does not verify.\n"
            "Control characters in records are shown escaped, never raw."
        ),
        epilog=_SHOW_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    show.add_argument(
        "bundle", type=Path, metavar="BUNDLE", help="the .jsonl export bundle ('-': stdin)"
    )
    _add_bundle_trust_arguments(show)
    show.add_argument("--agent", metavar="NAME", help="only records about this agent (id, name "
                      "or hostname)")  # fmt: skip
    show.add_argument("--operator", metavar="EMAIL", help="only records by or about this "
                      "operator (email or id): either who acted (by=) or whom the record is "
                      "about (operator=), e.g. both the admin who disabled them and their "
                      "own requests")  # fmt: skip
    show.add_argument("--actor", metavar="ID", help="only records by this actor (operator email "
                      "or id, agent id, api key id; by= on a line)")  # fmt: skip
    show.add_argument("--decision", metavar="OUTCOME", choices=[o.value for o in PolicyOutcome],
                      help="only records whose policy result, as the service signed it, is OUTCOME "
                      "(allow, deny, approval_required, approved, denied), e.g. --decision deny "
                      "--action session.decision for denied requests")  # fmt: skip
    show.add_argument("--action", metavar="PREFIX", help="only actions starting with PREFIX "
                      "(e.g. session. or approval.approved)")  # fmt: skip
    show.add_argument("--from", dest="start", metavar="TIME", help="only records logged at or "
                      "after TIME (ISO 8601; UTC unless it says otherwise)")  # fmt: skip
    show.add_argument("--to", dest="end", metavar="TIME", help="only records logged at or "
                      "before TIME")  # fmt: skip
    show.add_argument("--json", action="store_true", help="print a JSON result instead")
    _add_progress_argument(show)
    show.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )

    key = commands.add_parser(
        "key",
        help="print a public key's fingerprint, to compare with tucdesk-rendezvous keys show",
        description="Print the SHA256 fingerprint and key id of PEM Ed25519 public key files.",
        epilog=_KEY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    key.add_argument("keys", type=Path, nargs="+", metavar="KEYFILE", help="a PEM public key")
    key.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
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
        help="an earlier signed checkpoint you kept; the bundle must extend it (repeatable); "
        "signed by a pinned key or one the bundle's audit key rotations introduce from it",
    )
    command.add_argument(
        "--agent-key",
        dest="agent_pins",
        action="append",
        default=[],
        metavar="NAME_OR_ID=FINGERPRINT",
        help="pin an agent's key fingerprint learnt out of band (tucdesk-agent status), by "
        "agent id (agt_..., the robust form: names are the registrant's choice), name or "
        "hostname: a registration of that agent with another key is INVALID; a pin that "
        "matches no registration is a WARNING (repeatable)",
    )
    command.add_argument(
        "--agent-keys",
        dest="agent_pin_files",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="a file of NAME_OR_ID=FINGERPRINT lines, as --agent-key ('#' starts a comment)",
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


def console_main() -> NoReturn:
    """The ``tucdesk-audit`` command: ``main`` with SIGPIPE's default action restored, so a
    reader that goes away (``tucdesk-audit key *.pem | head -1``) ends it quietly, as it would
    grep. Not done in ``main``, which tests call in-process."""
    open_dev_null_on_closed_standard_fds()  # before any socket can take fd 0-2
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "recording":
            return _recording(arguments)
        if arguments.command == "key":
            return _key(arguments)
        if arguments.command == "show":
            return _show(arguments)
        return _verify(arguments)
    except KeyboardInterrupt:
        # The progress line (if any) was erased on the way out of its `with`.
        print("tucdesk-audit: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        if arguments.debug:
            raise
        print(
            f"tucdesk-audit: internal error ({type(error).__name__}); rerun with --debug",
            file=sys.stderr,
        )
        return EXIT_UNREADABLE


@dataclasses.dataclass(frozen=True)
class _Trust:
    keys: list[PublicIdentity]
    previous: list[EarlierCheckpoint]
    names: dict[str, str]
    agent_pins: dict[str, str]


def _load_trust(arguments: argparse.Namespace) -> _Trust | str:
    """The pinned keys, earlier checkpoints, key names (key id -> file) and agent pins, or why
    one cannot be read."""
    keys: list[PublicIdentity] = []
    names: dict[str, str] = {}
    for path in arguments.keys:
        try:
            key = load_pinned_key(path)
        except PinnedKeyError as error:
            return str(error)
        keys.append(key)
        names.setdefault(key.key_id, str(path))
    previous: list[EarlierCheckpoint] = []
    for path in arguments.previous:
        try:
            previous.append(load_previous_checkpoint(path, keys))
        except BundleError as error:
            return str(error)
    try:
        agent_pins = load_agent_pins(arguments.agent_pins, arguments.agent_pin_files)
    except AgentPinError as error:
        return str(error)
    return _Trust(keys, previous, names, agent_pins)


def _key(arguments: argparse.Namespace) -> int:
    for path in arguments.keys:
        try:
            key = load_pinned_key(path)
        except PinnedKeyError as error:
            print(f"tucdesk-audit: {error}", file=sys.stderr)
            return EXIT_UNREADABLE
        print(f"{path}: {key.fingerprint} kid={key.key_id}")
    return 0


def _bundle_source(bundle: Path) -> Path | BinaryIO:
    return sys.stdin.buffer if str(bundle) == STDIN_NAME else bundle


def _recording(arguments: argparse.Namespace) -> int:
    trust = _load_trust(arguments)
    if isinstance(trust, str):
        return _unreadable(arguments, trust)
    names = trust.names
    with _verify_progress(arguments) as progress:
        verdict = check_recording(
            arguments.recording,
            _bundle_source(arguments.bundle),
            trust.keys,
            previous_checkpoints=trust.previous,
            progress=progress,
            key_names=names,
            agent_pins=trust.agent_pins,
        )
    if arguments.json:
        print(json.dumps(verdict.to_json(names), indent=2, sort_keys=True))
    elif verdict.verdict in (Verdict.VALID, Verdict.NEWER):
        print(visible(verdict.message))
    else:
        print(f"tucdesk-audit: {visible(verdict.message)}", file=sys.stderr)
    return verdict.exit_code


def _show(arguments: argparse.Namespace) -> int:
    trust = _load_trust(arguments)
    if isinstance(trust, str):
        return _unreadable(arguments, trust)
    try:
        wanted = RecordFilter(
            agent=arguments.agent,
            operator=arguments.operator,
            actor=arguments.actor,
            decision=arguments.decision,
            action_prefix=arguments.action,
            start=None if arguments.start is None else parse_when(arguments.start),
            end=None if arguments.end is None else parse_when(arguments.end),
        )
    except TimeError as error:
        return _unreadable(arguments, str(error))
    with _verify_progress(arguments) as progress:
        shown = show_records(
            _bundle_source(arguments.bundle),
            trust.keys,
            wanted,
            previous_checkpoints=trust.previous,
            progress=progress,
            agent_pins=trust.agent_pins,
        )
    result = shown.verification
    if arguments.json:
        value = {
            "records": [record.to_json() for record in shown.records],
            "verification": result.to_json(trust.names),
        }
        print(json.dumps(value, indent=2, sort_keys=True))
    elif not result.verified:
        _report(arguments, result, trust.names)
    else:
        for record in shown.records:
            print(record.line())
        # The records are the output; a pin that checked nothing must still be seen.
        unmatched = result.unmatched_pins_warning()
        if unmatched is not None:
            print(f"tucdesk-audit: {visible(unmatched)}", file=sys.stderr)
        if result.newer_actions is not None:
            print(f"tucdesk-audit: {visible(result.summary(trust.names))}", file=sys.stderr)
            print(f"tucdesk-audit: {visible(result.newer_actions.describe())}", file=sys.stderr)
    return result.exit_code


def _verify(arguments: argparse.Namespace) -> int:
    trust = _load_trust(arguments)
    if isinstance(trust, str):
        return _unreadable(arguments, trust)
    names = trust.names
    kept: Checkpoint | None = None
    if arguments.save_checkpoint is not None:
        # Read now only to learn which prefix root to keep (unverified: the keys that may have
        # signed it are known once the bundle's rotations are); whether FILE can take the
        # checkpoint is decided after the bundle's verdict (exit 4 means it verified).
        kept = _claimed_kept_checkpoint(arguments.save_checkpoint)
    with _verify_progress(arguments) as progress:
        result = verify_bundle(
            _bundle_source(arguments.bundle),
            trust.keys,
            previous_checkpoints=trust.previous,
            progress=progress,
            keep_prefix_sizes=() if kept is None else (kept.size,),
            agent_pins=trust.agent_pins,
        )
    if result.verified and arguments.save_checkpoint is not None:
        # The pinned keys and the audit keys the bundle's rotations introduced from them: after
        # a rotation, FILE keeps a checkpoint the new key signed.
        return _save_checkpoint(arguments, result, result.trusted_audit_keys(), names)
    _report(arguments, result, names)
    return result.exit_code


def _claimed_kept_checkpoint(path: Path) -> Checkpoint | None:
    """What the checkpoint ``path`` keeps says (not yet checked who signed it), or None."""
    try:
        return read_checkpoint_note(read_small_file(path, MAX_CHECKPOINT_FILE_BYTES + 1))
    except (OSError, AuditError):
        return None


def _kept_checkpoint(path: Path, keys: Sequence[PublicIdentity]) -> Checkpoint | None | str:
    """The checkpoint ``path`` already keeps (None if there is no file yet), or why it must not
    be overwritten."""
    try:
        note = read_small_file(path, MAX_CHECKPOINT_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as error:
        return f"{path}: cannot read the checkpoint kept there ({error.strerror})"
    if not note:
        return None  # an empty file (e.g. from mktemp) keeps nothing
    try:
        checkpoint, _ = open_checkpoint(note, keys)
    except AuditError as error:
        return (
            f"{path} holds no checkpoint signed by a pinned key (or one the bundle's rotations "
            f"introduce) ({error}); it was left unchanged: give another --save-checkpoint file"
        )
    return checkpoint


def _save_checkpoint(
    arguments: argparse.Namespace,
    result: VerificationResult,
    keys: Sequence[PublicIdentity],
    names: KeyNames,
) -> int:
    """Keep the verified bundle's checkpoint in FILE, unless that would move FILE backwards,
    across logs, or over history this bundle contradicts. Runs sharing FILE take turns (an
    exclusive lock on FILE.lock) and FILE is read again under the lock, so two runs finishing
    together never move it backwards."""
    path: Path = arguments.save_checkpoint
    checkpoint, note = result.checkpoint, result.checkpoint_note
    assert checkpoint is not None and note is not None
    destination = Path(os.path.realpath(path))  # through a symlink, as writing in place would
    try:
        lock = _lock_file(destination)
    except OSError as error:
        return _checkpoint_not_saved(
            arguments, result, names,
            f"{path}: cannot lock {destination.name}{LOCK_SUFFIX} ({error.strerror}); it was "
            "left unchanged",
        )  # fmt: skip
    with lock:
        kept = _kept_checkpoint(path, keys)
        refusal = _refusal(path, checkpoint, kept, result)
        if refusal is not None:
            if refusal[0]:  # the bundle contradicts the history FILE keeps
                conflict = dataclasses.replace(
                    result, verdict=Verdict.INVALID, reason=refusal[1], checkpoint_note=None
                )
                _report(arguments, conflict, names)
                return conflict.exit_code
            return _checkpoint_not_saved(arguments, result, names, refusal[1])
        try:
            _replace_file(destination, note, lambda: _kept_checkpoint(path, keys) == kept)
        except _ChangedMeanwhile:
            return _checkpoint_not_saved(
                arguments, result, names,
                f"{path} was changed by something else while the checkpoint was being "
                "saved; it was left as that left it: run again",
            )  # fmt: skip
        except OSError as error:
            return _unreadable(arguments, f"{path}: cannot write ({error.strerror})")
    _report(arguments, result, names)
    return result.exit_code


def _refusal(
    path: Path,
    checkpoint: Checkpoint,
    kept: Checkpoint | None | str,
    result: VerificationResult,
) -> tuple[bool, str] | None:
    """Why ``checkpoint`` must not replace ``kept`` (True: the bundle contradicts it), or None."""
    if isinstance(kept, str):
        return False, kept
    if kept is None:
        return None
    if kept.origin != checkpoint.origin:
        return False, (
            f"{path} keeps the checkpoint of another log ({kept.origin}), not "
            f"{checkpoint.origin}; it was left unchanged: give another file"
        )
    if kept.size > checkpoint.size:
        return False, (
            f"{path} keeps a checkpoint of {kept.size} records and this bundle has only "
            f"{checkpoint.size}: a kept checkpoint never moves backwards, so it was left "
            "unchanged (an older export verifies, but is not the latest)"
        )
    root = result.prefix_roots.get(kept.size)
    if root is None:  # another run saved it while this one verified: no root was kept for it
        if kept.size == checkpoint.size:
            root = checkpoint.root_hash
        else:
            return False, (
                f"{path} was changed by another run while this one verified (it now keeps "
                f"{kept.size} records); it was left unchanged: run again"
            )
    if root != kept.root_hash:
        return True, (
            f"the first {kept.size} records differ from the checkpoint kept in {path} "
            f"(history was rewritten); {path} was left unchanged"
        )
    return None


class _ChangedMeanwhile(Exception):
    """FILE changed between the read under the lock and the rename (a writer that does not
    take the lock)."""


LOCK_SUFFIX = ".lock"


@contextmanager
def _locked(fd: int) -> Iterator[None]:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _lock_file(destination: Path) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock on ``destination``'s FILE.lock (created 0600, never through a symlink,
    kept afterwards: removing it would let two runs lock two different files)."""
    lock_path = destination.with_name(destination.name + LOCK_SUFFIX)
    fd = os.open(
        lock_path,
        os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY,
        0o600,
    )
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return _locked(fd)


def _replace_file(destination: Path, data: bytes, unchanged: Callable[[], bool]) -> None:
    """Write ``data`` to ``destination`` whole or not at all (a crash never leaves half a
    checkpoint), if ``unchanged()`` still holds just before the rename (else _ChangedMeanwhile).
    The new file is 0600, or the old file's mode if that was stricter; the directory is synced
    after the rename so the new checkpoint survives a crash."""
    try:
        mode = stat.S_IMODE(os.stat(destination).st_mode) & 0o600
    except FileNotFoundError:
        mode = 0o600
    fd, name = tempfile.mkstemp(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".partial"
    )
    temporary = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if not unchanged():
            raise _ChangedMeanwhile
        os.replace(temporary, destination)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(destination.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _checkpoint_not_saved(
    arguments: argparse.Namespace,
    result: VerificationResult | None,
    names: KeyNames,
    reason: str,
) -> int:
    if arguments.json:
        value = {} if result is None else result.to_json(names)
        value.update(code="checkpoint_not_saved", checkpoint_not_saved=reason)
        print(json.dumps(value, indent=2, sort_keys=True))
    else:
        if result is not None:
            _print_summary(result, names)
        print(f"tucdesk-audit: not saving the checkpoint: {reason}", file=sys.stderr)
    return EXIT_CHECKPOINT_NOT_SAVED


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
        self._name = "stdin" if str(bundle) == STDIN_NAME else bundle.name
        try:
            self._size = 0 if str(bundle) == STDIN_NAME else os.stat(bundle).st_size
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
    _report(arguments, VerificationResult(Verdict.UNREADABLE, reason), {})
    return EXIT_UNREADABLE


def _report(arguments: argparse.Namespace, result: VerificationResult, names: KeyNames) -> None:
    if arguments.json:
        print(json.dumps(result.to_json(names), indent=2, sort_keys=True))
    elif result.verdict is Verdict.UNREADABLE:
        print(f"tucdesk-audit: {visible(result.summary(names))}", file=sys.stderr)
    else:
        _print_summary(result, names)


def _print_summary(result: VerificationResult, names: KeyNames) -> None:
    """The one-line verdict, then (for OK) what it did not prove, one line each."""
    # Escaped: the line names agents by the name a record gives, and whoever held the
    # audit key chose that text.
    print(visible(result.summary(names)))
    for caveat in result.not_checked():
        print(caveat)


if __name__ == "__main__":
    sys.exit(main())
