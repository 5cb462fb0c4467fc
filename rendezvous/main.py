"""Entry point for `tucdesk-rendezvous`: init, serve, db, backup, team, invite, operator, keys.

Every subcommand takes the same ``--data-dir``, ``--database`` and ``--config`` as ``serve``, so
admin commands work on the very store a running service uses.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import shlex
import signal
import sys
import textwrap
import time
import traceback
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from protocol.errors import ProtocolError
from protocol.stdio_fds import open_dev_null_on_closed_standard_fds
from protocol.version import installed_version
from rendezvous.audit_trail import SERVICE_LOG, Action, AuditTrail, service_actor
from rendezvous.auth import ROLES
from rendezvous.config import ENVIRONMENT_PREFIX, SETTING_HELP, ServiceConfig, load_config
from rendezvous.credentials import hash_secret, new_invite_code
from rendezvous.errors import ConfigError, ServiceError
from rendezvous.service_keys import (
    KEY_ROLES,
    ServiceKeys,
    check_pinned_keys,
    create_missing_keys,
    load_service_keys,
    missing_pinned_keys,
    with_retired_keys,
)
from rendezvous.store import (
    AlreadyExists,
    MigrationRefused,
    StoreError,
    backend_for,
    describe_applied,
    describe_database,
    open_store,
    require_current_schema,
)
from rendezvous.store.backup import backup_sqlite
from rendezvous.store.base import Invite, InviteUnusable, NotFound, Store, Team, UnusableReason

if TYPE_CHECKING:
    from rendezvous.store.postgres import ConnectionCapacity

PROGRAM = "tucdesk-rendezvous"
DATA_DIR_MODE = 0o700
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # as a shell reports a command ended by SIGINT

logger = logging.getLogger("tucdesk.rendezvous")

CONFIG_SOURCES = """\
configuration (highest precedence first): command-line flags, TUCDESK_<SETTING> environment
variables, then the TOML file given by --config or TUCDESK_CONFIG (top-level keys or a
[rendezvous] table; relays = ["ID=HOST:PORT", …]), then built-in defaults.
"""
DURATION_UNITS = ((86400, "d"), (3600, "h"), (60, "m"))
HELP_WIDTH = 78


def settings_help(flags: Mapping[str, str]) -> str:
    """The configuration part of --help: every ServiceConfig setting with its TOML key,
    environment variable, flag (from ``flags``) and default, read off the config object so the
    list cannot drift from what the service reads."""
    lines = [CONFIG_SOURCES, "settings (TOML key, environment variable, flag):"]
    for field in dataclasses.fields(ServiceConfig):
        names = [field.name, ENVIRONMENT_PREFIX + field.name.upper()]
        if field.name in flags:
            names.append(flags[field.name])
        lines.append("  " + ", ".join(names))
        text = SETTING_HELP[field.name] + _default_text(field.name, field.default)
        lines.extend(textwrap.wrap(text, HELP_WIDTH, initial_indent="      ",
                                   subsequent_indent="      "))
    return "\n".join(lines) + "\n"


def _default_text(name: str, default: object) -> str:
    if default is None:
        return ""  # the help text says what happens without it
    if isinstance(default, bool):
        shown = str(default).lower()
    elif default == ():
        shown = "none"
    elif isinstance(default, float):
        shown = f"{default:g}"
    else:
        shown = str(default)
    if name.endswith("_seconds") and isinstance(default, int | float) and default > 0:
        for unit_seconds, unit in DURATION_UNITS:
            if default >= unit_seconds and default % unit_seconds == 0:
                shown += f" ({int(default // unit_seconds)}{unit})"
                break
    return f"; default {shown}"



def _add_store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", type=Path, help="service data directory (keys, SQLite db; default "
        f"{ServiceConfig.data_dir})",
    )
    parser.add_argument(
        "--database",
        help="store URL: sqlite:///PATH or postgresql://…; default: SQLite file in the data dir",
    )
    parser.add_argument("--config", type=Path, help="TOML configuration file")


def _add_while_running_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--while-running",
        action="store_true",
        help="apply pending schema migrations even though other clients are connected to the "
        "database (only when none of them is a tucdesk-rendezvous instance)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; --help documents every command and the configuration sources."""
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description="TucDesk rendezvous: the control plane service and its admin commands.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {installed_version()}")
    # Also accepted before the command (`tucdesk-rendezvous --config FILE init`); the command's
    # own --config (--data-dir, --database) wins when both are given.
    parser.add_argument(
        "--config", dest="top_config", type=Path, metavar="CONFIG",
        help="TOML configuration file",
    )
    parser.add_argument(
        "--data-dir", dest="top_data_dir", type=Path, metavar="DATA_DIR",
        help=f"service data directory (default {ServiceConfig.data_dir})",
    )
    parser.add_argument(
        "--database", dest="top_database", metavar="DATABASE", help="store URL (see below)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    init = commands.add_parser(
        "init",
        help="create or migrate the schema and create service keys (safe to rerun)",
        description="Create the schema (or apply pending migrations) and the service keys. "
        "Migrations are refused while other clients are connected to the database: stop every "
        "instance first (docs/self-hosting.md, 'Upgrading').",
    )
    _add_store_flags(init)
    _add_while_running_flag(init)

    serve = commands.add_parser(
        "serve", help="serve the HTTP API", formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_store_flags(serve)
    serve.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8443)")
    serve.add_argument("--tls-cert", type=Path, help="PEM certificate chain for TLS")
    serve.add_argument("--tls-key", type=Path, help="PEM private key for TLS")
    serve.add_argument(
        "--insecure-http",
        action="store_true",
        default=None,
        help="serve plain HTTP without TLS (only allowed on a loopback address)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        help="service processes sharing the listening socket, each a full instance (default 1;"
        " more than 1 needs PostgreSQL)",
    )
    serve.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help="serve /metrics (plain HTTP) on this address instead of the API port, e.g. "
        "127.0.0.1:9465 or a private interface (default: /metrics on the API port)",
    )
    _add_while_running_flag(serve)
    serve.add_argument(
        "--relay",
        dest="relays",
        action="append",
        metavar="ID=HOST:PORT[/UDPPORT]",
        help="a relay sessions may use (repeatable); without one, sessions are refused (503)",
    )

    database = commands.add_parser("db", help="the database schema")
    database_commands = database.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_status = database_commands.add_parser(
        "status",
        help="show the schema version, the version this program understands, pending "
        "migrations and (PostgreSQL) the other clients; changes nothing",
    )
    _add_store_flags(db_status)
    db_prune = database_commands.add_parser(
        "prune",
        help="delete sessions that are over and settled approval requests older than "
        "--older-than, in small batches, while instances serve; audited as history.pruned in "
        "each team's log. Audit records are never deleted (docs/self-hosting.md, 'Retention')",
    )
    db_prune.add_argument(
        "--older-than", required=True, metavar="DURATION",
        help="keep history younger than this, such as 90d (at least 7d)",
    )  # fmt: skip
    db_prune.add_argument(
        "--dry-run", action="store_true", help="only count what would be deleted"
    )
    _add_store_flags(db_prune)

    backup = commands.add_parser(
        "backup",
        help="copy a SQLite store safely while it serves (PostgreSQL: use pg_dump)",
        description="Write a consistent copy of the SQLite store with SQLite's online backup "
        "API (safe while the service runs; a plain cp can lose what is still in the -wal file). "
        "The keys directory is not included: back it up separately. On PostgreSQL this prints "
        "the pg_dump command to use instead.",
    )
    backup.add_argument("output", type=Path, help="backup file to write (created 0600)")
    backup.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    _add_store_flags(backup)

    team = commands.add_parser("team", help="manage teams")
    team_commands = team.add_subparsers(dest="team_command", required=True, metavar="ACTION")
    team_create = team_commands.add_parser("create", help="create a team")
    team_create.add_argument("name", help="team name")
    _add_store_flags(team_create)
    team_list = team_commands.add_parser("list", help="list teams")
    _add_store_flags(team_list)
    reset_help = (
        "retire a team's signed policy chain when no active admin of its signed roster is "
        "left (refused otherwise), so a current admin can sign a new first policy; agents do "
        "NOT take it until each is re-enrolled (tucdesk-agent enroll --force); audited as "
        "policy.reset (docs/policy.md)"
    )
    team_reset = team_commands.add_parser(
        "reset-policy", help=reset_help, description=reset_help[0].upper() + reset_help[1:] + "."
    )
    team_reset.add_argument("--team", required=True, help="team name")
    _add_store_flags(team_reset)

    operator = commands.add_parser(
        "operator", help="a team's operators, from the rendezvous host (a lock no admin can undo)"
    )
    operator_commands = operator.add_subparsers(
        dest="operator_command", required=True, metavar="ACTION"
    )
    operator_list = operator_commands.add_parser(
        "list",
        help="list a team's operators: id, email, role, state, and whether the team's signed "
        "roster names them as admin (who can sign the next policy)",
    )
    operator_list.add_argument("--team", required=True, help="team name")
    _add_store_flags(operator_list)
    operator_disable = operator_commands.add_parser(
        "disable",
        help="disable an operator as an admin's `tucdesk operators disable` does (tokens, key, "
        "API keys, registration keys, invites, pending approvals), any role, even the team's "
        "last admin (then invite a new one); their open sessions end within a minute; audited "
        "with the service as actor",
    )
    operator_disable.add_argument("--team", required=True, help="team name")
    operator_disable.add_argument(
        "operator", metavar="EMAIL_OR_ID", help="the operator's email or id (op_…)"
    )
    _add_store_flags(operator_disable)

    invite = commands.add_parser("invite", help="manage operator invites")
    invite_commands = invite.add_subparsers(dest="invite_command", required=True, metavar="ACTION")
    invite_create = invite_commands.add_parser(
        "create", help="create a one-time invite; the code is printed on the last line"
    )
    invite_create.add_argument("--team", required=True, help="team name")
    invite_create.add_argument("--email", required=True, help="the new operator's email")
    invite_create.add_argument("--role", required=True, choices=ROLES, help="the operator's role")
    invite_create.add_argument(
        "--ttl", help="lifetime such as 30m, 24h, 7d (default: invite_seconds, 7d)"
    )
    invite_create.add_argument(
        "--another-key", action="store_true",
        help="invite an email an enabled operator or a pending invite of the team already has "
        "(ignoring case), with the SAME role: a second operator key for one person (another "
        "machine), or a fresh code when the first was lost (it stays valid until it expires). "
        "Without it such an invite is refused; another role is always refused (to change a "
        "role, disable the operator and invite them again), since one person holding two "
        "roles makes listings, approvals and the roster ambiguous",
    )  # fmt: skip
    _add_store_flags(invite_create)
    invite_list = invite_commands.add_parser(
        "list",
        help="list a team's invites: id, email, role, state (pending, used, expired) and "
        "expiry (codes are never stored, so never shown)",
    )
    invite_list.add_argument("--team", required=True, help="team name")
    invite_list.add_argument(
        "--all", action="store_true", help="include used and expired invites (default: pending)"
    )
    _add_store_flags(invite_list)
    invite_revoke = invite_commands.add_parser(
        "revoke",
        help="make a pending invite unusable now (a lost or mistaken code); audited as "
        "operator.invite_revoked",
    )
    invite_revoke.add_argument("--team", required=True, help="team name")
    invite_revoke.add_argument(
        "invite_id", metavar="INVITE_ID", help="the invite id 'create' printed (not the code)"
    )
    _add_store_flags(invite_revoke)

    audit = commands.add_parser("audit", help="audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    audit_export = audit_commands.add_parser(
        "export", help="write a team's (or the service log's) audit bundle"
    )
    which = audit_export.add_mutually_exclusive_group(required=True)
    which.add_argument("--team", help="team name")
    which.add_argument(
        "--service",
        action="store_true",
        help="the service log (refusals no team can be charged with)",
    )
    audit_export.add_argument("-o", "--output", type=Path, required=True, help="bundle file")
    _add_store_flags(audit_export)

    keys = commands.add_parser("keys", help="service keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    keys_show = keys_commands.add_parser("show", help="print the service public keys (JWK set)")
    keys_show.add_argument(
        "--pem",
        metavar="ROLE",
        choices=KEY_ROLES,
        help="print only this key's public PEM (e.g. audit-signer, for tucdesk-audit verify)",
    )
    _add_store_flags(keys_show)
    keys_rotate = keys_commands.add_parser(
        "rotate",
        help="replace one service key; the old one's public half stays as retired "
        "(docs/self-hosting.md, 'Rotating service keys')",
        description="Make a new PURPOSE key, pin it in the database, record service_key.rotated "
        "in every audit log and delete the old private key file. Running instances take the new "
        "key by themselves: on PostgreSQL within seconds (a database notice), on SQLite (or an "
        "instance that missed the notice) only at their minute check, up to 60 s later; SIGHUP "
        "(systemctl reload tucdesk-rendezvous, or kill -HUP PID) to every instance makes it "
        "immediate. Other hosts sharing the database need the new key file first (a shared or "
        "copied keys dir).",
    )
    keys_rotate.add_argument("purpose", choices=KEY_ROLES, help="which service key to replace")
    keys_rotate.add_argument(
        "--retire-old-now",
        action="store_true",
        help="after a leak: refuse the tokens and grants the old key signed as soon as each "
        "running instance reloads its keys (within seconds on PostgreSQL, up to 60 s on SQLite; "
        "send SIGHUP to every instance right after to make it immediate); by default they stay "
        "valid until they expire (at most 15 min 30 s)",
    )
    _add_store_flags(keys_rotate)
    # The settings list names each setting's serve flag, taken from the serve parser itself.
    flags = {
        action.dest: action.option_strings[-1]
        for action in serve._actions  # noqa: SLF001 - argparse has no public list of options
        if action.option_strings and action.dest in SETTING_HELP
    }
    parser.epilog = serve.epilog = settings_help(flags)
    return parser


# A duration: ASCII digits (str.isdigit also takes '²' and other scripts' digits) and a unit.
DURATION_PATTERN = re.compile(r"([0-9]+)([smhd]?)", re.ASCII)
DURATION_SUFFIX_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
# Longer than any TTL or retention makes sense for, and far from a date before year 1.
MAX_DURATION_SECONDS = 100 * 365 * 86400


def parse_duration(text: str) -> int:
    """Seconds in a duration such as ``90s``, ``30m``, ``24h`` or ``7d`` (bare numbers: seconds);
    ConfigError, one line, for anything else, zero, or more than 100 years."""
    cleaned = text.strip().lower()
    match = DURATION_PATTERN.fullmatch(cleaned)
    if match is None:
        raise ConfigError(f"duration {text!r} is not like 90s, 30m, 24h or 7d")
    digits = match.group(1)
    seconds = int(digits) * DURATION_SUFFIX_SECONDS[match.group(2)] if len(digits) <= 12 else -1
    if not 0 < seconds <= MAX_DURATION_SECONDS:
        raise ConfigError(
            f"duration {text!r} must be more than 0 and at most {MAX_DURATION_SECONDS // 86400}d"
        )
    return seconds


def _config(args: argparse.Namespace) -> ServiceConfig:
    flags = {
        name: getattr(args, name, None)
        for name in (
            "data_dir", "database", "listen", "tls_cert", "tls_key", "insecure_http", "relays",
            "workers", "metrics_listen",
        )
    }
    for name in ("data_dir", "database"):
        if flags[name] is None:
            flags[name] = getattr(args, f"top_{name}", None)
    config_file = getattr(args, "config", None) or getattr(args, "top_config", None)
    config = load_config(flags, os.environ, config_file)
    return config


def require_existing_store(config: ServiceConfig) -> None:
    """Raise ConfigError unless the SQLite file exists: only ``init`` may create a store.

    A command given the wrong data dir (or no --config) would otherwise quietly create a new,
    empty database and work on that. A PostgreSQL database is never created by connecting.
    """
    kind, location = backend_for(config.database_url)
    if kind == "sqlite" and location != ":memory:" and not Path(location).exists():
        raise ConfigError(
            f"no rendezvous store at {location}; run `tucdesk-rendezvous init` or pass --config"
            " (or --data-dir/--database) naming the store the service uses"
        )


def _run(function: Callable[..., Coroutine[Any, Any, int]], *args: Any) -> int:
    return trio.run(function, *args)


async def _init(config: ServiceConfig, while_running: bool = False) -> int:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(config.data_dir, DATA_DIR_MODE)
    async with _sqlite_not_serving(config.database_url, while_running):
        async with open_store(
            config.database_url, migrate_while_running=while_running, **config.store_options()
        ) as store:
            schema = describe_applied(store)
            backend = store.backend
            keys, created = await _init_keys(store, config)
    print(f"data dir: {config.data_dir.resolve()}")
    print(f"store: {backend} ({schema})")
    for role, key in keys.by_role().items():
        state = "created" if role in created else "kept"
        print(f"{role}: {key.public.fingerprint} kid={key.public.key_id} ({state})")
    return EXIT_OK


@contextlib.asynccontextmanager
async def _sqlite_not_serving(database: str, while_running: bool) -> AsyncIterator[None]:
    """On SQLite, hold the serve lock for the block, so no instance starts serving mid-migration;
    when one serves now, refuse if there are migrations to apply (unless ``while_running``).
    Nothing on PostgreSQL (the migration itself checks the other clients there)."""
    from rendezvous.server import sole_sqlite_server

    kind, location = backend_for(database)
    if kind != "sqlite" or location == ":memory:" or while_running:
        yield
        return
    with contextlib.ExitStack() as lock:
        try:
            lock.enter_context(sole_sqlite_server(database))
        except ConfigError as error:
            if "already serving" not in str(error):
                raise
            async with open_store(database, migrate=False) as store:
                pending = await store.pending_migrations()
            if pending:
                raise MigrationRefused(
                    f"{error}; stop it before init migrates the schema (it would go on serving "
                    "with its old rules on the new schema), or rerun with --while-running if "
                    "the one serving is this version (docs/self-hosting.md, 'Upgrading')"
                ) from None
        yield


async def _init_keys(store: Store, config: ServiceConfig) -> tuple[ServiceKeys, set[str]]:
    """Create the missing service keys and pin them (or check them against the pins)."""
    # Keys for a database initialised elsewhere are copied from there, never created here.
    await missing_pinned_keys(store, config.data_dir)
    created = create_missing_keys(config.data_dir)
    keys = load_service_keys(config.data_dir)
    await check_pinned_keys(store, keys, config.data_dir, time.time(), pin=True)
    return keys, set(created)


async def _db_status(config: ServiceConfig) -> int:
    # asyncpg only when it is needed
    from rendezvous.store.postgres import PostgresStore, hidden_clients_note

    async with open_store(config.database_url, migrate=False, **config.store_options()) as store:
        version = await store.schema_version()
        pending = await store.pending_migrations()
        others = await store.other_clients() if isinstance(store, PostgresStore) else None
        understood = store.understood_schema_version
    print(f"backend: {store.backend} ({describe_database(config.database_url)})")
    print(f"database schema: {version}")
    print(f"this program understands: {understood} ({PROGRAM} {installed_version()})")
    if version > understood:
        print(f"the database is newer than this program: use {PROGRAM} of the newer version")
    elif pending:
        listed = ", ".join(f"{number} {name}" for number, name in pending)
        print(f"pending migrations: {listed}")
        print("apply them with `init`, every instance stopped (docs/self-hosting.md, 'Upgrading')")
    else:
        print("pending migrations: none")
    if others is not None:
        print(f"other clients connected: {len(others)}")
        for client in others:
            print(f"  {client.describe()}")
        hidden = hidden_clients_note(others)
        if hidden is not None:
            print(hidden)
    return EXIT_OK


async def _db_prune(config: ServiceConfig, older_than: int, dry_run: bool) -> int:
    """Delete (or count) every team's history older than ``older_than`` seconds.

    Ctrl-C (SIGINT) stops after the batch in flight: the team's ``history.pruned`` outcome
    record says ``interrupted`` with the rows deleted, and one line says so (exit 130).
    """
    from rendezvous.retention import prune_cutoff, prune_team_history
    from rendezvous.store.base import PrunedHistory

    now = time.time()
    before = prune_cutoff(older_than, now)
    keys = load_service_keys(config.data_dir)
    total = PrunedHistory()
    interrupted = False

    def stop_requested() -> bool:
        return interrupted

    async def watch_interrupt(signals: Any) -> None:
        nonlocal interrupted
        async for _ in signals:
            if not interrupted:
                print("stopping after the batch in flight (Ctrl-C)", file=sys.stderr)
            interrupted = True

    async with _admin_store(config) as store, trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGINT) as signals:
            nursery.start_soon(watch_interrupt, signals)
            await check_pinned_keys(store, keys, config.data_dir, now, pin=False)
            trail: AuditTrail | None = None
            if not dry_run:
                trail = AuditTrail(store.audit, keys.audit_signer, origin=config.issuer)
            for team in await store.list_teams():
                if interrupted:
                    break

                def progress(done: PrunedHistory, name: str = team.name) -> None:
                    print(f"team {name}: deleted {done.sessions} sessions, "
                          f"{done.approval_requests} approval requests so far", file=sys.stderr)

                pruned = await prune_team_history(
                    store, trail, team.id, before, progress=progress,
                    stop_requested=stop_requested,
                )  # fmt: skip
                total += pruned
                if pruned:
                    print(f"team {team.name}: {'would delete' if dry_run else 'deleted'} "
                          f"{pruned.sessions} sessions, {pruned.approval_requests} approval "
                          "requests")
            nursery.cancel_scope.cancel()
    if interrupted and not dry_run:
        print(f"tucdesk-rendezvous: db prune interrupted: deleted {total.sessions} sessions and "
              f"{total.approval_requests} approval requests (recorded as history.pruned, "
              "stage interrupted); run it again to finish", file=sys.stderr)
        return EXIT_INTERRUPTED
    verb = "would delete" if dry_run else "deleted"
    print(f"{verb} {total.sessions} sessions and {total.approval_requests} approval requests "
          f"last changed before {_utc(before)}; audit records are kept")
    return EXIT_OK


