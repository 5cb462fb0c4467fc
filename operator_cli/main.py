"""Entry point for `tucdesk`, the operator command line.

Account commands: login (enroll with an invite, or sign a fresh challenge), logout, whoami;
agent registration keys (keys create/list/revoke); API keys for integrations (api-keys
create/list/revoke); agents (list, trust, remove); operators (list, disable:
operator_commands.py); sessions (the team's, newest first:
session_listing.py); audit export. Sessions: connect, exec, ssh (session_commands.py; exec
--tag: tagged_exec.py). Policy:
policy show/set/test, roster show/sign (policy_commands.py); approvals, approve, deny
(approval_commands.py). State lives in the CLI home (``--home``, ``TUCDESK_HOME``, or the XDG
config dir).
"""

from __future__ import annotations

import argparse
import getopt
import importlib
import json
import os
import select
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from operator_cli.agent_listing import (
    PAGE_SIZE,
    AgentFilter,
    AgentListError,
    fetch_agents,
)
from operator_cli.client import ApiError, Session, enroll, login, open_http
from operator_cli.home import (
    CliHome,
    HomeError,
    Settings,
    default_home,
    read_ca_certificates,
)
from operator_cli.http import CaFileError, ResponseTooLargeError, TransportError
from operator_cli.known_agents import STRICT_AGENT_KEYS_ENV
from operator_cli.session_listing import (
    SESSIONS_PATH,
    SessionFilter,
    fetch_sessions,
    session_details,
    session_table,
)
from operator_cli.terminal_text import visible
from protocol.errors import ProtocolError
from protocol.stdio_fds import open_dev_null_on_closed_standard_fds
from protocol.version import VersionAction


def _imported_on_use(module: str, name: str) -> Callable[..., int]:
    """A command implementation imported only when its command runs.

    Start-up is most of a short command's wall time (`tucdesk exec` is measured against `ssh
    host true`), so each command loads only what it uses: the session stack (trio, the frame
    and handshake code) stays out of `tucdesk agents`, `sessions`, `login` and `--help`, and the
    policy, approval, demo and selfcheck modules out of everything but their own commands.
    """

    def call(*args: Any, **kwargs: Any) -> int:
        exit_code: int = getattr(importlib.import_module(module), name)(*args, **kwargs)
        return exit_code

    return call


run_selfcheck = _imported_on_use("operator_cli.selfcheck", "run_selfcheck")
run_demo = _imported_on_use("operator_cli.demo", "run_demo")
policy_show = _imported_on_use("operator_cli.policy_commands", "policy_show")
policy_set = _imported_on_use("operator_cli.policy_commands", "policy_set")
policy_test = _imported_on_use("operator_cli.policy_commands", "policy_test")
roster_show = _imported_on_use("operator_cli.policy_commands", "roster_show")
roster_sign = _imported_on_use("operator_cli.policy_commands", "roster_sign")
approvals_command = _imported_on_use("operator_cli.approval_commands", "approvals_command")
approvals_withdraw_command = _imported_on_use(
    "operator_cli.approval_commands", "approvals_withdraw_command"
)
approvals_show_command = _imported_on_use(
    "operator_cli.approval_commands", "approvals_show_command"
)
approve_command = _imported_on_use("operator_cli.approval_commands", "approve_command")
deny_command = _imported_on_use("operator_cli.approval_commands", "deny_command")
# trio and the session stack load only for the commands that open sessions.
agents_trust = _imported_on_use("operator_cli.session_commands", "agents_trust")
agents_remove = _imported_on_use("operator_cli.agent_removal", "agents_remove")
sessions_end = _imported_on_use("operator_cli.session_end", "sessions_end")
agents_tag = _imported_on_use("operator_cli.agent_tagging", "agents_tag")
operators_list = _imported_on_use("operator_cli.operator_commands", "operators_list")
operators_disable = _imported_on_use("operator_cli.operator_commands", "operators_disable")
connect_command = _imported_on_use("operator_cli.session_commands", "connect_command")
exec_command = _imported_on_use("operator_cli.session_commands", "exec_command")
ssh_command = _imported_on_use("operator_cli.session_commands", "ssh_command")
exec_on_tagged = _imported_on_use("operator_cli.tagged_exec", "exec_on_tagged")

EXIT_OK = 0
EXIT_FAILURE = 1
FREEZE_ROSTER_HELP = (
    "publish even a roster that names no active admin as admin (the rendezvous refuses it "
    "otherwise, roster_would_freeze): for a compromised admin key, on purpose. Nobody can then "
    "sign a policy or roster that agents accept, and no operator invited since can open a "
    "session, until the server admin runs `tucdesk-rendezvous team reset-policy` and each "
    "agent is re-enrolled (docs/policy.md)"
)
EXIT_INTERRUPTED = 130
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for `git log | head`
EXIT_USAGE = 2  # argparse's
EXIT_CONNECTION_FAILED = 255
# ssh's options that `tucdesk ssh` knows, as getopt spells them, for those after AGENT.
SSH_OPTIONS_AFTER_AGENT = "ntl:Tqo:"
# The session grant's exec limits (protocol/session_grant.py), for --help.
EXEC_MAX_ARGUMENTS = 256
EXEC_MAX_COMMAND_BYTES = 4096
EXPORT_CHUNK_BYTES = 64 * 1024
DEFAULT_SESSIONS_LISTED = 50
# exec --tag: sessions at once. At most half the relay's default per-source burst (relay/config.py
# rate_burst = 40): every session opens a relay connection from this host, and two when its
# agent runs on the same host (one source).
DEFAULT_PARALLEL_SESSIONS = 8
MAX_PARALLEL_SESSIONS = 20
# The service's API_KEY_SCOPES (rendezvous/auth.py), for --help; the service checks them.
API_KEY_SCOPES = ("agents:read", "audit:read", "registration_keys:read",
                  "registration_keys:write", "sessions:read")
SESSION_STATES = ("offered", "accepted", "refused", "ended")

Command = Callable[[argparse.Namespace, CliHome], int]


def parse_duration(text: str) -> int:
    """Seconds in a duration such as ``90s``, ``30m``, ``1h`` or ``7d`` (bare numbers: seconds)."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    multiplier = units.get(text[-1:])
    number = text[:-1] if multiplier else text
    if not number.isdigit() or int(number) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 1h or 7d")
    return int(number) * (multiplier or 1)


def parse_since(text: str, now: float | None = None) -> float:
    """The Unix time ``--since`` names: a duration ago (``90s``, ``30m``, ``1h``, ``7d``), a
    Unix time (``1767225600``), or an ISO 8601 date or time (UTC unless it names a zone)."""
    cleaned = text.strip()
    if cleaned[-1:].lower() in ("s", "m", "h", "d") and cleaned[:-1].isdigit():
        return (time.time() if now is None else now) - parse_duration(cleaned)
    if cleaned.isascii() and cleaned.replace(".", "", 1).isdigit():
        return float(cleaned)
    try:
        moment = datetime.fromisoformat(cleaned)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (1h, 7d), a Unix time or a date like 2026-11-25"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(moment.timestamp(), 0.0)


def _usage_error(parser: argparse.ArgumentParser, status: int, message: str) -> None:
    """argparse's usage error (usage and message on stderr), exiting with ``status``."""
    parser.print_usage(sys.stderr)
    parser.exit(status, f"{parser.prog}: error: {message}\n")


