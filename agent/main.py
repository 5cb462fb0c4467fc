"""Entry point for `tucdesk-agent`: the agent daemon (enroll, run, status)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import gc
import logging
import os
import signal
import sys
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

from agent.audit_events import SessionAuditor
from agent.config import (
    CONFIG_ENVIRONMENT,
    ENVIRONMENT_PREFIX,
    SETTING_HELP,
    SYSTEM_STATE_DIR,
    AgentConfig,
    check_session_user,
    config_file_to_read,
    load_config,
)
from agent.control_client import ControlClient, ReconnectBackoff
from agent.daemon_lock import acquire_daemon_lock, lock_file_path
from agent.enrollment import (
    SAVED_CA_FILE_NAME,
    EnrollmentRequest,
    enroll,
    grant_signing_keys,
    parse_service_keys,
    prepare_state_dir,
    read_ca_certificates,
    saved_ca_path,
)
from agent.errors import AgentError, ConfigError, EnrollmentError
from agent.event_spool import SPOOL_DIR_NAME, EventSpool
from agent.grant_policy import GrantPolicy
from agent.login_records import (
    LoginRecordFiles,
    end_stale_logins_in_background,
    use_audit_login_uid,
    wait_for_login_records,
)
from agent.machine_identity import (
    MachineIdentifiers,
    MachineIdentityError,
    read_machine_identifiers,
)
from agent.policy_cache import PolicyCache, policy_file_path
from agent.process_group import SessionProcessError
from agent.recording import (
    RECORDING_SUFFIX,
    RecordingState,
    list_recordings,
    play,
    prepare_recordings_dir,
    recording_file_name,
)
from agent.recording_retention import (
    RecordingRetention,
    RetentionLimits,
    age_in_days,
    describe_limits,
    prune_recordings,
)
from agent.server_address import tls_context
from agent.session_host import SessionHost, SessionIdentity
from agent.state_file import (
    AgentState,
    StateFileError,
    StateFileUnavailable,
    load_state,
    save_state,
)
from agent.status import DaemonStatus, read_status, write_status
from protocol.errors import ProtocolError
from protocol.exception_chain import leaf_exceptions
from protocol.identity import write_private_file
from protocol.policy import PinnedPolicyTrust
from protocol.stdio_fds import open_dev_null_on_closed_standard_fds
from protocol.version import installed_version

REGISTRATION_KEY_ENVIRONMENT = "TUCDESK_REGISTRATION_KEY"
MAX_REGISTRATION_KEY_FILE_SIZE = 4096
PROGRAM = "tucdesk-agent"
# LSB init-script status codes (`status`); 150..199 are reserved for applications.
STATUS_RUNNING = 0
STATUS_NOT_RUNNING = 3
STATUS_DISCONNECTED = 150
# sysexits.h EX_CONFIG: `run` refused to start because of its configuration or state; the
# systemd unit does not restart on it (RestartPreventExitStatus), since a restart cannot help.
EXIT_CONFIG = 78
# Why files cannot be created in the state dir, for good (a restart would meet it again).
STATE_DIR_NOT_WRITABLE = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
# Login shells that refuse to run anything: every shell session (and exec command line) fails.
REFUSING_SHELLS = frozenset({"nologin", "false"})
# The pid a daemon writes into its lock file is a few digits.
MAX_LOCK_PID_BYTES = 64
# How long a stopping daemon waits for its sessions' logout records (a lock held on utmp costs
# login_records.LOCK_WAIT_SECONDS per file; systemd's TimeoutStopSec is 20 s).
LOGIN_RECORDS_EXIT_WAIT_SECONDS = 12.0
# A status written in the same second as the lock was taken still counts as this daemon's.
STATUS_CLOCK_SLACK_SECONDS = 1.0
# Allocations between young-generation collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 20_000
logger = logging.getLogger("tucdesk.agent")

_CONFIG_HELP = (
    "Settings come from flags, then TUCDESK_AGENT_<SETTING> environment variables, then the "
    f"TOML file given by --config or {CONFIG_ENVIRONMENT} (as root with neither: "
    "/etc/tucdesk/agent.toml if it exists), then the defaults listed below."
)
HELP_WIDTH = 78


def settings_help() -> str:
    """Every AgentConfig setting with its TOML key, environment variable and default, read off
    the config object so the list cannot drift from what the agent reads."""
    lines = ["settings (TOML key, environment variable):"]
    for item in dataclasses.fields(AgentConfig):
        lines.append(f"  {item.name}, {ENVIRONMENT_PREFIX}{item.name.upper()}")
        text = SETTING_HELP[item.name]
        if item.default is not None and item.default is not dataclasses.MISSING:
            shown: object = item.default
            if isinstance(shown, bool):
                shown = str(shown).lower()
            elif isinstance(shown, float):
                shown = f"{shown:g}"
            text += f"; default {shown}"
        lines.extend(textwrap.wrap(text, HELP_WIDTH, initial_indent="      ",
                                   subsequent_indent="      "))
    return "\n".join(lines) + "\n"


class _ParserWithSettings(argparse.ArgumentParser):
    """A parser whose --help ends with the settings list, laid out as written (argparse would
    re-wrap it into one paragraph); its subcommands' parsers are of this class too."""

    def format_help(self) -> str:
        return f"{super().format_help()}\n{settings_help()}"