def _backup(config: ServiceConfig, output: Path, force: bool) -> int:
    kind, location = backend_for(config.database_url)
    if kind == "postgres":
        raise ServiceError(
            "backup copies SQLite stores; for PostgreSQL run "
            f"`{pg_dump_command(location, config, output)}` (custom format; restore with "
            "pg_restore), and back up the keys directory separately"
        )
    size = backup_sqlite(location, output, force=force)
    print(f"wrote {output} ({size} bytes), a consistent copy of {location}")
    print(f"the service keys are not in it: back up {config.data_dir / 'keys'} separately "
          "(restoring the database without the same keys breaks the pinned keys)")
    return EXIT_OK


def pg_dump_command(url: str, config: ServiceConfig, output: Path) -> str:
    """The pg_dump command line for this database (never with the password in it)."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, port = parts.hostname or "localhost", parts.port or 5432
        user = urllib.parse.unquote(parts.username or "") or "USER"
        name = urllib.parse.unquote(parts.path.lstrip("/")) or "DATABASE"
    except ValueError:
        host, port, user, name = "HOST", 5432, "USER", "DATABASE"
    if "@" in url and url.count("@") > 1:
        host, port, user, name = "HOST", 5432, "USER", "DATABASE"
    # The service reads the first line without a trailing \r: so does this (tr), and the path
    # is quoted, so a space or a shell metacharacter in it stays part of the name.
    password = (
        f"PGPASSWORD=\"$(head -n1 {shlex.quote(str(config.database_password_file))} "
        "| tr -d '\\r')\" "
        if config.database_password_file is not None
        else ""
    )
    return (
        f"{password}pg_dump -Fc -h {shlex.quote(host)} -p {port} -U {shlex.quote(user)} "
        f"-d {shlex.quote(name)} -f {shlex.quote(str(output))}"
    )


@contextlib.asynccontextmanager
async def _admin_store(config: ServiceConfig) -> AsyncIterator[Store]:
    """The store for an admin command: never migrated here (a newer build's `team create` would
    migrate the database under an older instance still serving it; only init migrates, with
    every instance stopped), and refused unless its schema is the one this program knows."""
    async with open_store(config.database_url, migrate=False, **config.store_options()) as store:
        await require_current_schema(store)
        yield store


async def _team_create(config: ServiceConfig, name: str) -> int:
    async with _admin_store(config) as store:
        try:
            team = await store.create_team(name, time.time())
        except AlreadyExists:
            raise ServiceError(f"a team named {name!r} already exists") from None
    print(f"team created: {team.name} id={team.id}")
    return EXIT_OK


async def _team_list(config: ServiceConfig) -> int:
    async with _admin_store(config) as store:
        for team in await store.list_teams():
            print(f"{team.id}\t{team.name}")
    return EXIT_OK


async def _invite_create(
    config: ServiceConfig,
    team_name: str,
    email: str,
    role: str,
    ttl: int,
    another_key: bool = False,
) -> int:
    keys = load_service_keys(config.data_dir)
    code = new_invite_code()
    now = time.time()
    async with _admin_store(config) as store:
        await check_pinned_keys(store, keys, config.data_dir, now, pin=False)
        team = await _team_named(store, team_name)
        await _check_email_free(store, team.id, email, role, now, another_key=another_key)
        invite = await store.create_invite(
            team.id, email, role, hash_secret(code), now + ttl, "admin-command", now
        )
        trail = AuditTrail(store.audit, keys.audit_signer, origin=config.issuer)
        await trail.record(
            team.id,
            actor=service_actor("admin command"),
            action=Action.OPERATOR_INVITE_CREATED,
            target=f"invite:{invite.id}",
            details={"invite_id": invite.id, "email": email, "role": role, "ttl_seconds": ttl},
        )
    # Both strings start with inv_: each is labelled, and the code is filled into the command.
    # The bare code stays the last line, for scripts.
    print(f"invite id: {invite.id}  (not the code; to revoke it: invite revoke --team "
          f"{team.name} {invite.id})")
    print(f"  for {email} ({role}) in team {team.name}, valid {ttl}s")
    print(f"the operator logs in with: tucdesk login --server URL --invite {code}")
    print("one-time code (give only this to the operator):")
    print(code)
    return EXIT_OK


async def _invite_list(config: ServiceConfig, team_name: str, show_all: bool) -> int:
    now = time.time()
    async with _admin_store(config) as store:
        team = await _team_named(store, team_name)
        invites = await store.list_invites(team.id)
    shown = [invite for invite in invites if show_all or invite.unusable_reason(now) is None]
    if not shown:
        print("no pending invites" if not show_all else "no invites")
        return EXIT_OK
    for invite in shown:
        reason = invite.unusable_reason(now)
        if reason is UnusableReason.USED:
            state = f"used {_utc(invite.used_at or 0)} by {invite.used_by}"
        elif reason is UnusableReason.REVOKED:
            state = "revoked"  # expires_at 0: a time no clock passes, not a date to show
        elif reason is UnusableReason.EXPIRED:
            state = f"expired {_utc(invite.expires_at)}"
        else:
            state = f"pending until {_utc(invite.expires_at)}"
        print(f"{invite.id}\t{invite.email}\t{invite.role}\t{state}")
    return EXIT_OK


async def _invite_revoke(config: ServiceConfig, team_name: str, invite_id: str) -> int:
    keys = load_service_keys(config.data_dir)
    now = time.time()
    async with _admin_store(config) as store:
        await check_pinned_keys(store, keys, config.data_dir, now, pin=False)
        team = await _team_named(store, team_name)
        invite = await _team_invite(store, team, invite_id)
        reason = invite.unusable_reason(now)
        if reason is not None:
            raise ServiceError(f"invite {invite_id} is already {reason}: nothing to revoke")
        # No audit, no action: the record is durable before the code stops working.
        trail = AuditTrail(store.audit, keys.audit_signer, origin=config.issuer)
        await trail.record(
            team.id,
            actor=service_actor("admin command"),
            action=Action.OPERATOR_INVITE_REVOKED,
            target=f"invite:{invite.id}",
            details={"invite_id": invite.id, "email": invite.email, "role": invite.role},
        )
        try:
            invite = await store.revoke_invite(team.id, invite_id, now)
        except NotFound:
            raise ServiceError(
                f"team {team.name} no longer has invite {invite_id!r}; the revoke is recorded"
            ) from None
        except InviteUnusable as unusable:
            # A login spent the code between the check above and the revoke: say so plainly.
            current = await _team_invite(store, team, invite_id)
            if unusable.reason is UnusableReason.USED and current.used_by is not None:
                raise ServiceError(
                    f"invite {invite_id} was used at {_utc(current.used_at or 0)} by operator "
                    f"{current.used_by} ({current.email}) before the revoke took effect: the "
                    f"revoke is recorded but stopped nothing; if that operator must not stay: "
                    f"operator disable --team {team.name} {current.used_by}"
                ) from None
            raise ServiceError(
                f"invite {invite_id} became {unusable.reason} before the revoke took effect: "
                "the revoke is recorded, nothing else changed"
            ) from None
    print(f"revoked invite {invite.id} for {invite.email} ({invite.role}) in team {team.name}")
    return EXIT_OK


async def _team_invite(store: Store, team: Team, invite_id: str) -> Invite:
    """The team's invite with this id; ServiceError naming it when there is none."""
    for invite in await store.list_invites(team.id):
        if invite.id == invite_id:
            return invite
    raise ServiceError(f"team {team.name} has no invite {invite_id!r} (see 'invite list --all')")