class OperatorParser(argparse.ArgumentParser):
    """The top-level parser: a usage error it finds after the command was chosen (a word the
    command does not know) exits with that command's usage status, as the command would."""

    usage_exit_status = EXIT_USAGE

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        self.usage_exit_status = getattr(parsed, "usage_exit_status", EXIT_USAGE)
        return parsed, extras

    def error(self, message: str) -> None:  # type: ignore[override]
        _usage_error(self, self.usage_exit_status, message)


class CommandParser(argparse.ArgumentParser):
    """A command's parser that also keeps the words it was given, as typed, in
    ``command_words``: argparse drops the ``--`` it takes for the end of the options, and
    ``exec --tag`` must see where the user put it. A usage error exits with the command's
    ``usage_exit_status`` default (argparse's 2 unless the command sets another)."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        words = list(sys.argv[1:] if args is None else args)
        namespace = argparse.Namespace() if namespace is None else namespace
        # Set before parsing: a nested command (agents tag) then keeps its own words.
        namespace.command_words = words
        return super().parse_known_args(words, namespace)

    def error(self, message: str) -> None:  # type: ignore[override]
        _usage_error(self, self.get_default("usage_exit_status") or EXIT_USAGE, message)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; --help describes every command."""
    parser = OperatorParser(
        prog="tucdesk",
        description="TucDesk operator command line.",
        epilog="State (server, operator key, cached token) lives in --home, TUCDESK_HOME, "
        "or $XDG_CONFIG_HOME/tucdesk.",
    )
    parser.add_argument("--home", type=Path, help="CLI home directory")
    parser.add_argument("--version", action=VersionAction)
    parser.add_argument(
        "--server",
        help="rendezvous URL, e.g. https://rendezvous.example:8443 (login: the server to log in "
        "to; other commands refuse one that is not the server you are logged in to)",
    )
    parser.add_argument("--ca-file", help="PEM CA bundle that signed the server's certificate "
                        "(for this command; login saves it for later ones)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument(
        "--strict-agent-keys", action="store_true",
        help="refuse an agent whose key is not pinned yet instead of pinning it on first use "
        "(as ssh's StrictHostKeyChecking=yes; also TUCDESK_STRICT_AGENT_KEYS=1); pin expected "
        "keys with: agents trust AGENT --fingerprint SHA256:...",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=CommandParser)

    login_parser = commands.add_parser(
        "login", help="log in (first time: enroll with --invite CODE)"
    )
    login_parser.add_argument("--server", dest="login_server", help="rendezvous URL")
    login_parser.add_argument("--ca-file", dest="login_ca_file", help="PEM CA bundle")
    login_parser.add_argument("--invite", help="one-time invite code from an admin")
    login_parser.set_defaults(handler=_login)

    commands.add_parser("logout", help="revoke and forget the access token").set_defaults(
        handler=_logout
    )
    commands.add_parser("whoami", help="show who the service thinks you are").set_defaults(
        handler=_whoami
    )

    keys = commands.add_parser("keys", help="agent registration keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = keys_commands.add_parser(
        "create", help="create a single-use registration key (printed on the last line)"
    )
    create.add_argument("--tags", default="", help="comma-separated tags, e.g. web,prod")
    create.add_argument("--ttl", type=parse_duration, help="lifetime such as 1h (default 1h)")
    create.set_defaults(handler=_keys_create)
    keys_commands.add_parser("list", help="list registration keys").set_defaults(
        handler=_keys_list
    )
    revoke = keys_commands.add_parser("revoke", help="revoke a registration key")
    revoke.add_argument("key_id", metavar="ID")
    revoke.set_defaults(handler=_keys_revoke)

    api_keys = commands.add_parser(
        "api-keys",
        help="API keys for integrations (admins)",
        description="Bearer keys for scripts and integrations (a SIEM, a dashboard, CI): each "
        "holds only the scopes it is created with, and is sent as 'Authorization: Bearer KEY'.",
    )
    api_keys_commands = api_keys.add_subparsers(
        dest="api_keys_command", required=True, metavar="ACTION"
    )
    api_create = api_keys_commands.add_parser(
        "create", help="create an API key (printed once, on the last line)"
    )
    api_create.add_argument("name", metavar="NAME", help="what the key is for, e.g. siem")
    api_create.add_argument(
        "--scope", dest="scopes", action="append", required=True, metavar="SCOPE",
        help=f"repeatable: {', '.join(API_KEY_SCOPES)}",
    )  # fmt: skip
    api_create.set_defaults(handler=_api_keys_create)
    api_keys_commands.add_parser(
        "list", help="list the team's API keys (never the keys themselves)"
    ).set_defaults(handler=_api_keys_list)
    api_revoke = api_keys_commands.add_parser(
        "revoke", help="revoke an API key (refused from its next request on)"
    )
    api_revoke.add_argument("api_key_id", metavar="ID")
    api_revoke.set_defaults(handler=_api_keys_revoke)

    agents = commands.add_parser(
        "agents",
        help="list your team's agents (or: agents trust, agents remove, agents tag)",
        description="List your team's agents (all of them: page after page), by name.",
    )
    agents.add_argument("--json", action="store_true", help="print JSON (one document)")
    agents.add_argument("--tag", action="append", default=[], metavar="TAG",
                        help="only agents carrying TAG (repeat: carrying all of them)")
    state = agents.add_mutually_exclusive_group()
    state.add_argument("--online", dest="online", action="store_const", const=True,
                       help="only online agents")
    state.add_argument("--offline", dest="online", action="store_const", const=False,
                       help="only offline agents")
    agents.add_argument("--name", metavar="PREFIX", help="only agents whose name starts so")
    agents.add_argument("--limit", type=_positive_count, metavar="N",
                        help="stop after N agents (default: list them all)")
    agents.add_argument("--page-size", type=_page_size, default=PAGE_SIZE, metavar="N",
                        help=f"agents per request (at most {PAGE_SIZE}, the default)")
    agents.set_defaults(handler=_agents)
    agents_commands = agents.add_subparsers(dest="agents_command", metavar="ACTION")
    trust = agents_commands.add_parser(
        "trust",
        help="accept an agent's current key (after a deliberate re-enrollment or key rotation)",
        description="Pin the key the rendezvous lists for AGENT, for its id and its name, in "
        "place of the pinned ones, after showing the fingerprints and asking for confirmation. "
        "While several agents share the name (an old registration not removed yet), give the "
        "id. With --fingerprint (scripts, CI jobs) nothing is asked: the key is pinned only if "
        "it is exactly the expected one, and refused otherwise.",
    )
    trust.add_argument("agent", metavar="AGENT", help="agent name or id")
    trust.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    trust.add_argument(
        "--fingerprint", metavar="SHA256:...",
        help="the key fingerprint you expect (tucdesk-agent status on the host shows it): pin "
        "only a key with exactly this fingerprint, refuse any other",
    )
    trust.set_defaults(handler=_agents_trust)
    remove = agents_commands.add_parser(
        "remove",
        help="remove an agent for good: a lost, stolen or retired host (admins)",
        description="Remove NAME_OR_ID from your team: the rendezvous refuses its key from now on "
        "(a saved copy of its state cannot connect either), closes its live control channel, "
        "and drops it from the list, so its name is free for the host's next enrollment. Its "
        "sessions stay in the history and the removal is audited (agent.removed). Shows the "
        "agent's name, id, key fingerprint and last-seen time and asks for confirmation; "
        "without a terminal it removes nothing unless --yes. To bring the host back, enroll "
        "it again with a new registration key (tucdesk-agent enroll --force).",
    )
    remove.add_argument("agent", metavar="NAME_OR_ID", help="agent name or id")
    remove.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    remove.set_defaults(handler=_agents_remove)
    tag = agents_commands.add_parser(
        "tag",
        help="show or change an agent's tags (admins)",
        description="Show the agent's tags, or change them without re-enrolling the host: --set "
        "replaces them all, then --add adds and --remove takes away (each repeatable). Tags are "
        "lower-cased, 1..64 of a-z 0-9 - _ . : =. The change is audited (agent.tags_changed) "
        "and pending like a roster change: policy decides on signed tags, so it counts once an "
        "admin runs `tucdesk roster sign`.",
    )
    tag.add_argument("agent", metavar="NAME_OR_ID", help="agent name or id")
    tag.add_argument("--add", action="append", default=[], metavar="TAG", help="add TAG")
    tag.add_argument("--remove", action="append", default=[], metavar="TAG", help="remove TAG")
    tag.add_argument("--set", dest="replace", metavar="TAG,TAG",
                     type=lambda text: text.split(",") if text else [],
                     help="replace all tags with these (comma-separated; '' for none)")
    tag.set_defaults(handler=_agents_tag)

    operators = commands.add_parser(
        "operators",
        help="list your team's operators, or disable one (admins)",
        description="List your team's operators: email, id, role, state (active or disabled) "
        "and when each enrolled. Admins only.",
    )
    operators.add_argument("--json", action="store_true", help="print JSON (one document)")
    operators.set_defaults(handler=_operators)
    operators_commands = operators.add_subparsers(dest="operators_command", metavar="ACTION")
    disable = operators_commands.add_parser(
        "disable",
        help="disable an operator and end their open sessions (admins)",
        description="Disable EMAIL_OR_ID: their access tokens stop working at once, their key "
        "can no longer log in, the API keys they created and the unused registration keys they "
        "(or those API keys) created are revoked, their pending approval requests are "
        "withdrawn, approvals they granted are refused when used, and every shell or exec "
        "session they still have open ends (each agent ends it and tells them why). Prints how "
        "many keys were revoked. Agents keep their key in the signed roster until an admin "
        "runs `tucdesk roster sign` (the rendezvous cannot sign it). Audited "
        "(operator.revoked); the team's last active admin cannot be disabled, nor (without "
        "--freeze-roster) the last active admin of the signed roster. There is no "
        "enable: invite them again instead. Shows who and how many open sessions will end and "
        "asks for confirmation; without a terminal it disables nobody unless --yes.",
    )
    disable.add_argument("operator", metavar="EMAIL_OR_ID", help="operator email or id")
    disable.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    disable.add_argument(
        "--freeze-roster", action="store_true",
        help="disable even the last active admin of the team's signed roster (a compromised "
        "key): nobody can then sign a policy or roster that agents accept, and no operator "
        "invited since can open a session, until the server admin runs `tucdesk-rendezvous "
        "team reset-policy` and each agent is re-enrolled (docs/policy.md)",
    )  # fmt: skip
    disable.set_defaults(handler=_operators_disable)

    sessions = commands.add_parser(
        "sessions",
        help="list your team's sessions, newest first (or: sessions show ID, sessions end ID)",
        description="List your team's sessions, newest first: who ran what on which agent, "
        "and how it went. Admins and auditors see the whole team's; any other operator sees "
        f"only their own. Shows the newest {DEFAULT_SESSIONS_LISTED} unless --limit says "
        "otherwise (table and --json alike).",
    )
    sessions.add_argument("--json", action="store_true", help="print JSON (one document)")
    sessions.add_argument("--state", action="append", default=[], choices=SESSION_STATES,
                          help="only sessions in STATE (repeat: in any of them)")
    sessions.add_argument("--agent", metavar="NAME_OR_ID",
                          help="only sessions on this agent (a removed one too: its id, or its "
                          "name once no current agent has it)")
    sessions.add_argument("--operator", metavar="EMAIL_OR_ID",
                          help="only this operator's sessions (an email: every id it had)")
    sessions.add_argument("--since", type=parse_since, metavar="WHEN",
                          help="only sessions created since WHEN: a duration ago (30m, 1h, 7d), "
                          "a Unix time, or an ISO date/time (UTC unless it names a zone)")
    sessions.add_argument("--limit", type=_positive_count, default=DEFAULT_SESSIONS_LISTED,
                          metavar="N", help="list at most the newest N sessions "
                          f"(default {DEFAULT_SESSIONS_LISTED})")
    sessions.add_argument("--page-size", type=_page_size, default=PAGE_SIZE, metavar="N",
                          help=f"sessions per request (at most {PAGE_SIZE}, the default)")
    sessions.set_defaults(handler=_sessions)
    sessions_commands = sessions.add_subparsers(dest="sessions_command", metavar="ACTION")
    show_session = sessions_commands.add_parser(
        "show",
        help="one session in full: who ran what where, the policy's ruling, how it ended",
        description="Show one session of your team (yours, or any if you are an admin or "
        "auditor), with every field the service keeps for it.",
    )
    show_session.add_argument("session_id", metavar="SESSION_ID", help="e.g. ses_...")
    show_session.add_argument("--json", action="store_true", help="print JSON (one document)")
    show_session.set_defaults(handler=_session_show)
    end_session = sessions_commands.add_parser(
        "end",
        help="end an open session now, or every open one of an agent or operator (admins)",
        description="End one open session of your team, or every open session of one agent "
        "(--agent) or one operator (--operator), without disabling or removing anyone. The "
        "agent stops the shell or command at once and the operator is told why; the end is "
        "audited (session.ended by you, reason ended_by_admin) and the output says whether "
        "the agent was reached. Shows the sessions and asks for confirmation; without a "
        "terminal it ends nothing unless --yes.",
    )
    end_session.add_argument("session_id", metavar="SESSION_ID", nargs="?",
                             help="e.g. ses_... (or give --agent or --operator)")
    end_session.add_argument("--agent", metavar="NAME_OR_ID",
                             help="end every open session on this agent")
    end_session.add_argument("--operator", metavar="EMAIL_OR_ID",
                             help="end every open session of this operator")
    end_session.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    end_session.set_defaults(handler=_session_end)

    connect = commands.add_parser(
        "connect",
        help="open an interactive shell on an agent",
        description="Open an end-to-end encrypted shell on AGENT through the relay. Type ~. "
        "after a newline to disconnect, ~? for the other escapes. Exits with the remote "
        "shell's status, or 255 when the session cannot be set up.",
    )
    connect.add_argument("agent", metavar="AGENT", help="agent name or id")
    connect.add_argument(
        "-e", dest="escape_char", default="~", metavar="CHAR",
        help="escape character (default ~; ^] and the like for a control character; 'none' "
        "turns escapes off)",
    )
    # Caught to say what to use instead (ssh host CMD runs CMD; here that is exec).
    connect.add_argument("remote_command", nargs="*", help=argparse.SUPPRESS)
    _add_approval_flags(connect)
    # Session commands exit 255 on a usage error, as ssh does: 2 could be the remote status.
    connect.set_defaults(handler=_connect, command_parser=connect,
                         usage_exit_status=EXIT_CONNECTION_FAILED)

    exec_parser = commands.add_parser(
        "exec",
        help="run a command on an agent: tucdesk exec AGENT -- CMD [ARGS...]",
        description="Run CMD on AGENT like 'ssh host cmd': remote stdout and stderr go to ours, "
        "stdin is piped through (not read from a terminal unless --stdin), and the exit status "
        "is the command's (128+N for signal N; 127 if it is not found, 126 if it cannot run; "
        "255 when the session cannot be set up). CMD runs as an argv, without a remote shell: "
        "for a command line through sh -c, as ssh runs it, use tucdesk ssh. Options go before "
        "AGENT, or between AGENT and -- (tucdesk exec AGENT -n -- CMD); without --, "
        "everything after AGENT is the command.",
        epilog=f"Limits: at most {EXEC_MAX_ARGUMENTS} arguments and {EXEC_MAX_COMMAND_BYTES} "
        "bytes in all, counting each argument's UTF-8 bytes plus 3 (a character outside ASCII "
        "or a control character counts 6): the signed session grant carries the command. "
        "Checked before anything is sent. For more, send it on stdin: "
        "tucdesk exec AGENT -- sh -s < script.sh, or ... | tucdesk exec AGENT -- xargs CMD.",
        usage="tucdesk exec [-h] [-n] [--stdin] [-t] [--no-wait] [--approval ID] AGENT "
        "[OPTIONS] [--] CMD [ARGS...]\n       tucdesk exec [-n] --tag TAG [--tag TAG...] -- CMD "
        "[ARGS...]",
    )
    exec_parser.add_argument(
        "-n", dest="no_stdin", action="store_true", help="never read stdin (send end of input)"
    )
    exec_parser.add_argument(
        "--stdin", dest="force_stdin", action="store_true",
        help="read stdin even when it is a terminal",
    )
    exec_parser.add_argument(
        "-t", dest="want_pty", action="count", default=0,
        help="run the command on a terminal, like ssh -t (for top, vim, sudo asking for a "
        "password): our terminal goes raw, its size follows, ~. and the other escapes of "
        "connect work, and output comes as one stream, as through ssh -t. Only when stdin is "
        "a terminal; -tt forces it",
    )
    exec_parser.add_argument(
        "--tag", dest="exec_tags", action="append", default=[], metavar="TAG",
        help="instead of AGENT: run on every agent carrying TAG (repeat: all of them), "
        "--parallel at a time, each output line prefixed with the agent's name; stdin is not "
        "read; a summary of exit statuses ends on stderr; exits 0 if every agent ran it and "
        "succeeded, 1 if a command failed or did not run (offline agents are listed, not "
        "run), 255 if nothing could be set up (service unreachable, no agent with the tag): "
        "tucdesk exec --tag web -- uptime",
    )
    exec_parser.add_argument(
        "--parallel", "-P", type=_parallel_sessions, default=None,
        metavar="N",
        help=f"with --tag: at most N sessions at once (default {DEFAULT_PARALLEL_SESSIONS}, at "
        f"most {MAX_PARALLEL_SESSIONS}: each is a process of its own and a relay connection, "
        "and the relay lets one source open rate_burst (default 40) connections at once, then "
        "rate_limit (default 10) a second; beyond that it refuses them)",
    )
    exec_parser.add_argument(
        "--json", action="store_true",
        help="with --tag: end with one JSON document on stdout: succeeded, total, and per "
        "agent name, id, online, exit_status (null if it did not run or gave none) and note "
        "(why); the agents' prefixed output then all goes to stderr, so stdout is the "
        "document alone. When nothing could be set up (exit 255) the document is "
        '{"succeeded": 0, "total": 0, "agents": [], "error": "why"}',
    )
    # exec --tag's children write the remote exit status here (tagged_exec.py); not for users.
    exec_parser.add_argument("--status-fd", type=int, help=argparse.SUPPRESS)
    exec_parser.add_argument("agent", metavar="AGENT", help="agent name or id")
    exec_parser.add_argument(
        "remote_command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]",
        help="the command and its arguments",
    )
    _add_approval_flags(exec_parser)
    exec_parser.set_defaults(handler=_exec, command_parser=exec_parser,
                             usage_exit_status=EXIT_CONNECTION_FAILED)

    ssh = commands.add_parser(
        "ssh",
        help="run a command line with sh -c on an agent, as ssh does (rsync -e, git)",
        description="Run COMMAND on AGENT the way 'ssh host COMMAND' does: the words after "
        "AGENT are joined with single spaces and the line runs with 'sh -c' on the agent, in "
        "the agent account's working directory, so quoting and globbing work as through ssh. "
        "Made to be the remote shell of other tools: rsync -e 'tucdesk ssh', "
        "GIT_SSH_COMMAND='tucdesk ssh' (git's 'simple' ssh variant: no -p, no options "
        "after the host). Policy and audit see the command as [\"sh\", \"-c\", LINE]. Streams, "
        "exit status and limits are exec's (tucdesk exec --help); there is no interactive "
        "shell here (that is tucdesk connect). As with ssh, options may also follow AGENT "
        "(tucdesk ssh AGENT -n CMD) up to the first word that is not one, or a --.",
        usage="tucdesk ssh [-h] [-n] [-t] [-l USER] [-T] [-q] [-o OPTION] AGENT [OPTIONS] [--] "
        "COMMAND ...",
    )
    ssh.add_argument("-n", dest="no_stdin", action="store_true",
                     help="never read stdin (send end of input)")
    ssh.add_argument("-l", dest="login_user", metavar="USER",
                     help="refused: the agent runs every session as its one configured account")
    ssh.add_argument("-t", dest="want_pty", action="count", default=0,
                     help="run the line on a terminal, as ssh -t does (exec -t: only when "
                     "stdin is a terminal; -tt forces it)")
    ssh.add_argument("-T", dest="no_pty", action="store_true",
                     help="no terminal (the default; wins over -t)")
    ssh.add_argument("-q", dest="quiet", action="store_true",
                     help="accepted and ignored: tucdesk ssh prints only errors anyway")
    ssh.add_argument("-o", dest="ssh_config_options", action="append", default=[],
                     metavar="OPTION", help="refused: there is no ssh configuration here")
    # AGENT and the rest in one list: argparse would drop a -- right after AGENT, and
    # `ssh AGENT -- -l x` (a command) must not read as `ssh AGENT -l x` (options).
    ssh.add_argument("ssh_words", nargs=argparse.REMAINDER, metavar="AGENT [--] COMMAND",
                     help="agent name or id, then the command line (words joined with spaces)")
    ssh.set_defaults(handler=_ssh, command_parser=ssh, usage_exit_status=EXIT_CONNECTION_FAILED)
    _add_policy_commands(commands)

    demo = commands.add_parser(
        "demo",
        help="start a whole local TucDesk (rendezvous, relay, agent) and open a shell on it",
        description="Start a rendezvous (SQLite, TLS under a fresh local CA), a relay and an "
        "agent on 127.0.0.1 in a temporary directory, enroll them, and open a shell on the "
        "agent through the relay, or run --exec CMD and exit with its status. Everything is "
        "stopped and removed on exit.",
    )
    demo.add_argument("--exec", dest="demo_exec", metavar="CMD",
                      help="run CMD (a shell command line) instead of opening a shell")
    demo.add_argument("--keep", action="store_true",
                      help="keep the temporary directory (logs, keys) after exit")
    demo.set_defaults(handler=_demo)

    audit = commands.add_parser("audit", help="audit log")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    export = audit_commands.add_parser(
        "export", help="download the team's audit bundle (auditor or admin role)"
    )
    export.add_argument(
        "-o", "--output", type=Path,
        help="file to write (default, or -: stdout); downloaded to a temporary file beside it and "
        "renamed into place (mode 0600) only once the whole bundle arrived, so a failed "
        "download leaves no partial file and an existing one untouched",
    )
    export.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="show (or never show) a progress line on stderr while downloading: bytes and "
        "lines received, rate (default: only when stderr is a terminal)",
    )
    export.set_defaults(handler=_audit_export)

    selfcheck = commands.add_parser(
        "selfcheck",
        help="check the end-to-end protocol core on this machine (no network)",
        description="Run a full operator/agent handshake in memory, seal frames both ways, and "
        "check that tampered, replayed and reflected frames, a wrong pinned agent key and a "
        "refused grant each fail.",
    )
    selfcheck.set_defaults(handler=lambda args, home: run_selfcheck())
    # Further commands register here with set_defaults(handler=…).
    return parser