def pinned_service_keys(state: AgentState) -> list[str]:
    """The service keys this agent pinned at enrollment, one ``purpose: SHA256:… kid=…`` line
    each, as `tucdesk-rendezvous keys show` prints the rendezvous's own (fingerprints computed
    here from the pinned keys, not taken from what the server said they were)."""
    lines = []
    try:
        pinned = parse_service_keys(state.service_keys)
    except EnrollmentError as error:
        return [f"(none readable: {error}; enroll again)"]
    for purpose, keys in pinned.items():
        for kid, key in keys.items():
            lines.append(f"{purpose}: {key.fingerprint} kid={kid}")
    return lines
_STATUS_HELP = (
    f"Exit status (LSB): {STATUS_RUNNING} the daemon is running and connected; "
    f"{STATUS_DISCONNECTED} it is running but not connected to the rendezvous (or its "
    "status file is stale, so whether it is connected is unknown); "
    f"{STATUS_NOT_RUNNING} it is not running (or this host is not enrolled); 1 an error."
)
_USER_ERRORS = (
    AgentError, StateFileError, MachineIdentityError, SessionProcessError, ProtocolError,
)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser: every subcommand and flag, documented for --help."""
    parser = _ParserWithSettings(
        prog=PROGRAM,
        description=(
            "TucDesk agent daemon: enroll this host with a rendezvous, hold its control "
            "channel, and run the end-to-end encrypted shell and exec sessions operators open."
        ),
        epilog=_CONFIG_HELP,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {installed_version()}")
    parser.add_argument("--config", type=Path, help="TOML config file (or an [agent] table)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    enroll_parser = commands.add_parser(
        "enroll",
        help="register this host with a rendezvous using a registration key",
        description=(
            "Generate this agent's identity, register it with a one-time registration key, "
            "pin the rendezvous's service keys, and seal the state to this machine. The "
            f"registration key can also come from ${REGISTRATION_KEY_ENVIRONMENT} or a file, "
            "so it never lands in the shell history."
        ),
        epilog=_CONFIG_HELP,
    )
    enroll_parser.add_argument("--server", required=True, help="rendezvous URL, https://HOST:PORT")
    key_source = enroll_parser.add_mutually_exclusive_group()
    key_source.add_argument("--registration-key", help="the registration key (rk_live_...)")
    key_source.add_argument(
        "--registration-key-file", type=Path, help="read the registration key from this file"
    )
    enroll_parser.add_argument("--name", help="name to register (default: this host's name)")
    enroll_parser.add_argument(
        "--ca-file",
        type=Path,
        help="CA certificate(s) (PEM) to trust for the rendezvous's TLS; a copy is saved as "
        f"STATE_DIR/{SAVED_CA_FILE_NAME}, which run uses (and reads again at every "
        "connection attempt: append a new CA to it to roll the rendezvous's CA)",
    )
    enroll_parser.add_argument(
        "--force",
        action="store_true",
        help="replace an existing enrollment on this host; without --ca-file (or a ca_file "
        "setting) it trusts the CA copy the last enrollment saved, "
        f"STATE_DIR/{SAVED_CA_FILE_NAME}, when there is one and that enrollment was with the "
        "same server (scheme, host and port)",
    )
    _add_common(enroll_parser)
    enroll_parser.set_defaults(handler=_enroll)

    run_parser = commands.add_parser(
        "run",
        help="run the daemon: hold the control channel and serve sessions",
        description=(
            "Connect to the rendezvous (reconnecting with backoff), take session offers, and "
            "run each session through the relay. Stops cleanly on SIGTERM or SIGINT; SIGHUP "
            "is logged and ignored (settings are read at start: restart to apply them). One "
            "daemon per state dir. Exits 78 when it cannot start because of its configuration "
            "or state (the systemd unit does not restart on that), 1 on other errors."
        ),
        epilog=_CONFIG_HELP,
    )
    _add_common(run_parser)
    run_parser.add_argument("--shell", help="shell for shell sessions (default: the user's)")
    run_parser.add_argument("--user", help="local account sessions run as (default: the agent's)")
    run_parser.add_argument(
        "--ca-file",
        type=Path,
        help=f"override the CA file saved at enrollment (STATE_DIR/{SAVED_CA_FILE_NAME}); "
        "read again at every connection attempt",
    )
    run_parser.add_argument(
        "--max-sessions", type=int, help="most sessions at once (default: 64)"
    )
    run_parser.add_argument(
        "--record-sessions",
        action="store_true",
        default=None,
        help="record what each session outputs (asciicast v2; never what is typed) and bind "
        "each recording's SHA-256 into the session.ended audit event (default: off)",
    )
    _add_recordings_dir(run_parser)
    run_parser.add_argument(
        "--max-recording-bytes",
        type=int,
        help="a recording stops, with a marker, at this size; the session goes on "
        "(default: 67108864, 64 MiB)",
    )
    _add_retention_limits(run_parser)
    run_parser.set_defaults(handler=_run)

    recordings_parser = commands.add_parser(
        "recordings",
        help="list, replay or prune this host's session recordings",
        description=(
            "Session recordings are asciicast v2 files, one per session, also playable with "
            "asciinema. To check one against the signed audit log, use "
            "'tucdesk-audit recording FILE --export BUNDLE --key KEYFILE'. With "
            "recordings_max_age_days or recordings_max_total_bytes set, the daemon deletes "
            "finished recordings beyond them, oldest first (at start, after each session, and "
            "every 10 minutes); the audit log keeps their hashes, not their content."
        ),
        epilog=_CONFIG_HELP,
    )
    recordings_commands = recordings_parser.add_subparsers(
        dest="recordings_command", required=True, metavar="ACTION"
    )
    list_parser = recordings_commands.add_parser(
        "list", help="list recordings: session id, start time, size, truncated"
    )
    _add_common(list_parser)
    _add_recordings_dir(list_parser)
    list_parser.set_defaults(handler=_recordings_list)
    play_parser = recordings_commands.add_parser(
        "play", help="replay a recording on this terminal with its timing"
    )
    play_parser.add_argument(
        "file", type=Path, metavar="FILE",
        help="a .cast recording, or a session id (its recording in the recordings directory)",
    )  # fmt: skip
    play_parser.add_argument(
        "--speed", type=float, default=1.0, help="play this many times faster (default: 1)"
    )
    play_parser.add_argument(
        "--max-idle", type=float, help="cap every pause at this many seconds"
    )
    _add_common(play_parser)
    _add_recordings_dir(play_parser)
    play_parser.set_defaults(handler=_recordings_play)
    prune_parser = recordings_commands.add_parser(
        "prune",
        help="delete finished recordings beyond the retention limits, oldest first",
        description=(
            "Delete finished recordings, oldest (by last write) first, until none is older "
            "than recordings_max_age_days and all together hold at most "
            "recordings_max_total_bytes. Recordings being written are never deleted, nor is "
            "anything in the directory but <session id>.cast files."
        ),
        epilog=_CONFIG_HELP,
    )
    prune_parser.add_argument(
        "--dry-run", action="store_true", help="print what would be deleted; delete nothing"
    )
    _add_retention_limits(prune_parser, short_names=True)
    _add_common(prune_parser)
    _add_recordings_dir(prune_parser)
    prune_parser.set_defaults(handler=_recordings_prune)

    status_parser = commands.add_parser(
        "status",
        help="show whether this host is enrolled and whether the daemon is connected",
        description=_STATUS_HELP,
        epilog=_CONFIG_HELP,
    )
    _add_common(status_parser)
    status_parser.set_defaults(handler=_status)

    check_parser = commands.add_parser(
        "check",
        help="validate the configuration and state, print what run would use (like sshd -t)",
        description=(
            "Check everything run needs without connecting: the settings, the sealed state, "
            "the CA file, the session user and shell, the recordings directory. Prints what "
            "it would use; exits 0 when all is usable, else 1."
        ),
        epilog=_CONFIG_HELP,
    )
    _add_common(check_parser)
    check_parser.add_argument("--shell", help="shell for shell sessions")
    check_parser.add_argument("--user", help="local account sessions run as")
    check_parser.add_argument("--ca-file", type=Path, help="override the saved CA file")
    check_parser.set_defaults(handler=_check)
    return parser



def _add_common(parser: argparse.ArgumentParser) -> None:
    # Also accepted after the subcommand; SUPPRESS keeps the top-level value when absent here.
    parser.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    parser.add_argument(
        "--config", type=Path, default=argparse.SUPPRESS, help="TOML config file"
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        help="where the sealed state lives (default: /var/lib/tucdesk-agent as root, else "
        "$XDG_STATE_HOME/tucdesk-agent)",
    )
    parser.add_argument(
        "--machine-root",
        type=Path,
        help="read machine identifiers under this directory instead of / (for tests)",
    )


def _add_recordings_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recordings-dir",
        type=Path,
        help="where session recordings go (default: STATE_DIR/recordings, created 0700)",
    )


def _add_retention_limits(parser: argparse.ArgumentParser, short_names: bool = False) -> None:
    """The two retention limits, named as their settings; ``prune`` also takes shorter names."""
    parser.add_argument(
        *(["--max-age-days"] if short_names else []), "--recordings-max-age-days",
        dest="recordings_max_age_days",
        type=float,
        metavar="DAYS",
        help="override recordings_max_age_days: delete finished recordings older than this",
    )
    parser.add_argument(
        *(["--max-total-bytes"] if short_names else []), "--recordings-max-total-bytes",
        dest="recordings_max_total_bytes",
        type=int,
        metavar="BYTES",
        help="override recordings_max_total_bytes: keep at most this many bytes of finished "
        "recordings, deleting the oldest first",
    )


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one subcommand; print one line and return non-zero on failure."""
    open_dev_null_on_closed_standard_fds()  # before any socket can take fd 0-2
    args = build_parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.debug:
        # httpx logs every request at INFO ("HTTP Request: POST ..."): noise in enroll's output.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        logging.getLogger("httpcore").setLevel(logging.WARNING)
    failure_code = EXIT_CONFIG if args.handler is _run else 1
    try:
        config = config_from_arguments(args, environ)
        result: int = args.handler(args, config, environ)
        return result
    except _USER_ERRORS as error:
        if args.debug:
            raise
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return failure_code if _is_lasting(error) else 1
    except (OSError, OverflowError) as error:
        # An unreadable state dir, a state file that is a directory, ...: one line, not a
        # traceback.
        if args.debug:
            raise
        print(f"{PROGRAM}: {_describe_os_error(error)}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # An error raised inside the daemon's nursery arrives wrapped in a group.
        errors = leaf_exceptions(group)
        if args.debug or not all(isinstance(error, _USER_ERRORS) for error in errors):
            raise
        print(f"{PROGRAM}: {errors[0]}", file=sys.stderr)
        return failure_code if _is_lasting(errors[0]) else 1
    except KeyboardInterrupt:
        return 130


def _is_lasting(error: BaseException) -> bool:
    """Whether ``error`` will recur on a restart (settings or state), so ``run`` exits 78 and
    systemd does not restart it; a transient failure exits 1 and is retried."""
    lasting = isinstance(error, ConfigError | StateFileError)
    return lasting and not isinstance(error, StateFileUnavailable)


def _describe_os_error(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if isinstance(error.filename, str | Path) else ""
        return f"{where}{error.strerror}"
    return str(error) or type(error).__name__


def config_from_arguments(args: argparse.Namespace, environ: Mapping[str, str]) -> AgentConfig:
    """The settings for a parsed command line: its flags, then the environment, then --config."""
    flags: dict[str, Any] = {
        name: getattr(args, name, None)
        for name in (
            "state_dir", "machine_root", "shell", "user", "ca_file", "max_sessions",
            "record_sessions", "recordings_dir", "max_recording_bytes",
            "recordings_max_age_days", "recordings_max_total_bytes",
        )
    }
    return load_config(flags, environ, getattr(args, "config", None))


def _registration_key(args: argparse.Namespace, environ: Mapping[str, str]) -> str:
    if args.registration_key:
        return str(args.registration_key)
    if args.registration_key_file is not None:
        path: Path = args.registration_key_file
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_REGISTRATION_KEY_FILE_SIZE + 1)
        except OSError as error:
            reason = error.strerror
            raise ConfigError(f"{path}: cannot read the registration key ({reason})") from None
        if len(data) > MAX_REGISTRATION_KEY_FILE_SIZE:
            raise ConfigError(f"{path}: too large to hold a registration key")
        return data.decode("utf-8", errors="replace").strip()
    key = environ.get(REGISTRATION_KEY_ENVIRONMENT)
    if key:
        return key
    raise ConfigError(
        "no registration key: pass --registration-key-file FILE, set "
        f"{REGISTRATION_KEY_ENVIRONMENT}, or pass --registration-key"
    )


def _enroll(args: argparse.Namespace, config: AgentConfig, environ: Mapping[str, str]) -> int:
    identifiers = read_machine_identifiers(config.machine_root)
    request = EnrollmentRequest(
        server_url=args.server,
        registration_key=_registration_key(args, environ),
        state_file=config.state_file,
        name=args.name,
        ca_file=args.ca_file or config.ca_file,
        force=args.force,
    )
    prepare_state_dir(config.state_file)
    # A running daemon would write its old identity back over the new state: refuse.
    with acquire_daemon_lock(
        config.state_dir, "stop the daemon first (systemctl stop tucdesk-agent), then enroll"
    ):
        previous = _previous_enrollment(config, identifiers) if args.force else None
        state = trio.run(partial(enroll, request, identifiers, warn=_warn_enrollment))
    identity = state.identity()
    if previous is not None:
        print(
            f"The old registration {previous} stays listed, and its old state file could still "
            f"connect, until an admin removes it: tucdesk agents remove "
            f"{previous.split()[0] if previous.startswith('agt_') else 'OLD_NAME_OR_ID'}"
        )
    print(f"Enrolled agent {state.agent_id} ({state.name}) in team {state.team_id}.")
    print(f"Agent key fingerprint: {identity.public.fingerprint}")
    print(f"Machine fingerprint:   {identifiers.fingerprint()}")
    print(f"State sealed to this machine in {config.state_file}")
    print(f"Start the daemon with: {PROGRAM} run" + _state_dir_flag(args))
    return 0


def _previous_enrollment(config: AgentConfig, identifiers: MachineIdentifiers) -> str | None:
    """"AGENT_ID (NAME)" of the enrollment about to be replaced, if it can be read."""
    if not config.state_file.exists():
        return None
    try:
        old = load_state(config.state_file, identifiers)
    except StateFileError:
        return "(the one in the old state file)"
    return f"{old.agent_id} ({old.name})"


def _warn_enrollment(warning: str) -> None:
    print(f"{PROGRAM}: warning: {warning}", file=sys.stderr)


def _state_dir_flag(args: argparse.Namespace) -> str:
    return f" --state-dir {args.state_dir}" if args.state_dir else ""


def _run(args: argparse.Namespace, config: AgentConfig, environ: Mapping[str, str]) -> int:
    identifiers = read_machine_identifiers(config.machine_root)
    if not config.state_dir.is_dir():
        load_state(config.state_file, identifiers)  # says "enroll first"
    check_state_dir_writable(config.state_dir)
    with acquire_daemon_lock(config.state_dir):
        state = load_state(config.state_file, identifiers)
        state = adopt_enrollment_ca(config, state, identifiers)
        _check_run_settings(config, state)
        use_audit_login_uid(config.audit_login_uid)
        settle_garbage_collector()
        trio.run(run_daemon, config, state, identifiers)
    return 0


def check_state_dir_writable(state_dir: Path) -> None:
    """ConfigError (run exits 78: a restart cannot help) when files cannot be created in the
    state dir because it is read-only or not this user's to write; other failures (a full
    disk) are left to the steps that meet them."""
    probe = state_dir / f".write-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError as error:
        if error.errno in STATE_DIR_NOT_WRITABLE:
            raise ConfigError(
                f"{state_dir}: the state directory is not writable ({error.strerror}); the "
                "daemon keeps its lock, status and audit spool there: make it writable (a "
                "read-only mount? ReadWritePaths= in the systemd unit? its owner?)"
            ) from None
        return
    os.close(fd)
    probe.unlink(missing_ok=True)


def adopt_enrollment_ca(
    config: AgentConfig, state: AgentState, identifiers: MachineIdentifiers
) -> AgentState:
    """An agent enrolled by a release that did not copy the CA trusts the file at the path
    given then, and goes offline when that file moves. Copy it into the state dir as enrollment
    now does and record the copy in the state; the state as it is when that cannot be done
    (the original is gone: ``_check_run_settings`` then says so) or is not needed."""
    if config.ca_file is not None or state.ca_file is None:
        return state
    saved = saved_ca_path(config.state_file).resolve()
    if Path(state.ca_file) == saved or not Path(state.ca_file).exists():
        return state  # nothing to do, or nothing to copy (run's CA check names the file)
    try:
        certificates = read_ca_certificates(Path(state.ca_file))
        write_private_file(saved, certificates)
        adopted = replace(state, ca_file=str(saved))
        save_state(config.state_file, adopted, identifiers)
    except (EnrollmentError, OSError, ProtocolError, StateFileError) as error:
        logger.warning("could not copy the CA file %s into the state dir (%s); still trusting "
                       "it where it is", state.ca_file, error)  # fmt: skip
        return state
    logger.info("copied the CA file given at enrollment, %s, to %s (as enrollment now does): "
                "the agent trusts the copy from now on", state.ca_file, saved)  # fmt: skip
    return adopted


def _check_run_settings(config: AgentConfig, state: AgentState) -> None:
    """Fail at start, not at the first session or connection, on an unusable setting."""
    check_session_user(config)
    if config.shell is not None and not os.access(config.shell, os.X_OK):
        raise ConfigError(f"shell {config.shell}: not an executable file")
    ca_file = config.ca_file if config.ca_file is not None else state.ca_file
    if state.server_url.startswith("https:"):
        tls_context(ca_file)
    if config.record_sessions:
        try:
            prepare_recordings_dir(config.recordings_path)
        except OSError as error:
            raise ConfigError(
                f"{config.recordings_path}: cannot use it for recordings ({error.strerror})"
            ) from None
        logger.info("recording sessions to %s", config.recordings_path)


def settle_garbage_collector() -> None:
    """Keep collector pauses off the session data path of this long-running daemon.

    Everything built at start-up lives as long as the daemon, so it is frozen out of every
    later collection (a full collection then walks only what sessions allocate), and young
    collections run less often: a keystroke echo should not wait for one.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def load_policy_cache(
    config: AgentConfig,
    state: AgentState,
    identifiers: MachineIdentifiers,
    current: list[AgentState] | None = None,
) -> PolicyCache:
    """The agent's cached policy; accepted bundles update the pins in the sealed state file.

    ``current`` (one state), when given, is shared with the other writer of the state file
    (followed service keys), so neither writes back what the other changed.
    """
    current = current if current is not None else [state]

    def save_trust(trust: PinnedPolicyTrust) -> None:
        updated = replace(current[0], policy_trust=trust.to_json())
        save_state(config.state_file, updated, identifiers)
        current[0] = updated

    return PolicyCache.load(policy_file_path(config.state_dir), state.policy_trust, save_trust)


async def run_daemon(
    config: AgentConfig, state: AgentState, identifiers: MachineIdentifiers
) -> None:
    """Hold the control channel and serve sessions until SIGTERM/SIGINT or cancellation."""
    identity = state.identity()
    who = SessionIdentity(state.agent_id, state.team_id, grant_signing_keys(state))
    sealed = [state]  # the state file as last written, shared by both of its writers
    policy_cache = load_policy_cache(config, state, identifiers, sealed)

    def save_service_keys(service_keys: dict[str, Any]) -> None:
        updated = replace(sealed[0], service_keys=service_keys)
        save_state(config.state_file, updated, identifiers)
        sealed[0] = updated
    policy = GrantPolicy(policy_cache, state.agent_id, state.team_id, state.name)
    auditor = SessionAuditor(identity, state.agent_id, state.team_id, state.name)
    logger.info(
        "%s %s: agent %s (%s) starting; key %s; server %s; policy version %d",
        PROGRAM, installed_version(), state.agent_id, state.name, identity.public.fingerprint,
        state.server_url, policy_cache.version,
    )
    # Logins a killed daemon left in utmp are ended before any session's own are written.
    end_stale_logins_in_background(LoginRecordFiles(config.utmp_file, config.wtmp_file))
    try:
        async with trio.open_nursery() as nursery:
            client_box: list[ControlClient] = []
            host = SessionHost(
                config,
                identity,
                who,
                auditor,
                send_control=lambda message: client_box[0].send_message(message),
                audit_sink=lambda event: client_box[0].send_audit_event(event),
                issuer=lambda: client_box[0].issuer,
                policy=policy,
            )
            client = ControlClient(
                state,
                identifiers.fingerprint(),
                host.offer_handler(nursery),
                ca_file=config.ca_file,
                status_file=config.status_file,
                connection_file=config.connection_file,
                backoff=ReconnectBackoff(cap=config.reconnect_cap_seconds),
                on_policy_bundle=policy_cache.answer_bundle_message,
                event_spool=EventSpool(config.state_dir / SPOOL_DIR_NAME),
                live_sessions=host.live_session_ids,
                sessions_ended=host.wait_all_ended,
                on_service_keys_changed=save_service_keys,
            )
            client_box.append(client)
            nursery.start_soon(_stop_on_signals, nursery.cancel_scope)
            # Before retention may delete one: recordings a killed agent left are marked.
            await host.recover_interrupted_recordings()
            limits = RetentionLimits.from_config(config)
            if limits.is_set:
                retention = RecordingRetention(
                    config.recordings_path, limits, config.max_recording_bytes
                )
                nursery.start_soon(retention.run)
            nursery.start_soon(client.run)
    finally:
        # The sessions' logouts are written in the background: before exiting, let them be.
        with trio.move_on_after(LOGIN_RECORDS_EXIT_WAIT_SECONDS, shield=True):
            await wait_for_login_records()
        try:
            write_status(
                config.status_file,
                DaemonStatus(os.getpid(), state.server_url, False, time.time(), None, "stopped"),
            )
        except Exception:  # noqa: BLE001 - informational only
            logger.debug("could not write the final status", exc_info=True)
        logger.info("agent stopped")


async def _stop_on_signals(scope: trio.CancelScope) -> None:
    # SIGHUP: sshd re-reads its configuration; this daemon's settings and sessions are fixed at
    # start, and dying on it (the default) orphans every session, so it is logged and ignored.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for received in signals:
            if received == signal.SIGHUP:
                logger.warning(
                    "received SIGHUP; reloading is not supported, ignoring it (restart the "
                    "daemon to apply changed settings)"
                )
                continue
            logger.info("received %s; stopping", signal.Signals(received).name)
            scope.cancel()
            return


def _status(args: argparse.Namespace, config: AgentConfig, environ: Mapping[str, str]) -> int:
    if not config.state_file.exists():
        print(f"Enrolled:     no (no state in {config.state_dir})")
        if args.state_dir is None and os.geteuid() != 0:
            print(
                f"              (the default state dir for this user; the system daemon's is "
                f"{SYSTEM_STATE_DIR}: run as root or pass --state-dir)"
            )
        print(f"Enroll with:  {PROGRAM} enroll --server URL --registration-key-file FILE")
        return STATUS_NOT_RUNNING
    identifiers = read_machine_identifiers(config.machine_root)
    state = load_state(config.state_file, identifiers)
    print("Enrolled:     yes")
    print(f"Agent id:     {state.agent_id}")
    print(f"Name:         {state.name}")
    print(f"Team:         {state.team_id}")
    print(f"Key:          {state.identity().public.fingerprint}")
    print(f"Server:       {state.server_url}")
    print(f"Policy:       {_policy_summary(state)}")
    print(
        "Service keys: pinned at enrollment or followed since through signed rotations; "
        "compare with tucdesk-rendezvous keys show"
    )
    for line in pinned_service_keys(state):
        print(f"  {line}")
    print(f"CA file:      {describe_ca_file(config, state)}")
    status = read_status(config.status_file)
    lock = read_daemon_lock(config.state_dir)
    if lock.held is True:
        # The lock decides: a daemon holds it, whatever the status file says (it may be one
        # the daemon cannot write: a full or read-only disk).
        stale = _stale_status(status, lock)
        if stale is not None:
            print(f"Daemon:       running{f' (pid {lock.pid})' if lock.pid else ''}")
            print(f"Details:      stale: {stale}")
            print("Connected:    unknown")
            return STATUS_DISCONNECTED
    if (
        status is None
        or lock.held is False
        or status.last_error == "stopped"
        or (lock.held is None and not status.is_running())
    ):
        print("Daemon:       not running")
        print("Connected:    no")
        return STATUS_NOT_RUNNING
    print(f"Daemon:       running (pid {status.pid})")
    print(f"Connected:    {'yes' if status.connected else 'no'}")
    if status.last_connected_at is not None:
        print(f"Last connect: {_show_time(status.last_connected_at)}")
    if not status.connected and status.last_error:
        print(f"Last error:   {status.last_error}")
    for line in status.problem_lines():
        print(line)
    return STATUS_RUNNING if status.connected else STATUS_DISCONNECTED


@dataclasses.dataclass(frozen=True)
class DaemonLockView:
    """What the state dir's lock (agent/daemon_lock.py) says, read without taking it."""

    held: bool | None
    """True: a daemon holds it; False: none does; None: it cannot be checked."""
    pid: int | None = None
    """The holder's pid, as it wrote it into the lock file."""
    since: float | None = None
    """When the holder took it (the lock file's last write)."""


def read_daemon_lock(state_dir: Path) -> DaemonLockView:
    """Whether a daemon holds this state dir's lock, and which: a daemon that holds it runs,
    and none runs when it is free, whatever a status file says (a killed daemon's pid may
    belong to another process now; a running one may be unable to write the file)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(lock_file_path(state_dir), flags)
    except FileNotFoundError:
        return DaemonLockView(False)  # every daemon creates it before anything else
    except OSError:
        return DaemonLockView(None)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, MAX_LOCK_PID_BYTES, 0).decode("ascii", "replace").strip()
            pid = int(text) if text.isdigit() and int(text) > 0 else None
            return DaemonLockView(True, pid, os.fstat(fd).st_mtime)
        except OSError:
            return DaemonLockView(None)  # no flock here: the status file decides
        return DaemonLockView(False)
    finally:
        os.close(fd)  # closing releases a lock taken just now


def _stale_status(status: DaemonStatus | None, lock: DaemonLockView) -> str | None:
    """Why the status file does not describe the daemon holding the lock, or None if it does."""
    if status is not None and lock.since is not None:
        written_before = status.updated_at < lock.since - STATUS_CLOCK_SLACK_SECONDS
    else:
        written_before = False
    if status is not None and lock.pid in (None, status.pid) and not written_before:
        return None  # this daemon's own (its "stopped" while it lets go of the lock)
    started = f", started {_show_time(lock.since)}" if lock.since is not None else ""
    written = (
        "there is no status file" if status is None
        else f"the status file is from pid {status.pid} at {_show_time(status.updated_at)}"
    )  # fmt: skip
    return (
        f"{written}, not from this daemon{started}: it has not finished its first connection "
        "attempt yet, or cannot write the file (its log says 'cannot write the status file'; "
        "check free space and permissions in the state dir)"
    )


def _check(args: argparse.Namespace, config: AgentConfig, environ: Mapping[str, str]) -> int:
    """Validate what ``run`` would use and print it; 0 when usable, 1 (one line each) if not."""
    problems: list[str] = []

    def show(label: str, describe: Callable[[], str]) -> None:
        try:
            text = describe()
        except (*_USER_ERRORS, OSError) as error:
            problems.append(f"{label}: {_describe_os_error(error)}")
            text = f"PROBLEM: {_describe_os_error(error)}"
        print(f"{label + ':':<15}{text}")

    config_file = config_file_to_read(args.config, environ)
    print(f"{'Config file:':<15}{config_file or 'none'}")
    def describe_state_dir() -> str:
        if config.state_dir.is_dir():
            check_state_dir_writable(config.state_dir)
        return str(config.state_dir)

    show("State dir", describe_state_dir)
    state_box: list[AgentState] = []

    def describe_state() -> str:
        identifiers = read_machine_identifiers(config.machine_root)
        state_box.append(load_state(config.state_file, identifiers))
        return f"agent {state_box[0].agent_id} ({state_box[0].name}), {state_box[0].server_url}"

    show("State", describe_state)
    if state_box:
        print(f"{'Service keys:':<15}pinned at enrollment or followed since; compare with "
              "tucdesk-rendezvous keys show")
        for line in pinned_service_keys(state_box[0]):
            print(f"  {line}")

    def describe_ca() -> str:
        if state_box:
            ca_file = config.ca_file if config.ca_file is not None else state_box[0].ca_file
            text = describe_ca_file(config, state_box[0])
        else:
            ca_file = config.ca_file
            text = str(ca_file) if ca_file is not None else "the system CAs"
        tls_context(ca_file)
        return text

    show("CA file", describe_ca)

    def describe_user() -> str:
        account = check_session_user(config)
        return f"{account.pw_name} (uid {account.pw_uid})"

    show("Session user", describe_user)

    def describe_shell() -> str:
        return describe_session_shell(config)

    show("Shell", describe_shell)

    def describe_recordings() -> str:
        if not config.record_sessions:
            return f"off ({config.recordings_path} if turned on)"
        prepare_recordings_dir(config.recordings_path)
        return f"on, in {config.recordings_path}"

    show("Recordings", describe_recordings)
    print(f"{'Max sessions:':<15}{config.max_sessions}")
    print(f"{'Session umask:':<15}{config.session_umask} (session_umask)")
    print(f"{'Login uid:':<15}{describe_audit_login_uid(config)} (audit_login_uid)")
    print(f"{'Handshake:':<15}at most {config.handshake_timeout_seconds:g}s "
          "(handshake_timeout_seconds)")
    print(f"{'Reconnect:':<15}waits at most {config.reconnect_cap_seconds:g}s between tries "
          "(reconnect_cap_seconds)")
    if problems:
        for problem in problems:
            print(f"{PROGRAM}: {problem}", file=sys.stderr)
        return 1
    print("Configuration OK")
    return 0


def describe_audit_login_uid(config: AgentConfig) -> str:
    """Whether sessions get the session user's audit login uid, and why not when they do not."""
    if not config.audit_login_uid:
        return "off: sessions keep the agent's login uid"
    if os.geteuid() != 0:
        return "on, but applies only when the agent runs as root"
    return "on: sessions get the session user's (about 4-5 ms of CPU per exec session)"


def describe_ca_file(config: AgentConfig, state: AgentState) -> str:
    """Which CA file run trusts for the rendezvous's TLS, and where that choice comes from."""
    if config.ca_file is not None:
        return f"{config.ca_file} (ca_file setting)"
    if state.ca_file is None:
        return "the system CAs"
    if Path(state.ca_file).name == SAVED_CA_FILE_NAME:
        return f"{state.ca_file} (the copy saved at enrollment)"
    return (
        f"{state.ca_file} (the path given at enrollment; run copies it to "
        f"STATE_DIR/{SAVED_CA_FILE_NAME} at its next start)"
    )


def describe_session_shell(config: AgentConfig) -> str:
    """The shell shell sessions run; ConfigError when it refuses to run anything.

    Shell sessions run ``shell`` or the account's login shell; exec sessions run their argv
    directly, but a command line (exec with a shell) always goes through the login shell
    (agent/exec_session.py). A login shell that is not an executable file is replaced by
    /bin/sh (agent/process_group.py), so it is not a failure.
    """
    account = check_session_user(config)
    login = account.pw_shell
    login_refuses = _refuses_to_run(login)
    if config.shell is not None:
        if not os.access(config.shell, os.X_OK):
            raise ConfigError(f"shell {config.shell}: not an executable file")
        if _refuses_to_run(config.shell):
            raise ConfigError(
                f"shell {config.shell} refuses to run anything: every shell session would "
                "fail; set shell (--shell) to a real shell such as /bin/bash"
            )
        if login_refuses:
            return (
                f"{config.shell} (note: exec command lines run through {account.pw_name}'s "
                f"login shell {login}, which refuses them; exec of a plain argv works)"
            )
        return config.shell
    if login_refuses:
        raise ConfigError(
            f"user {account.pw_name}'s login shell is {login}, which refuses to run anything: "
            "every shell session and every exec command line would fail (exec of a plain argv "
            f"would work); set shell (--shell) or give the account a shell (usermod -s "
            f"/bin/bash {account.pw_name})"
        )
    if not login or not os.path.isabs(login) or not os.access(login, os.X_OK):
        return f"/bin/sh ({account.pw_name}'s login shell {login or '(none)'} is not executable)"
    return login


def _refuses_to_run(shell: str) -> bool:
    """Whether ``shell`` is nologin or false (also through a symlink)."""
    if not shell:
        return False
    names = {os.path.basename(shell), os.path.basename(os.path.realpath(shell))}
    return bool(names & REFUSING_SHELLS)


def _recordings_list(
    args: argparse.Namespace, config: AgentConfig, environ: Mapping[str, str]
) -> int:
    _require_recordings_dir(config)
    recordings = list_recordings(config.recordings_path)
    if not recordings:
        print(f"No recordings in {config.recordings_path}")
        return 0
    print(f"{'SESSION':<32} {'STARTED':<23} {'BYTES':>12}  STATE")
    for info in recordings:
        started = "-" if info.started_at is None else _show_time(info.started_at)
        state = info.state.value
        if info.truncated and info.state is not RecordingState.TRUNCATED:
            state += ", truncated"
        if info.detail:
            state += f" ({info.detail})"
        print(f"{info.session_id:<32} {started:<23} {info.size:>12}  {state}")
    return 0


def _require_recordings_dir(config: AgentConfig) -> None:
    """ConfigError unless the recordings directory is there: a typo must not read as empty."""
    path = config.recordings_path
    try:
        os.stat(path)
    except FileNotFoundError:
        raise ConfigError(
            f"{path} does not exist: check --recordings-dir or --state-dir"
        ) from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot use it ({error.strerror})") from None
    if not path.is_dir():
        raise ConfigError(f"{path} is not a directory: check --recordings-dir or --state-dir")


def _recordings_prune(
    args: argparse.Namespace, config: AgentConfig, environ: Mapping[str, str]
) -> int:
    limits = RetentionLimits.from_config(config)
    if not limits.is_set:
        raise ConfigError(
            "no retention limits: set recordings_max_age_days or recordings_max_total_bytes, "
            "or pass --max-age-days or --max-total-bytes"
        )
    _require_recordings_dir(config)
    report = prune_recordings(config.recordings_path, limits, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    for item in report.deleted:
        print(f"{verb} {item.name} ({item.size} bytes, {age_in_days(item.age_seconds)} old)")
    print(
        f"{verb.capitalize()} {len(report.deleted)} recording(s), {report.deleted_bytes} "
        f"bytes; {report.kept} left, {report.kept_bytes} bytes, in {config.recordings_path} "
        f"({describe_limits(limits)})"
    )
    if report.skipped_active:
        print(
            f"Kept {report.skipped_active} recording(s) beyond the limits: being written, or "
            "written in the last minute"
        )
    return 0


def _recordings_play(
    args: argparse.Namespace, config: AgentConfig, environ: Mapping[str, str]
) -> int:
    if not args.speed > 0:
        raise ConfigError("--speed must be more than 0")
    if args.max_idle is not None and not args.max_idle >= 0:
        raise ConfigError("--max-idle must be 0 or more")

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    path = args.file
    if not path.exists() and len(path.parts) == 1:
        # A session id (or its file name): its recording in the recordings directory.
        name = path.name.removesuffix(RECORDING_SUFFIX)
        path = config.recordings_path / recording_file_name(name)
        if not path.exists():
            raise ConfigError(f"no recording of session {name} in {config.recordings_path}")
    trio.run(partial(play, path, write, speed=args.speed, max_idle=args.max_idle))
    return 0


def _policy_summary(state: AgentState) -> str:
    if state.policy_trust is None:
        return "no pinned admin keys (enrolled before team policies: re-enroll)"
    try:
        trust = PinnedPolicyTrust.from_json(state.policy_trust)
    except (ValueError, TypeError):
        return "pinned policy trust is malformed (re-enroll)"
    admins = f"{len(trust.admin_keys)} admin key(s) pinned"
    if trust.version == 0:
        return f"none signed yet, only admins may open sessions; {admins}"
    return f"version {trust.version} applied; {admins}"


def _show_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


if __name__ == "__main__":
    sys.exit(main())