async def _team_reset_policy(config: ServiceConfig, team_name: str) -> int:
    """Retire the team's signed policy chain once no active admin of its roster is left."""
    from rendezvous.routes_operators import ADMIN_ROLE
    from rendezvous.team_policy import TeamPolicy, parse_stored_bundle, signing_admins

    keys = load_service_keys(config.data_dir)
    async with _admin_store(config) as store:
        await check_pinned_keys(store, keys, config.data_dir, time.time(), pin=False)
        team = await _team_named(store, team_name)
        stored = await store.latest_policy_bundle(team.id)
        if stored is None:
            raise ServiceError(
                f"team {team.name} has no signed policy: its active admins sign the first one "
                "(tucdesk policy set); nothing to reset"
            )
        current = TeamPolicy(stored, parse_stored_bundle(stored))
        operators = await store.list_operators(team.id)
        signers = signing_admins(current, operators)
        if signers:
            names = ", ".join(operator.email for operator in signers)
            raise ServiceError(
                f"team {team.name}'s signed roster still has an active admin ({names}): they "
                "sign the next policy or roster (tucdesk policy set, tucdesk roster sign); "
                "reset-policy is only for a team none of whose roster admins is active"
            )
        admins = [op for op in operators if op.is_active() and op.role == ADMIN_ROLE]
        if not admins:
            raise ServiceError(
                f"team {team.name} has no active admin to sign a new first policy: invite one "
                f"first (invite create --team {team.name} --email EMAIL --role admin), and "
                "have them log in"
            )
        trail = AuditTrail(store.audit, keys.audit_signer, origin=config.issuer)
        await trail.record(
            team.id,
            actor=service_actor("admin command"),
            action=Action.POLICY_RESET,
            target=f"policy:{team.id}",
            details={
                "retired_version": stored.version,
                "retired_sha256": stored.content_sha256,
                "signers": sorted(operator.email for operator in admins),
            },
        )
        retired = await store.retire_policy_bundles(team.id, time.time())
    print(f"retired team {team.name}'s signed policy chain ({retired} bundle(s), up to version "
          f"{stored.version}, sha256 {stored.content_sha256})")
    print(f"  an active admin ({', '.join(op.email for op in admins)}) now signs a new first "
          f"policy, version {stored.version + 1} (numbering goes on, so agents not re-enrolled "
          "refuse it and every grant decided under it): tucdesk policy set FILE (then "
          "tucdesk roster sign as operators change)")
    print("  agents keep their pins and refuse the new chain until each is re-enrolled AFTER "
          "this reset: tucdesk-agent enroll --force --registration-key KEY (a host admin's "
          "step; the rendezvous cannot re-root an agent's trust)")
    return EXIT_OK