def _add_approval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-wait", action="store_true",
        help="when the policy asks for approval, submit the request, print its id and exit 0 "
        "without running anything (run again with --approval ID once approved); without it the "
        "command waits, saying on stderr who may approve and, every minute, that it still waits",
    )
    parser.add_argument(
        "--approval", metavar="ID", help="use the approval request ID from an earlier --no-wait"
    )
    parser.add_argument(
        "--approval-timeout", type=parse_duration, metavar="DURATION",
        help="wait at most DURATION (90s, 10m, 1h) for an approver, then withdraw the request "
        "and exit 255 (for jobs and scripts); with it, Ctrl-C also withdraws the request. "
        "SIGTERM or SIGHUP while waiting always withdraws it",
    )


def _add_policy_commands(commands: Any) -> None:
    policy = commands.add_parser("policy", help="the team's signed policy (docs/policy.md)")
    policy_commands = policy.add_subparsers(dest="policy_command", required=True,
                                            metavar="ACTION")
    show = policy_commands.add_parser("show", help="show the signed policy and who signed it")
    show.add_argument("--json", action="store_true", help="print the signed bundle as JSON")
    show.set_defaults(handler=lambda args, home: policy_show(home, as_json=args.json))
    set_parser = policy_commands.add_parser(
        "set", help="validate FILE, sign it with your key and publish it (admin)",
        description="Validate the policy document FILE locally (errors name the line), check "
        "that its version is the next one, sign it with your operator key together with the "
        "signed roster and agent tags, and publish it; the rendezvous countersigns it and "
        "sends it to the team's agents.",
    )
    set_parser.add_argument("file", type=Path, metavar="FILE", help="policy document (TOML)")
    set_parser.add_argument("--freeze-roster", action="store_true", help=FREEZE_ROSTER_HELP)
    set_parser.set_defaults(handler=lambda args, home: policy_set(
        home, args.file, freeze_roster=args.freeze_roster
    ))  # fmt: skip
    test = policy_commands.add_parser(
        "test", help="show the decision the policy makes on a request, and why",
    )
    test.add_argument("--operator", required=True, metavar="EMAIL", help="the operator's email")
    test.add_argument("--agent", required=True, metavar="AGENT", help="agent name or id")
    test.add_argument("--action", required=True, choices=("shell", "exec"))
    test.add_argument("--command", metavar='"CMD ARGS"', help="the exec command line")
    test.add_argument("--at", metavar="TIME",
                      help="RFC 3339 time with offset, e.g. 2026-03-29T02:30:00+02:00 "
                      "(default: now)")
    test.set_defaults(handler=lambda args, home: policy_test(
        home, operator=args.operator, agent=args.agent, action=args.action,
        command=args.command, at=args.at,
    ))

    roster = commands.add_parser("roster", help="the signed team roster agents enforce")
    roster_commands = roster.add_subparsers(dest="roster_command", required=True,
                                            metavar="ACTION")
    roster_commands.add_parser(
        "show", help="the signed roster and pending (unsigned) changes"
    ).set_defaults(handler=lambda args, home: roster_show(home))
    sign = roster_commands.add_parser(
        "sign", help="sign the current roster and agent tags (admin)",
        description="Show how the team's operators and agent tags differ from the signed "
        "roster, and how many approvals in flight the new version voids (pending requests and "
        "approved ones not used yet: their requesters ask again), ask, and sign them into the "
        "next policy version (same rules).",
    )
    sign.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    sign.add_argument("--freeze-roster", action="store_true", help=FREEZE_ROSTER_HELP)
    sign.set_defaults(handler=lambda args, home: roster_sign(
        home, assume_yes=args.yes, freeze_roster=args.freeze_roster
    ))  # fmt: skip

    approvals = commands.add_parser(
        "approvals", help="pending approval requests (approver and admin roles)"
    )
    approvals.add_argument("--json", action="store_true", help="print JSON")
    approvals.set_defaults(handler=lambda args, home: approvals_command(home, as_json=args.json))
    approvals_commands = approvals.add_subparsers(dest="approvals_command", metavar="ACTION")
    show_request = approvals_commands.add_parser(
        "show", help="one request in full: its whole command, control characters escaped"
    )
    show_request.add_argument("request_id", metavar="ID", help="approval request id (apr_…)")
    # Also after show; SUPPRESS keeps `approvals --json show ID` from being reset to False.
    show_request.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                              help="print JSON (one document, the fields of approvals --json)")
    show_request.set_defaults(
        handler=lambda args, home: approvals_show_command(home, args.request_id,
                                                          as_json=args.json)
    )
    withdraw_request = approvals_commands.add_parser(
        "withdraw", help="take back a request of yours that nobody has decided yet",
        description="Withdraw your own pending approval request (from exec/connect --no-wait, "
        "or one you stopped waiting for with Ctrl-C): nobody can approve it any more, and it "
        "no longer counts against your pending requests. Audited (approval.withdrawn).",
    )
    withdraw_request.add_argument("request_id", metavar="ID", help="approval request id (apr_…)")
    withdraw_request.set_defaults(
        handler=lambda args, home: approvals_withdraw_command(home, args.request_id)
    )
    approve = commands.add_parser(
        "approve", help="approve a pending request (signs the exact request with your key)",
        description="Show the whole request (its command with control characters escaped) "
        "and ask for confirmation, then sign exactly that request with your key. Without a "
        "terminal it approves nothing unless --yes.",
    )  # fmt: skip
    approve.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    deny = commands.add_parser("deny", help="deny a pending request")
    for decision in (approve, deny):
        decision.add_argument("request_id", metavar="ID", help="approval request id (apr_…)")
        decision.add_argument("--reason", help="why (recorded in the audit log)")
    approve.set_defaults(handler=lambda args, home: approve_command(
        home, args.request_id, args.reason, assume_yes=args.yes
    ))  # fmt: skip
    deny.set_defaults(handler=lambda args, home: deny_command(home, args.request_id, args.reason))


def _settings_for_login(args: argparse.Namespace, home: CliHome) -> Settings:
    server = args.login_server or args.server
    ca_file = args.login_ca_file or args.ca_file
    saved = home.load_settings()
    if server is None:
        if saved is None:
            raise HomeError("no server known: pass --server URL")
        server = saved.server
        ca_file = ca_file or saved.ca_file
    if not server.startswith(("https://", "http://")):
        raise HomeError(f"--server must be an https:// URL, not {server!r}")
    if ca_file is not None:
        ca_file = str(Path(ca_file).resolve())
    return Settings(server=server.rstrip("/"), ca_file=ca_file)


def _login(args: argparse.Namespace, home: CliHome) -> int:
    settings = _settings_for_login(args, home)
    ca_certificates = None if settings.ca_file is None else read_ca_certificates(settings.ca_file)
    identity = home.load_key()
    with open_http(settings) as http:
        if args.invite:
            if identity is None:
                identity = home.create_key()
            enrolled = enroll(http, identity, args.invite.strip())
            print(
                f"enrolled {enrolled['email']} as {enrolled['role']} in team "
                f"{enrolled['team_id']}; key {identity.public.fingerprint}"
            )
        elif identity is None:
            raise HomeError(f"no operator key in {home.path}: enroll first with --invite CODE")
        token = login(http, identity)
    if ca_certificates is not None:
        # Later commands use this copy, not the path typed at login (which may be moved).
        settings.ca_file = str(home.save_ca_copy(ca_certificates))
    home.save_settings(settings)
    home.save_token(token)
    expires = datetime.fromtimestamp(token["expires_at"], UTC).strftime("%H:%M:%S UTC")
    print(f"logged in as {token['email']} ({token['role']}); token valid until {expires}")
    return EXIT_OK