async def _operator_list(config: ServiceConfig, team_name: str) -> int:
    """Print the team's operators, and which ones its signed roster names as admin."""
    from rendezvous.team_policy import TeamPolicy, parse_stored_bundle, signing_admins

    async with _admin_store(config) as store:
        team = await _team_named(store, team_name)
        operators = await store.list_operators(team.id)
        stored = await store.latest_policy_bundle(team.id)
    roster_admins = (
        {} if stored is None else parse_stored_bundle(stored).content.roster.admin_keys()
    )
    if not operators:
        print(f"team {team.name} has no operators")
    for operator in operators:
        state = "active" if operator.is_active() else f"disabled {_utc(operator.disabled_at or 0)}"
        signer = "roster-admin" if operator.key_thumbprint in roster_admins else "-"
        print(f"{operator.id}\t{operator.email}\t{operator.role}\t{state}\t{signer}")
    if stored is not None:
        current = TeamPolicy(stored, parse_stored_bundle(stored))
        if not signing_admins(current, operators):
            print(f"no active admin of team {team.name}'s signed roster is left: nobody can sign "
                  "its next policy; see docs/policy.md (team reset-policy)", file=sys.stderr)
    return EXIT_OK


async def _operator_disable(config: ServiceConfig, team_name: str, name_or_id: str) -> int:
    """Disable an operator from the rendezvous host, as the API does, whatever its role."""
    # The service's own modules (FastAPI, Hypercorn): imported here, not for every command.
    from rendezvous.approval_gate import withdraw_requests_of_disabled
    from rendezvous.context import ServiceContext
    from rendezvous.offer_bus import end_disabled_operator_sessions
    from rendezvous.routes_operators import freeze_marks, freezes_signed_roster, holdings_context
    from rendezvous.server import PRUNE_INTERVAL_SECONDS
    from rendezvous.team_policy import current_team_policy, signing_admins

    keys = load_service_keys(config.data_dir)
    async with _admin_store(config) as store:
        now = time.time()
        await check_pinned_keys(store, keys, config.data_dir, now, pin=False)
        team = await _team_named(store, team_name)
        matches = await store.operators_matching(team.id, name_or_id)
        exact = [operator for operator in matches if operator.id == name_or_id]
        if exact:
            matches = exact
        active = [operator for operator in matches if operator.is_active()]
        if len(matches) > 1 and len(active) == 1:
            matches = active  # the email's earlier holders are disabled already: this is the one
        if not matches:
            raise ServiceError(
                f"team {team.name} has no operator {name_or_id!r} (see operator list)"
            )
        if len(matches) > 1:
            ids = ", ".join(operator.id for operator in matches)
            raise ServiceError(
                f"several operators of team {team.name} have the email {name_or_id!r} "
                f"({ids}); name one by its id"
            )
        operator = matches[0]
        trail = AuditTrail(store.audit, keys.audit_signer, origin=config.issuer)
        ctx = ServiceContext(config=config, store=store, keys=keys, audit=trail)
        actor = service_actor("admin command")
        if operator.is_active():
            # The server admin's disable may freeze the signed roster (a lock on a rogue last
            # admin): marked as an admin's --freeze-roster disable is, when it does.
            in_force = await current_team_policy(ctx, team.id)
            freezes = in_force is not None and await freezes_signed_roster(
                ctx, in_force, operator
            )
            # No audit, no action: the record is durable before the key stops working.
            holdings = await store.operator_holdings(team.id, operator.id, now)
            await trail.record(
                team.id,
                actor=actor,
                action=Action.OPERATOR_REVOKED,
                target=f"operator:{operator.id}",
                details={"email": operator.email, "role": operator.role,
                         **holdings_context(holdings), **freeze_marks(freezes, freezes)},
            )  # fmt: skip
        disabled = await store.disable_operator_and_holdings(team.id, operator.id, now)
        withdrawn = await withdraw_requests_of_disabled(
            ctx, actor, disabled.operator, withdrawn_by=None
        )
        current = await current_team_policy(ctx, team.id)
        frozen = current is not None and not signing_admins(
            current, await store.list_operators(team.id)
        )
        try:
            await end_disabled_operator_sessions(ctx, team.id, operator.id)
            notified = store.notifications_supported
        except StoreError:
            notified = False
    who = f"{operator.email} ({operator.id}, {operator.role}) of team {team.name}"
    print(f"{who} was already disabled" if disabled.already_disabled else f"disabled {who}")
    print(f"  revoked: {len(disabled.revoked_api_keys)} API key(s), "
          f"{len(disabled.revoked_registration_keys)} unused registration key(s), "
          f"{len(disabled.revoked_invites)} unused invite(s); withdrawn: {withdrawn} pending "
          "approval request(s)")
    when = "now (every instance was notified)" if notified else (
        f"within {PRUNE_INTERVAL_SECONDS:.0f}s (each serving instance's sweep)")
    print(f"  its open sessions end {when}; an agent offline now ends them when it reconnects")
    if frozen:
        print(f"  no active admin of team {team.name}'s signed roster is left: invite an admin "
              f"(invite create --team {team.name} --role admin), then see docs/policy.md "
              f"(team reset-policy --team {team.name}, and re-enroll each agent)")
    elif current is not None and current.content.roster.entry_for(operator.key_thumbprint):
        print("  agents accept its key from the signed roster until an admin runs "
              "`tucdesk roster sign`")
    return EXIT_OK