def _logout(args: argparse.Namespace, home: CliHome) -> int:
    if home.load_token() is None:
        if home.token_was_damaged:
            print("logged out; the damaged token cache is removed (the token it held could not "
                  "be revoked: it expires on its own)")
        else:
            print("not logged in")
        return EXIT_OK
    session = Session.from_home(home)
    try:
        session.request("POST", "/v1/auth/logout")
    finally:
        session.close()
        home.forget_token()
    print("logged out; the token is revoked")
    return EXIT_OK


def _whoami(args: argparse.Namespace, home: CliHome) -> int:
    session = Session.from_home(home)
    try:
        me = session.request("GET", "/v1/auth/whoami")
    finally:
        session.close()
    print(f"{me['email']} ({me['role']}) in team {me['team_name'] or me['team_id']}")
    print(f"operator id {me['subject']}; server {session.http.base_url}")
    return EXIT_OK


def _keys_create(args: argparse.Namespace, home: CliHome) -> int:
    tags = [tag.strip() for tag in args.tags.split(",") if tag.strip()]
    body: dict[str, Any] = {"tags": tags}
    if args.ttl is not None:
        body["ttl_seconds"] = args.ttl
    created = _request_once(home, "POST", "/v1/registration-keys", body)
    expires = datetime.fromtimestamp(created["expires_at"], UTC).isoformat(timespec="seconds")
    print(f"registration key {created['id']} tags={','.join(created['tags']) or '-'} "
          f"expires {expires}; single use, shown once:")
    print(created["key"])
    return EXIT_OK