async def _team_named(store: Store, team_name: str) -> Team:
    team = await store.get_team_by_name(team_name)
    if team is None:
        raise ServiceError(f"no team named {team_name!r}; create it with 'team create'")
    return team


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(timestamp))


async def _check_email_free(
    store: Store, team_id: str, email: str, role: str, now: float, *, another_key: bool
) -> None:
    """Refuse an invite for an email (ignoring case) that an enabled operator or a pending
    invite of the team holds: with another role always, with the same one unless
    ``another_key``."""
    operators, invites = await store.email_holders(team_id, email, now)
    holders = [
        (f"enabled operator {operator.id}", operator.role,
         "disable that operator first (tucdesk operators disable)")
        for operator in operators
    ] + [
        (f"pending invite {invite.id}", invite.role,
         f"use that invite, or revoke it (tucdesk-rendezvous invite revoke --team TEAM "
         f"{invite.id})")
        for invite in invites
    ]  # fmt: skip
    for holder, held_role, remedy in holders:
        if held_role != role:
            raise ServiceError(
                f"{email} is already the {held_role} of {holder} in this team, and one email "
                f"has one role: {remedy} to invite it as {role}"
            )
        if not another_key:
            raise ServiceError(
                f"{email} is already the {held_role} of {holder} in this team; pass "
                "--another-key to invite it again with the same role (a second key, or a "
                "fresh code for a lost one)"
            )