def _keys_list(args: argparse.Namespace, home: CliHome) -> int:
    from operator_cli.operator_commands import creator_names, creator_of

    keys, names = _keys_and_creators(home, "/v1/registration-keys", creator_names)
    # USED BY: the agent a key enrolled (an incident responder's link from a key to a host).
    print(f"{'ID':<24} {'STATUS':<8} {'EXPIRES':<26} {'CREATED BY':<32} {'USED BY':<22} TAGS")
    for key in keys:
        expires = datetime.fromtimestamp(key["expires_at"], UTC).isoformat(timespec="seconds")
        used_by = key.get("used_by_agent") or "-"
        print(f"{key['id']:<24} {key['status']:<8} {expires:<26} "
              f"{creator_of(key.get('created_by'), names):<32} {used_by:<22} "
              f"{','.join(key['tags']) or '-'}")
    return EXIT_OK


def _keys_and_creators(
    home: CliHome, path: str, creator_names: Callable[[Session], dict[str, str]]
) -> tuple[Any, dict[str, str]]:
    """A key listing and the emails of the operators who may have created its keys."""
    session = Session.from_home(home)
    try:
        return session.request("GET", path), creator_names(session)
    finally:
        session.close()


def _keys_revoke(args: argparse.Namespace, home: CliHome) -> int:
    revoked = _request_once(home, "DELETE", f"/v1/registration-keys/{_path_segment(args.key_id)}")
    print(f"registration key {revoked['id']} revoked")
    return EXIT_OK


def _api_keys_create(args: argparse.Namespace, home: CliHome) -> int:
    body = {"name": args.name, "scopes": list(dict.fromkeys(args.scopes))}
    created = _request_once(home, "POST", "/v1/api-keys", body)
    print(f"API key {created['id']} {created['name']!r} scopes={','.join(created['scopes'])}; "
          "send it as 'Authorization: Bearer KEY'; shown once:")
    print(created["key"])
    return EXIT_OK


def _api_keys_list(args: argparse.Namespace, home: CliHome) -> int:
    from operator_cli.operator_commands import creator_names, creator_of

    keys, names = _keys_and_creators(home, "/v1/api-keys", creator_names)
    print(f"{'ID':<24} {'STATUS':<8} {'CREATED':<26} {'CREATED BY':<32} {'NAME':<20} SCOPES")
    for key in keys:
        status = "active" if key["revoked_at"] is None else "revoked"
        created = datetime.fromtimestamp(key["created_at"], UTC).isoformat(timespec="seconds")
        print(f"{key['id']:<24} {status:<8} {created:<26} "
              f"{creator_of(key.get('created_by'), names):<32} {key['name']:<20} "
              f"{','.join(key['scopes'])}")
    return EXIT_OK


def _api_keys_revoke(args: argparse.Namespace, home: CliHome) -> int:
    revoked = _request_once(home, "DELETE", f"/v1/api-keys/{_path_segment(args.api_key_id)}")
    print(f"API key {revoked['id']} {revoked['name']!r} revoked")
    return EXIT_OK


def _request_once(home: CliHome, method: str, path: str, body: Any = None) -> Any:
    """One authenticated request on a session opened (and closed) for it."""
    session = Session.from_home(home)
    try:
        return session.request(method, path, body)
    finally:
        session.close()


def _positive_count(text: str) -> int:
    if not text.isascii() or not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _parallel_sessions(text: str) -> int:
    count = _positive_count(text)
    if count > MAX_PARALLEL_SESSIONS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is more than {MAX_PARALLEL_SESSIONS} (half the relay's default "
            "per-source burst of 40 connections: see --help)"
        )
    return count


def _page_size(text: str) -> int:
    size = _positive_count(text)
    if size > PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r} is more than the service's {PAGE_SIZE}")
    return size


def _agents(args: argparse.Namespace, home: CliHome) -> int:
    # Tags are stored lower-cased (agents tag --help): --tag WEB finds the agents tagged web.
    wanted_tags = tuple(tag.lower() for tag in args.tag)
    filters = AgentFilter(tags=wanted_tags, online=args.online, name_prefix=args.name)
    session = Session.from_home(home)
    try:
        listing = fetch_agents(session, filters, limit=args.limit, page_size=args.page_size)
    finally:
        session.close()
    agents = listing.agents
    if args.json:
        print(json.dumps(agents, indent=2))
        return EXIT_OK
    team_version = listing.policy_version
    print(f"{'NAME':<24} {'ID':<24} {'STATE':<8} {'LAST SEEN':<21} {'TAGS':<16} "
          f"{'POLICY':<12} KEY")
    for agent in agents:
        state = "online" if agent["online"] else "offline"
        seen = _ago(agent["last_seen_at"])
        tags = ",".join(agent["tags"]) or "-"
        policy = policy_drift(agent.get("policy_version"), team_version)
        print(
            f"{agent['name']:<24} {agent['id']:<24} {state:<8} {seen:<21} {tags:<16} "
            f"{policy:<12} {agent['key_fingerprint']}"
        )
    # Notes go to stderr: stdout is the table alone, for `| awk 'NR>1{print $1}'`.
    if isinstance(team_version, int):
        print(f"team policy version: {team_version or 'none signed'}", file=sys.stderr)
    if listing.more:
        print(f"(stopped after {len(agents)} agents: --limit)", file=sys.stderr)
    return EXIT_OK