async def _audit_export(
    config: ServiceConfig, team_name: str | None, output: Path
) -> int:
    keys = load_service_keys(config.data_dir)
    async with _admin_store(config) as store:
        await check_pinned_keys(store, keys, config.data_dir, time.time(), pin=False)
        if team_name is None:
            log_id = SERVICE_LOG
        else:
            log_id = (await _team_named(store, team_name)).id
        trail = AuditTrail(store.audit, keys.audit_signer, origin=config.issuer)
        # Audited as the HTTP export is (routes_audit.py), before it, so the bundle holds it:
        # who read a team's log is part of that log.
        await trail.record(
            log_id,
            actor=service_actor("admin command"),
            action=Action.AUDIT_EXPORTED,
            target=f"team:{log_id}",
            details={},
        )
        with output.open("wb") as stream:
            await trail.export_to(log_id, stream)
    print(f"wrote {output}; verify with: tucdesk-audit verify {output} --key AUDIT_KEY_PEM "
          "(tucdesk-rendezvous keys show --pem audit-signer)")
    return EXIT_OK


async def _keys_show(config: ServiceConfig, pem_role: str | None) -> int:
    keys = load_service_keys(config.data_dir)
    if pem_role is not None:
        sys.stdout.write(keys.by_role()[pem_role].public.to_pem().decode("ascii"))
        return EXIT_OK
    async with _admin_store(config) as store:
        keys = await with_retired_keys(store, keys)
    now = time.time()
    for role, key in keys.by_role().items():
        print(f"{role}: {key.public.fingerprint} kid={key.public.key_id}")
    for retired in keys.retired:
        print(
            f"{retired.role}: {retired.public.fingerprint} kid={retired.public.key_id} "
            f"({retired.describe_state(now)}; replaced by {retired.replaced_by})"
        )
    print(json.dumps(keys.jwks(now), indent=2))
    return EXIT_OK


async def _keys_rotate(config: ServiceConfig, role: str, retire_old_now: bool) -> int:
    from rendezvous.key_rotation import rotate_service_key

    async with _admin_store(config) as store:
        rotation = await rotate_service_key(
            store, config.data_dir, role, issuer=config.issuer, retire_old_now=retire_old_now,
            now=time.time(),
        )  # fmt: skip
    until = (
        "refused by each running instance once it reloads (--retire-old-now; see below)"
        if retire_old_now
        else "accepted until " + time.strftime("%H:%M:%SZ", time.gmtime(rotation.accept_old_until))
    )
    print(f"{role}: {rotation.old_key.fingerprint} -> {rotation.new_key.fingerprint} "
          f"kid={rotation.new_key.key_id}")
    print(f"old key: private key file deleted; tokens it signed {until}; recorded "
          f"service_key.rotated in {rotation.logs_recorded} audit logs")
    print(rotation.takes_effect())
    print(f"an instance on another host needs {config.data_dir / 'keys'} copied to it unless "
          "the directory is shared (it logs an ERROR each minute until its key files match)")
    if role == "jwt-issuer":
        print("agents follow the rotation (signed by the old key) as soon as the instance they "
              "are connected to reloads, or when they next connect")
    if role == "relay-token":
        print("relays with jwks take the new key on its first use; relays with token_key files "
              "refuse new sessions until given it: tucdesk-rendezvous keys show --pem relay-token")
    if role == "policy-signer":
        print("agents enrolled before this rotation refuse policies the new key countersigns: "
              "re-enroll them (docs/self-hosting.md, 'Rotating service keys')")
    return EXIT_OK


def _serve_checked(config: ServiceConfig, while_running: bool = False) -> int:
    config.validate_for_serving()  # a setting that cannot work is named first
    require_existing_store(config)
    return _serve(config, while_running)