def _sessions(args: argparse.Namespace, home: CliHome) -> int:
    session = Session.from_home(home)
    try:
        # The service resolves both in the team: a removed agent's id or name (its history
        # stays), an operator's email; one naming nobody is refused, not listed as empty.
        filters = SessionFilter(
            states=tuple(dict.fromkeys(args.state)), agent=args.agent,
            operator=args.operator, since=args.since,
        )  # fmt: skip
        listing = fetch_sessions(session, filters, limit=args.limit, page_size=args.page_size)
    finally:
        session.close()
    if args.json:
        print(json.dumps(listing.sessions, indent=2))
        return EXIT_OK
    # COMMAND is cut to the terminal's width; into a pipe or file it goes whole.
    width = shutil.get_terminal_size().columns if sys.stdout.isatty() else None
    for line in session_table(listing.sessions, width):
        print(line)
    if listing.more:
        print(f"(the newest {len(listing.sessions)} sessions: --limit to see more)")
    return EXIT_OK


def _session_end(args: argparse.Namespace, home: CliHome) -> int:
    return sessions_end(home, args.session_id, agent=args.agent, operator=args.operator,
                        assume_yes=args.yes)  # fmt: skip


def _session_show(args: argparse.Namespace, home: CliHome) -> int:
    view = _request_once(home, "GET", f"{SESSIONS_PATH}/{_path_segment(args.session_id)}")
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        for line in session_details(view):
            print(line)
    return EXIT_OK


def policy_drift(applied: object, current: object) -> str:
    """An agent's applied policy version, marked when it lags the team's (``v3 (!= v4)``)."""
    if not isinstance(applied, int) or applied <= 0:
        shown = "none"
    else:
        shown = f"v{applied}"
    if isinstance(current, int) and current > 0 and applied != current:
        return f"{shown} (!= v{current})"
    return shown


def _agents_trust(args: argparse.Namespace, home: CliHome) -> int:
    return agents_trust(home, args.agent, assume_yes=args.yes, fingerprint=args.fingerprint)


def _agents_remove(args: argparse.Namespace, home: CliHome) -> int:
    return agents_remove(home, args.agent, assume_yes=args.yes)


def _agents_tag(args: argparse.Namespace, home: CliHome) -> int:
    return agents_tag(home, args.agent, add=args.add, remove=args.remove, replace=args.replace)


def _operators(args: argparse.Namespace, home: CliHome) -> int:
    return operators_list(home, as_json=args.json)


def _operators_disable(args: argparse.Namespace, home: CliHome) -> int:
    return operators_disable(
        home, args.operator, assume_yes=args.yes, freeze_roster=args.freeze_roster
    )


def _connect(args: argparse.Namespace, home: CliHome) -> int:
    if args.remote_command:
        args.command_parser.error(
            "connect opens a shell; for one command use exec (-t for a terminal, as "
            "ssh -t): tucdesk exec -t AGENT -- CMD [ARGS...]"
        )
    _bound_approval_wait(args)
    return connect_command(
        home, args.agent, args.escape_char, debug=args.debug,
        wait_for_approval=not args.no_wait, approval_id=args.approval,
    )


def _exec(args: argparse.Namespace, home: CliHome) -> int:
    if args.exec_tags:
        return _exec_tagged(args, home)
    _parse_options_after_agent(args)  # first: `exec AGENT --tag T -- CMD` shows --tag only now
    if args.exec_tags:
        args.command_parser.error(
            f"--tag runs on every agent carrying the tag, instead of AGENT ({args.agent!r}): "
            "tucdesk exec --tag TAG -- CMD, or tucdesk exec AGENT -- CMD"
        )
    if not args.remote_command or args.remote_command == ["--"]:
        args.command_parser.error("no command given: tucdesk exec AGENT -- CMD [ARGS...]")
    for given, flag in ((args.parallel is not None, "--parallel"), (args.json, "--json")):
        if given:
            args.command_parser.error(f"{flag} is for --tag (several agents); one AGENT's "
                                      "output and exit status are the command's own")
    _bound_approval_wait(args)
    return exec_command(
        home, args.agent, args.remote_command, no_stdin=args.no_stdin,
        force_stdin=args.force_stdin, debug=args.debug,
        wait_for_approval=not args.no_wait, approval_id=args.approval,
        status_fd=args.status_fd, pty=args.want_pty,
    )


def _bound_approval_wait(args: argparse.Namespace) -> None:
    """Pass --approval-timeout to the approval wait (approval_wait.py) of this session; set
    every time (None too), so an earlier main() in the same process leaves nothing behind."""
    timeout = getattr(args, "approval_timeout", None)
    if timeout is not None and getattr(args, "no_wait", False):
        args.command_parser.error("--approval-timeout bounds a wait; --no-wait does not wait")
    from operator_cli.approval_wait import bound_approval_waits

    bound_approval_waits(timeout)


def _exec_tagged(args: argparse.Namespace, home: CliHome) -> int:
    command = _tagged_command(args)
    for given, flag in ((args.force_stdin, "--stdin"), (args.want_pty, "-t"),
                        (args.approval, "--approval"), (args.no_wait, "--no-wait")):
        if given:
            args.command_parser.error(f"--tag runs on several agents: {flag} is for one AGENT")
    if not command:
        args.command_parser.error("no command given: tucdesk exec --tag TAG -- CMD [ARGS...]")
    from operator_cli.tagged_exec import global_options_of

    return exec_on_tagged(
        home, args.exec_tags, command, global_options=global_options_of(args),
        parallel=args.parallel or DEFAULT_PARALLEL_SESSIONS, as_json=args.json,
        approval_timeout=args.approval_timeout,
    )


def _tagged_command(args: argparse.Namespace) -> list[str]:
    """The command of ``exec --tag TAG [OPTIONS] -- CMD…``: every word after the first ``--``,
    as typed. There is no AGENT with --tag, and argparse, taking the first word for one, would
    drop the user's own ``--`` after it (``grep -- -v`` sent as ``grep -v``), so a ``--`` is
    required before the command and a word before it is refused."""
    words: list[str] = args.command_words
    usage = "tucdesk exec --tag TAG -- CMD [ARGS...]"
    if "--" not in words:
        args.command_parser.error(f"--tag needs -- before the command: {usage}")
    command = words[words.index("--") + 1:]
    # argparse put every word that is not an option into AGENT and the rest: with nothing but
    # options before the --, those are exactly the command.
    if [args.agent, *args.remote_command] != command:
        args.command_parser.error(
            f"with --tag there is no AGENT: {args.agent!r} stands before the --, where only "
            f"options go; the whole command goes after it: {usage}"
        )
    return command


def _parse_options_after_agent(args: argparse.Namespace) -> None:
    """``exec AGENT -n -- CMD``: options between AGENT and ``--`` are exec's, as ssh takes
    options after the host. Only when the first word after AGENT is an option and a ``--``
    follows: ``exec AGENT grep -- -x`` still sends ``grep -- -x``."""
    words: list[str] = args.remote_command
    typed: list[str] = getattr(args, "command_words", [])
    before = len(typed) - len(words) - 1
    if before >= 0 and typed[before] == "--" and typed[before + 1 :] == words:
        # `exec AGENT -- CMD`: the user's own -- (argparse dropped it) ends the options, so a
        # CMD that starts with an option is sent as typed (as every `exec --tag` child is run).
        return
    if not words or not words[0].startswith("-") or words[0] == "--" or "--" not in words:
        return
    split = words.index("--")
    agent = args.agent
    args.command_parser.parse_args([*words[:split], agent, *words[split:]], namespace=args)
    if args.agent != agent:
        args.command_parser.error(
            f"between AGENT and -- only options go, not {args.agent!r}: "
            "tucdesk exec AGENT [OPTIONS] -- CMD [ARGS...]"
        )


def _ssh(args: argparse.Namespace, home: CliHome) -> int:
    words = _parse_ssh_options_after_agent(args)
    if args.ssh_config_options:
        _report(args, f"-o {args.ssh_config_options[0]}: tucdesk ssh takes no ssh configuration "
                "options (the agent's key is pinned by tucdesk and the session goes through the "
                "relay): drop the -o")
        return EXIT_CONNECTION_FAILED
    if args.login_user is not None:
        _report(args, f"-l {args.login_user}: there is no login choice; the agent runs every "
                "session as its configured account: drop the user (user@) from the address")
        return EXIT_CONNECTION_FAILED
    if not words:
        _report(args, "tucdesk ssh runs a command line: tucdesk ssh AGENT COMMAND...; for an "
                "interactive shell use tucdesk connect AGENT")
        return EXIT_CONNECTION_FAILED
    _bound_approval_wait(args)  # ssh has no --approval-timeout: no bound
    return ssh_command(
        home, args.agent, words, no_stdin=args.no_stdin, debug=args.debug,
        pty=0 if args.no_pty else args.want_pty,
    )


def _parse_ssh_options_after_agent(args: argparse.Namespace) -> list[str]:
    """Set ``args.agent`` and return the command words of ``ssh AGENT [OPTIONS] [--] WORD…``:
    OpenSSH reads options after the host too (``ssh host -l root id``), up to the first word
    that is not one or a ``--``; but not after ``ssh -- host``, where a ``--`` already ended
    them (``ssh -- host -l x id`` runs ``-l x id``)."""
    given: list[str] = args.ssh_words
    options_ended = given[:1] == ["--"]
    if options_ended:
        given = given[1:]
    if not given:
        args.command_parser.error("no AGENT given: tucdesk ssh AGENT COMMAND...")
    args.agent = given[0]
    if options_ended:
        return given[1:]
    try:
        options, words = getopt.getopt(given[1:], SSH_OPTIONS_AFTER_AGENT)
    except getopt.GetoptError as error:
        args.command_parser.error(
            f"{error} after AGENT (tucdesk ssh takes -n, -t, -l USER, -T, -q, -o OPTION; put -- "
            "before a command that starts with -)"
        )
    for flag, value in options:
        if flag == "-n":
            args.no_stdin = True
        elif flag == "-l":
            args.login_user = value
        elif flag == "-o":
            args.ssh_config_options.append(value)
        elif flag == "-t":
            args.want_pty += 1
        elif flag == "-T":
            args.no_pty = True
        # -q changes nothing: nothing but errors is printed anyway.
    return words


def _demo(args: argparse.Namespace, home: CliHome) -> int:
    return run_demo(args.demo_exec, keep=args.keep, debug=args.debug)


def _audit_export(args: argparse.Namespace, home: CliHome) -> int:
    # Imported here: only this command needs them (the others' start-up stays lean).
    from audit.progress import ProgressLine, wants_progress
    from operator_cli.audit_export import (
        ExportIncomplete,
        ExportReceiver,
        is_stream,
        receive_into_place,
        verify_hint,
    )

    output: Path | None = args.output
    if output is not None and str(output) == "-":
        output = None  # `-o -`: stdout, as most tools read it (not a file named "-")
    if output is not None and output.is_dir():
        _report(args, f"{output} is a directory; give a file name with -o")
        return EXIT_FAILURE
    session = Session.from_home(home)
    if output is None or is_stream(output):
        where = f"{output or 'the output'} is incomplete"
    else:
        where = f"nothing was written to {output}"
    # Bundle lines on a terminal would be garbled by the progress line: then only if asked.
    show = wants_progress(args.progress, sys.stderr) and (
        args.progress or output is not None or not sys.stdout.isatty()
    )
    try:
        response = session.request_raw("GET", "/v1/audit/export")
        line = ProgressLine(sys.stderr) if show else None
        receiver = ExportReceiver(line)
        try:
            if output is None:
                receiver.receive(response, sys.stdout.buffer)
                sys.stdout.flush()
            elif is_stream(output):
                with output.open("wb") as sink:
                    receiver.receive(response, sink)
            else:
                receive_into_place(receiver, response, output)
        finally:
            if line is not None:
                line.clear()
    except ExportIncomplete as failure:
        _report(args, f"{failure}; {where}")
        return EXIT_FAILURE
    except KeyboardInterrupt:
        _report(args, f"interrupted; {where}")
        return EXIT_INTERRUPTED
    finally:
        session.close()
    if output is not None:
        print(f"wrote {output} ({receiver.lines} lines); {verify_hint(output)}", file=sys.stderr)
    return EXIT_OK


def _ago(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _path_segment(text: str) -> str:
    if not text or "/" in text or len(text) > 128:
        raise HomeError(f"{text!r} is not an id")
    return text


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the chosen command; one line and exit 1 on failure."""
    open_dev_null_on_closed_standard_fds()  # before any socket can take fd 0-2
    parser = build_parser()
    args = parser.parse_args(argv)
    home = CliHome(args.home or default_home(os.environ), server=args.server,
                   ca_file=args.ca_file)
    strict_before = os.environ.get(STRICT_AGENT_KEYS_ENV)
    if args.strict_agent_keys:
        # Through the environment, so the `tucdesk exec` children of exec --tag are strict too.
        os.environ[STRICT_AGENT_KEYS_ENV] = "1"
    try:
        result: int = args.handler(args, home)
        sys.stdout.flush()  # here, not at exit: a reader that left is a BrokenPipeError below
        return result
    except BrokenPipeError as error:
        if not _stdout_reader_gone():
            _report(args, str(error))
            return EXIT_FAILURE
        # `tucdesk agents --json | head`: the reader has what it wanted. End as a C tool killed
        # by SIGPIPE is reported (141, which `set -o pipefail` sees), without a word, and point
        # stdout at /dev/null so the flush at exit cannot complain either (Python docs, signal:
        # "Note on SIGPIPE").
        _quiet_stdout()
        return EXIT_STDOUT_CLOSED
    except KeyboardInterrupt:
        # Ctrl-C while waiting (the server, the relay, an approver): one line, like ssh.
        _report(args, "interrupted")
        return EXIT_INTERRUPTED
    except BaseExceptionGroup as group:
        # Ctrl-C landing while several trio tasks run (waiting at the relay) comes grouped.
        if group.subgroup(KeyboardInterrupt) is None:
            raise
        _report(args, "interrupted")
        return EXIT_INTERRUPTED
    except ApiError as error:
        _report(args, f"the server refused: {visible(error.message)} ({visible(error.code)})")
    except TransportError as error:
        _report(args, error.describe())
    except (HomeError, ProtocolError, OSError, ResponseTooLargeError, AgentListError,
            CaFileError) as error:
        _report(args, str(error))
    except Exception as error:  # noqa: BLE001 - one line for the user; --debug has the rest
        _report(args, f"unexpected {type(error).__name__}; rerun with --debug for details")
    finally:
        # --strict-agent-keys is for this command: a later main() in this process (tests,
        # scripts importing the CLI) finds the environment as it was.
        if strict_before is None:
            os.environ.pop(STRICT_AGENT_KEYS_ENV, None)
        else:
            os.environ[STRICT_AGENT_KEYS_ENV] = strict_before
    return EXIT_FAILURE


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe or socket whose reader closed it (poll says POLLERR/POLLHUP)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _quiet_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _report(args: argparse.Namespace, message: str) -> None:
    if args.debug:
        traceback.print_exc()
    print(f"tucdesk: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