def _serve(config: ServiceConfig, while_running: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    log_start(config)
    if backend_for(config.database_url)[0] == "postgres":
        # Migrated here, once, before any worker starts: refused while others are connected.
        # (On SQLite the instance migrates under its serve lock, which shuts others out.)
        _run(_prepare_postgres, config, while_running)
    if config.workers > 1:
        from rendezvous.server import check_tls_files
        from rendezvous.workers import serve_with_workers

        # TLS files are named here, once, rather than in each worker's dying words.
        if config.tls_cert is not None and config.tls_key is not None:
            check_tls_files(config.tls_cert, config.tls_key, time.time())

        return serve_with_workers(config)
    from rendezvous.server import run_service, termination_signal

    trio.run(
        partial(
            run_service, config, shutdown_trigger=termination_signal, reload_on_hangup=True
        )
    )
    return EXIT_OK


async def _prepare_postgres(config: ServiceConfig, while_running: bool) -> int:
    """Apply pending migrations (refused while others are connected) and check that the server
    has room for this serve's connections."""
    from rendezvous.store.postgres import PostgresStore

    async with open_store(
        config.database_url, migrate_while_running=while_running, **config.store_options()
    ) as store:
        assert isinstance(store, PostgresStore)
        capacity = await store.connection_capacity()
    warn_about_connections(config, capacity)
    return EXIT_OK


def warn_about_connections(config: ServiceConfig, capacity: ConnectionCapacity) -> None:
    """Log this serve's connection need against the server's room; WARNING when it may not fit."""
    needed = config.workers * config.database_pool_size
    room = capacity.available + 1  # this check's own connection is closed before serving
    logger.info(
        "PostgreSQL connections: this serve opens up to %d (%d worker(s) x database_pool_size "
        "%d); the server has max_connections %d, %d reserved, %d in use",
        needed, config.workers, config.database_pool_size, capacity.max_connections,
        capacity.reserved, capacity.connected - 1,
    )  # fmt: skip
    if needed > room:
        logger.warning(
            "PostgreSQL may run out of connections: this serve may open %d (%d worker(s) x "
            "database_pool_size %d) but only %d are left (max_connections %d - reserved %d - "
            "%d in use); under load requests will fail with 'database is unavailable'. Keep "
            "instances x workers x database_pool_size under max_connections - reserved: lower "
            "database_pool_size or workers, or raise max_connections (docs/self-hosting.md, "
            "'Database sizing')",
            needed, config.workers, config.database_pool_size, room,
            capacity.max_connections, capacity.reserved, capacity.connected - 1,
        )  # fmt: skip


def log_start(config: ServiceConfig) -> None:
    """Log what this service is about to serve (no secrets); warn about what cannot work."""
    relays = ", ".join(f"{r.id}={r.host}:{r.port}" for r in config.relays) or "none"
    scheme = "https" if config.tls_cert is not None else "http"
    logger.info(
        "%s %s starting: store %s, data dir %s, listening on %s://%s, %d worker(s), relays: %s",
        PROGRAM, installed_version(), describe_database(config.database_url),
        config.data_dir.resolve(), scheme, config.listen, config.workers, relays,
    )  # fmt: skip
    if config.metrics_listen is not None:
        logger.info("metrics: http://%s/metrics (not on the API port)", config.metrics_listen)
    if not config.relays:
        logger.warning(
            "no relay is configured: every session request will be refused (no_relay); add "
            'relays = ["ID=HOST:PORT"] to the configuration, TUCDESK_RELAYS or --relay'
        )


def dispatch(args: argparse.Namespace) -> int:
    """Run the chosen command; errors propagate to main for one-line reporting."""
    if args.command == "serve":
        # A SIGHUP (a TLS reload sent early) must not end a service still starting: ignored
        # until the instance's own receiver takes it over.
        previous_hangup = signal.signal(signal.SIGHUP, signal.SIG_IGN)
        try:
            return _serve_checked(_config(args), args.while_running)
        finally:
            signal.signal(signal.SIGHUP, previous_hangup)
    config = _config(args)
    if args.command == "init":
        return _run(_init, config, args.while_running)
    require_existing_store(config)
    if args.command == "db":
        if args.db_command == "prune":
            return _run(_db_prune, config, parse_duration(args.older_than), args.dry_run)
        return _run(_db_status, config)
    if args.command == "backup":
        return _backup(config, args.output, args.force)
    if args.command == "team":
        if args.team_command == "create":
            return _run(_team_create, config, args.name)
        if args.team_command == "reset-policy":
            return _run(_team_reset_policy, config, args.team)
        return _run(_team_list, config)
    if args.command == "operator":
        if args.operator_command == "disable":
            return _run(_operator_disable, config, args.team, args.operator)
        return _run(_operator_list, config, args.team)
    if args.command == "invite":
        if args.invite_command == "list":
            return _run(_invite_list, config, args.team, args.all)
        if args.invite_command == "revoke":
            return _run(_invite_revoke, config, args.team, args.invite_id)
        ttl = parse_duration(args.ttl) if args.ttl else config.invite_seconds
        return _run(
            _invite_create, config, args.team, args.email, args.role, ttl, args.another_key
        )
    if args.command == "audit":
        return _run(_audit_export, config, args.team, args.output)
    if args.command == "keys":
        if args.keys_command == "rotate":
            return _run(_keys_rotate, config, args.purpose, args.retire_old_now)
        return _run(_keys_show, config, args.pem)
    raise ConfigError(f"unknown command {args.command}")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the command, and turn failures into one line and an exit code."""
    open_dev_null_on_closed_standard_fds()  # before any socket can take fd 0-2
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except Exception as raised:  # noqa: BLE001 - one line for the user; --debug has the rest
        if args.debug:
            traceback.print_exc()
        error = sole_error(raised)
        if isinstance(error, REPORTED_ERRORS):
            message = getattr(error, "message", None) or str(error) or type(error).__name__
            print(f"tucdesk-rendezvous: {message}", file=sys.stderr)
        else:
            print(
                f"tucdesk-rendezvous: unexpected {type(error).__name__}; rerun with --debug",
                file=sys.stderr,
            )
        return EXIT_FAILURE


REPORTED_ERRORS = (ConfigError, ServiceError, StoreError, ProtocolError, OSError)


def sole_error(error: BaseException) -> BaseException:
    """The one error inside nested single-error exception groups (trio nurseries make them)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


if __name__ == "__main__":
    sys.exit(main())
