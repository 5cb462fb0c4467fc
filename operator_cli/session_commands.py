"""The session commands as the CLI runs them: `connect`, `exec` and `agents trust`.

Each asks the rendezvous for what it needs over HTTPS, runs the session under trio, and turns
every way a session can fail to start into one line on stderr and exit status 255, as ssh does.
A changed agent key is the one loud exception: its warning names both fingerprints.
"""

from __future__ import annotations

import hmac
import os
import re
import shlex
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from typing import Any
from urllib.parse import quote

import trio

from operator_cli.agent_listing import (
    PAGE_SIZE,
    AgentFilter,
    AgentListError,
    agents_named,
    agents_page_path,
    fetch_agents,
)
from operator_cli.approval_wait import (
    ApprovalWaitInterrupted,
    Parked,
    SessionAsk,
    obtain_ticket,
)
from operator_cli.client import ApiError, Session
from operator_cli.confirm import answered_yes
from operator_cli.connect import (
    ConnectOptions,
    ConnectOutcome,
    exec_terminal_start,
    run_connect,
    shell_start,
    terminal_type,
    window_fd,
)
from operator_cli.escape import EscapeCharacterError, parse_escape_character
from operator_cli.exec_command import ExecOptions, run_exec, should_read_stdin
from operator_cli.home import CliHome, HomeError
from operator_cli.http import CaFileError, HttpError, ResponseTooLargeError, TransportError
from operator_cli.known_agents import AgentKeyChangedError, KnownAgents, KnownAgentsError
from operator_cli.paged_list import ApiSession
from operator_cli.session_client import (
    RefusalProbe,
    SessionError,
    SessionNotices,
    SessionTicket,
)
from operator_cli.terminal import read_window_size
from operator_cli.terminal_text import visible
from protocol.control import PTY_FIELD
from protocol.errors import ProtocolError
from protocol.exec_limits import CommandTooLargeError, check_exec_command
from protocol.identity import PublicIdentity, b64url_decode

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONNECTION_FAILED = 255
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it
EXIT_DECLINED = 1
AMBIGUOUS_TARGET = "ambiguous_target"  # the rendezvous's code for a name several agents share
AGENT_NOT_FOUND = "agent_not_found"  # its code for a name no agent of the team has
MAX_SUGGESTIONS = 3
SUGGESTION_SEARCH_LIMIT = 1000  # agents looked at for close names: one page of the listing
# `tucdesk ssh` runs the command line the way sshd does, through a shell (docs/sessions.md §4).
SSH_SHELL = ("sh", "-c")
EXIT_NOT_FOUND = 127  # the agent's status for a command it cannot find, as a shell's
# Characters that make one exec argument look like a shell command line rather than a program.
SHELL_SYNTAX = frozenset(" \t|&;<>()$`\\\"'*?[]{}~=\n")
# The terminal type a shell fed from a pipe gets: no colours, no bracketed-paste codes.
PIPED_TERMINAL_TYPE = "dumb"
# An agent key fingerprint as PublicIdentity.fingerprint writes it (agents trust --fingerprint).
FINGERPRINT_PATTERN = re.compile(r"SHA256:[A-Za-z0-9+/]{43}")


def _say(message: str) -> None:
    print(f"tucdesk: {message}", file=sys.stderr)


def _guarded(run: Callable[[], int], debug: bool = False) -> int:
    """Run a session command; map set-up failures to one line and 255 (--debug: traceback)."""
    try:
        return _unwrapped(run)
    except BaseException:
        if debug:
            traceback.print_exc()
        raise


def _reported(run: Callable[[], int], debug: bool = False) -> int:
    """Run a session command; map set-up failures to one line and 255."""
    try:
        return _guarded(run, debug)
    except AgentKeyChangedError as error:
        print(str(error), file=sys.stderr)
    except ApprovalWaitInterrupted as error:
        _say(str(error))
        return EXIT_INTERRUPTED
    except ApiError as error:
        _say(f"the server refused: {error.message} ({error.code})")
    except TransportError as error:
        _say(error.describe())
    except (SessionError, KnownAgentsError, HomeError, ProtocolError,
            ResponseTooLargeError, CaFileError) as error:
        _say(str(error))
    except OSError as error:
        _say(f"{error.strerror or error}")
    return EXIT_CONNECTION_FAILED


def _unwrapped(run: Callable[[], int]) -> int:
    """Call ``run``; a trio exception group holding one error is re-raised as that error."""
    try:
        return run()
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        if leaf is group:
            raise
        raise leaf from group


def _session_notices(api: ApiSession, ticket: SessionTicket) -> SessionNotices:
    """What to print while a session opens: the key pinned on first use (always, like ssh's
    "Permanently added"), that the relay is slow to pair (on a terminal only), and, when the
    pairing times out, whether the agent ever took the offer."""
    return SessionNotices(
        slow_pairing=_say_waiting_for_relay if sys.stderr.isatty() else None,
        pinned_on_first_use=_say_pinned,
        explain_pairing_timeout=pairing_timeout_explainer(api, ticket),
    )


# How long the CLI asks the rendezvous why the pairing timed out before it gives up and reports
# the relay's own message: the answer is a courtesy, not worth a second long wait.
PAIRING_TIMEOUT_LOOKUP_SECONDS = 5.0


def pairing_timeout_explainer(
    api: ApiSession, ticket: SessionTicket
) -> Callable[[], Awaitable[str | None]]:
    """For SessionNotices.explain_pairing_timeout: asks the rendezvous (in a thread, as the
    API client blocks) whether the agent ever took the offer (``untaken_offer``). At most
    PAIRING_TIMEOUT_LOOKUP_SECONDS, and Ctrl-C does not wait for the request: None (the
    relay's message stands) when the answer does not come in time."""
    asked_at = time.monotonic()

    async def explain() -> str | None:
        waited = time.monotonic() - asked_at
        with trio.move_on_after(PAIRING_TIMEOUT_LOOKUP_SECONDS):
            return await trio.to_thread.run_sync(
                untaken_offer, api, ticket, waited, abandon_on_cancel=True
            )
        return None

    return explain


def untaken_offer(api: ApiSession, ticket: SessionTicket, waited: float) -> str | None:
    """What to say when the relay's pairing timed out because the agent never took the offer
    (the session is still ``offered``); None when it did take it (or this cannot be told), so
    the relay's own message stands. ``waited``: seconds since the session was granted.

    An agent heard from since the session was created is connected (its heartbeats arrive) but
    did not take the offer; one not heard from since may have lost its connection to the
    rendezvous (listed online until its heartbeat times out), and how long ago it was last
    heard from is told."""
    try:
        view = api.request("GET", f"/v1/sessions/{quote(ticket.session_id, safe='')}")
        if not isinstance(view, dict) or view.get("state") != "offered":
            return None
        created = view.get("created_at")
        seen = _last_seen_at(api, ticket)
    except (ApiError, HttpError, AgentListError):
        return None
    name = ticket.agent_name
    if isinstance(created, (int, float)) and isinstance(seen, (int, float)) and seen >= created:
        return f"agent {name} is connected but did not take the session within {waited:.0f} s"
    said = f"agent {name} did not take the session (its connection to the rendezvous may be down"
    if not isinstance(created, (int, float)) or not isinstance(seen, (int, float)):
        return f"{said})"
    # Not heard from since the session was created: its last heartbeat came (created - seen)
    # before that by the rendezvous's own clock (a skew with this machine's does not matter),
    # and the CLI has waited since.
    return f"{said}; last heard from {created - seen + waited:.0f} s ago)"


def _last_seen_at(api: ApiSession, ticket: SessionTicket) -> object:
    """The agent's ``last_seen_at``, from one page of the agents whose name starts with its
    name (the service sorts by name, then id: the agents named exactly so come first), found
    by its id; None if it is not on that page."""
    path = agents_page_path(AgentFilter(name_prefix=ticket.agent_name), PAGE_SIZE, None)
    page = api.request("GET", path)
    agents = page.get("agents") if isinstance(page, dict) else None
    for agent in agents if isinstance(agents, list) else []:
        if isinstance(agent, dict) and agent.get("id") == ticket.agent_id:
            return agent.get("last_seen_at")
    return None


def _say_waiting_for_relay() -> None:
    _say("waiting for the relay to pair… (Ctrl-C to give up)")


def _say_pinned(ticket: SessionTicket, key: PublicIdentity) -> None:
    print(f"Pinned the key of agent {ticket.agent_name} ({ticket.agent_id}) on first use: "
          f"{key.fingerprint}", file=sys.stderr)


# What the rendezvous says to a disabled operator (rendezvous/auth.py, routes_auth.py), and the
# reason it records on the sessions it refuses for that.
OPERATOR_DISABLED_MESSAGE = "this operator is disabled"
OPERATOR_DISABLED_REASON = "operator_disabled"


def offer_refusal_probe(api: Session, session_id: str) -> RefusalProbe:
    """A probe asking GET /v1/sessions/{id} whether the agent refused the offer (and why)."""
    path = f"/v1/sessions/{quote(session_id, safe='')}"

    async def probe() -> str | None:
        try:
            view = await trio.to_thread.run_sync(api.request, "GET", path)
        except ApiError as error:
            # Disabled after the ticket was issued: the rendezvous refused the offer for that,
            # but answers a disabled operator nothing more (not even its session's state).
            # The code since the rendezvous sends one (its 401 body's error); the text for one
            # that does not yet.
            if error.code == OPERATOR_DISABLED_REASON or (
                error.status in (401, 403) and OPERATOR_DISABLED_MESSAGE in error.message
            ):
                return f"{OPERATOR_DISABLED_REASON} ({error.message})"
            return None  # cannot tell; the relay's pairing timeout still bounds the wait
        except HttpError:
            return None
        if isinstance(view, dict) and view.get("state") == "refused":
            return str(view.get("reason") or "no reason given")
        return None

    return probe


def exec_command(
    home: CliHome,
    agent: str,
    argv: Sequence[str],
    *,
    no_stdin: bool,
    force_stdin: bool,
    debug: bool = False,
    wait_for_approval: bool = True,
    approval_id: str | None = None,
    status_fd: int | None = None,
    pty: int = 0,
) -> int:
    """`tucdesk exec AGENT -- CMD…`: the remote command's exit status, or 255.

    When the policy asks for approval it waits for an approver (or, with ``wait_for_approval``
    false, prints the request id and returns 0); ``approval_id`` redeems an earlier request.
    ``status_fd`` (exec --tag's children) gets ``opened`` once the handshake is done and
    ``exit N`` once the remote command has ended. ``pty`` counts -t as ssh does: once, a
    terminal for the command when stdin is one; twice, always.
    """
    command = list(argv)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        _say("give the command to run: tucdesk exec AGENT -- CMD [ARGS...]")
        return EXIT_CONNECTION_FAILED
    try:
        check_exec_command(command)  # before asking anyone: the grant could not carry it
    except CommandTooLargeError as error:
        _say(f"{error}; send a long script or list on stdin instead: tucdesk exec "
             f"{shlex.quote(agent)} -- sh -s < script.sh")
        return EXIT_CONNECTION_FAILED

    # -n makes stdin /dev/null, as ssh -n: -t then finds no terminal on it; -tt still gets a
    # terminal for the command, which reads nothing from us (run_connect's read_input).
    on_terminal = pty >= 2 or (pty == 1 and not no_stdin and _is_terminal(0))
    if pty == 1 and not on_terminal:
        _say("no terminal for the command: stdin is not a terminal (-tt forces one)")

    def resume(request_id: str) -> str:
        """This exec again, redeeming approval request ``request_id``."""
        terminal_flag = (["-tt"] if pty >= 2 else ["-t"]) if on_terminal else []
        return shlex.join([
            "exec", *(["-n"] if no_stdin else []), *terminal_flag, "--approval", request_id,
            agent, "--", *command,
        ])  # fmt: skip

    def run() -> int:
        api = Session.from_home(home)
        environ = dict(os.environ)
        size_fd = 1 if no_stdin else window_fd()
        size = read_window_size(size_fd) if on_terminal else None
        ask = SessionAsk(agent, "exec", command) if size is None else SessionAsk(
            agent, "exec", command, terminal_type(environ), size.rows, size.cols
        )
        try:
            try:
                obtained = obtain_ticket(
                    api, ask, _say, wait=wait_for_approval, approval_id=approval_id,
                    resume=resume,
                )
            except ApiError as error:
                raise _explained_refusal(api, agent, error) from None
            if isinstance(obtained, Parked):
                return _parked(obtained, resume(obtained.pending.request_id))
            ticket = obtained
            if size is not None:
                outcome = trio.run(
                    run_connect, ticket, api.identity, known_agents_of(home),
                    exec_terminal_start(command, size, environ),
                    ConnectOptions(read_input=not no_stdin),
                    offer_refusal_probe(api, ticket.session_id), _session_notices(api, ticket),
                )
                return _terminal_exit(outcome, command, agent)
            options = ExecOptions(
                command=tuple(command), read_stdin=should_read_stdin(no_stdin, force_stdin)
            )
            on_opened = None if status_fd is None else partial(
                _report_to_parent, status_fd, "opened"
            )
            status: int = trio.run(
                run_exec, ticket, api.identity, known_agents_of(home), options,
                offer_refusal_probe(api, ticket.session_id), _session_notices(api, ticket),
                on_opened,
            )
        finally:
            api.close()
        if status_fd is not None:
            _report_to_parent(status_fd, f"exit {status}", last=True)
        _explain_exit(status, command, agent)
        return status

    return _reported(run, debug)


def _terminal_exit(outcome: ConnectOutcome, command: Sequence[str], agent: str) -> int:
    """Report how ``exec -t`` ended, as connect does, and return its exit status."""
    for note in outcome.notes:
        print(note, file=sys.stderr)
    if outcome.message:
        if f"extra ['{PTY_FIELD}']" in outcome.message:
            outcome.message += (
                " — the agent predates exec -t: upgrade it, or run the command inside "
                f"tucdesk connect {shlex.quote(agent)}"
            )
        _say(outcome.message)
    _explain_exit(outcome.exit_code, command, agent)
    return outcome.exit_code


def _explain_exit(status: int, command: Sequence[str], agent: str) -> None:
    """A hint after a status that usually means the command was written for a shell."""
    if status == EXIT_NOT_FOUND and _looks_like_shell_code(command):
        _say(f"(exec runs argv without a shell; for a pipeline use: tucdesk exec "
             f"{shlex.quote(agent)} -- sh -c {shlex.quote(command[0])})")
    elif status == EXIT_NOT_FOUND and command[0].startswith("-"):
        _say(f"(options after the agent name need a -- after them: tucdesk exec "
             f"{shlex.quote(agent)} {command[0]} -- CMD [ARGS...])")


def _is_terminal(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def _report_to_parent(fd: int, line: str, *, last: bool = False) -> None:
    """Tell the parent `exec --tag` how far the session got: ``opened`` (the agent took it, so
    a failure from now on is not a set-up failure), then ``exit N`` (the command ran: its
    status, 255 included, is the command's own) and the pipe is closed."""
    try:
        os.write(fd, f"{line}\n".encode())
        if last:
            os.close(fd)
    except OSError:
        pass  # no parent listening: the exit status alone still says it


def ssh_command(
    home: CliHome,
    agent: str,
    words: Sequence[str],
    *,
    no_stdin: bool,
    debug: bool = False,
    pty: int = 0,
) -> int:
    """`tucdesk ssh AGENT WORD…`: join the words with single spaces, as ssh does, and run the
    line with ``sh -c`` on the agent (the remote shell rsync -e and GIT_SSH_COMMAND expect);
    ``pty`` counts -t as exec's does."""
    line = " ".join(words)
    return exec_command(
        home, agent, [*SSH_SHELL, line], no_stdin=no_stdin, force_stdin=False, debug=debug,
        pty=pty,
    )


def _looks_like_shell_code(command: Sequence[str]) -> bool:
    """One argument with a space or shell syntax in it: meant for a shell, as ssh would run it."""
    return len(command) == 1 and any(character in SHELL_SYNTAX for character in command[0])


def _parked(parked: Parked, resume: str) -> int:
    """--no-wait: the request id on stdout (for scripts), what to do next on stderr. Exit 0
    means the request was submitted, not that anything ran: the message says so."""
    print(parked.pending.request_id)
    _say(f"not run yet: approval request {visible(parked.pending.request_id)} submitted; "
         f"{parked.pending.waiting_line()}; once approved, run: tucdesk {resume}")
    return EXIT_OK


def connect_command(
    home: CliHome,
    agent: str,
    escape_char: str = "~",
    *,
    debug: bool = False,
    wait_for_approval: bool = True,
    approval_id: str | None = None,
) -> int:
    """`tucdesk connect AGENT`: the remote shell's exit status, or 255 (approvals as for exec)."""
    try:
        escape = parse_escape_character(escape_char)
    except EscapeCharacterError as error:
        _say(str(error))
        return EXIT_CONNECTION_FAILED

    def resume(request_id: str) -> str:
        """This connect again, redeeming approval request ``request_id``."""
        return f"connect --approval {request_id} {shlex.quote(agent)}"

    def run() -> int:
        size = read_window_size(window_fd())
        environ: dict[str, str] = dict(os.environ)
        if not os.isatty(0):
            # No mode runs a shell without a terminal yet (exec is for one command): the shell
            # gets a PTY anyway, as with `ssh -tt`. A dumb terminal keeps its line editor from
            # adding control codes to piped output, and the agent types the end of input once
            # the shell reads it.
            _say("stdin is not a terminal: the remote shell still runs on a terminal, so input "
                 f"is echoed; for scripts use: tucdesk exec {shlex.quote(agent)} -- sh -s")
            environ["TERM"] = PIPED_TERMINAL_TYPE
        start = shell_start(size, environ)
        api = Session.from_home(home)
        try:
            try:
                obtained = obtain_ticket(
                    api,
                    SessionAsk(agent, "shell", None, start.terminal_type, size.rows, size.cols),
                    _say, wait=wait_for_approval, approval_id=approval_id, resume=resume,
                )
            except ApiError as error:
                raise _explained_refusal(api, agent, error) from None
            if isinstance(obtained, Parked):
                return _parked(obtained, resume(obtained.pending.request_id))
            ticket = obtained
            outcome = trio.run(
                run_connect, ticket, api.identity, known_agents_of(home), start,
                ConnectOptions(escape_character=escape),
                offer_refusal_probe(api, ticket.session_id), _session_notices(api, ticket),
            )
        finally:
            api.close()
        for note in outcome.notes:
            print(note, file=sys.stderr)
        if outcome.message:
            _say(outcome.message)
        return outcome.exit_code

    return _reported(run, debug)


def agents_trust(
    home: CliHome,
    agent: str,
    *,
    assume_yes: bool,
    ask: Callable[[str], str] = input,
    fingerprint: str | None = None,
) -> int:
    """`tucdesk agents trust NAME_OR_ID`: pin the agent's listed key for its id and its name.

    With ``fingerprint`` (the key the operator expects, checked out of band) nothing is asked:
    the listed key is pinned only when its fingerprint is exactly that one, else refused; the
    agent must then present that key at every handshake (the pin check).
    """
    if fingerprint is not None and not _is_fingerprint(fingerprint):
        _say(f"--fingerprint {visible(repr(fingerprint[:80]))} is not a key fingerprint: give it "
             f"as tucdesk-agent status shows it, SHA256: followed by 43 base64 characters")
        return EXIT_FAILURE

    def run() -> int:
        listed, same_name = _find_listed_agent(home, agent)
        agent_id = str(listed["id"])
        name = str(listed.get("name") or agent_id)
        key_text = listed.get("public_key")
        if not isinstance(key_text, str):
            raise SessionError("the server does not list agent keys; is it the same version?")
        key = PublicIdentity(b64url_decode(key_text, 64))
        if fingerprint is not None and not hmac.compare_digest(
            key.fingerprint.encode(), fingerprint.encode()
        ):
            _say(f"agent {visible(name)} ({visible(agent_id)}) is registered with key "
                 f"{key.fingerprint}, not the expected {fingerprint}: nothing was pinned. Check "
                 f"the key on the host (tucdesk-agent status); the agent may have been "
                 f"re-enrolled, or someone may be impersonating it")
            return EXIT_FAILURE
        known = known_agents_of(home)
        pinned = known.pinned_key(agent_id)
        named = known.pins_for_name(name)
        if (pinned is not None and hmac.compare_digest(pinned.raw, key.raw)
                and agent_id in named):
            print(f"agent {name} ({agent_id}) is already trusted with key {key.fingerprint}")
            return EXIT_OK
        print(f"agent {name} ({agent_id})")
        print(f"  pinned key: {pinned.fingerprint if pinned else '(none)'}")
        for other_id, other_key in sorted(named.items()):
            if other_id != agent_id:
                print(f"  pinned key for the name {name}: {other_key.fingerprint}  ({other_id})")
        print(f"  listed key: {key.fingerprint}  (as registered with the rendezvous)")
        if not assume_yes and fingerprint is None:
            if not sys.stdin.isatty():
                _say("not confirmed: run it in a terminal, or pass --yes once you have checked "
                     "the fingerprint")
                return EXIT_DECLINED
            if not answered_yes(ask, "Trust the listed key from now on? Check it with the "
                                "agent's admin first (tucdesk-agent status). [y/N] "):
                print("not changed")
                return EXIT_DECLINED
        # Agents still registered under the name stay accepted for it; removed ones do not.
        known.trust(agent_id, key, name=name, keep=same_name)
        print(f"agent {name} ({agent_id}) is now pinned to {key.fingerprint}")
        return EXIT_OK

    try:
        return run()
    except (ApiError, HttpError, SessionError, KnownAgentsError, HomeError,
            ProtocolError) as error:
        message = (f"the server refused: {error.message} ({error.code})"
                   if isinstance(error, ApiError) else str(error) or type(error).__name__)
        _say(message)
        return EXIT_FAILURE


def _is_fingerprint(text: str) -> bool:
    """Whether ``text`` has the form of a key fingerprint (PublicIdentity.fingerprint)."""
    return FINGERPRINT_PATTERN.fullmatch(text) is not None


def known_agents_of(home: CliHome) -> KnownAgents:
    """The CLI home's known agents, with names pinned under the server it is logged in to."""
    settings = home.load_settings()
    if settings is None:
        raise HomeError("not logged in: run 'tucdesk login --server URL --invite CODE' first")
    return KnownAgents.in_home(home.path, settings.server)


def _find_listed_agent(home: CliHome, agent: str) -> tuple[dict[str, Any], set[str]]:
    """The agent ``agent`` names (an id, or a name only one agent has) as listed, and the ids of
    every agent listed under its name."""
    api = Session.from_home(home)
    try:
        matches = agents_named(api, agent)
        if not matches:
            raise SessionError(f"no agent called {agent!r} in your team")
        if matches[0]["id"] != agent and len(matches) > 1:
            raise SessionError(_trust_ambiguity_message(agent, matches))
        listed = dict(matches[0])
        name = listed.get("name")
        same_name = (agents_named(api, name) if isinstance(name, str) and name != agent
                     else matches)
    except AgentListError as error:
        raise SessionError(str(error)) from None
    finally:
        api.close()
    return listed, {str(match["id"]) for match in same_name if match.get("name") == name}


def _trust_ambiguity_message(name: str, matches: Sequence[Any]) -> str:
    """The error of `agents trust` for a name several agents share: each with its id, state and
    registration time (the newest is usually a re-enrollment), and to give the id."""
    listed = ", ".join(
        f"{match.get('id')} ({'online' if match.get('online') else 'offline'}, registered "
        f"{_registered_when(match.get('registered_at'))})"
        for match in matches
    )
    return (f"several agents are called {name!r}: {listed}; give the id of the one to trust: "
            f"tucdesk agents trust AGENT_ID")


def _registered_when(timestamp: object) -> str:
    if not isinstance(timestamp, int | float):
        return "at an unknown time"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def ambiguity_message(name: str, matches: Sequence[Any]) -> str:
    """The error for a name several agents share, listing them (name, id, online) to pick from."""
    listed = ", ".join(
        f"{match.get('id')} ({match.get('name')}, {'online' if match.get('online') else 'offline'})"
        for match in matches
    )
    return f"several agents are called {name!r}: {listed}; use the agent id"


def _explained_refusal(api: Session, agent: str, error: ApiError) -> BaseException:
    """The rendezvous's refusal, with the agents a mistyped or shared name could mean."""
    if error.code == AGENT_NOT_FOUND:
        return _explained_unknown_agent(api, agent, error)
    return _explained_ambiguity(api, agent, error)


def _explained_unknown_agent(api: Session, agent: str, error: ApiError) -> BaseException:
    """agent_not_found with the close names the operator may mean (only on this error path:
    a session that opens costs no extra request)."""
    try:
        # One page at most: a typo on a team of thousands must not cost a request per page.
        listing = fetch_agents(api, limit=SUGGESTION_SEARCH_LIMIT)
        names = sorted({str(listed["name"]) for listed in listing.agents
                        if isinstance(listed.get("name"), str)})
    except (AgentListError, ApiError, HttpError, KeyError):
        return error  # cannot list them: the server's own message still says what is wrong
    # Names come from whoever enrolled the agents: escaped, never raw to the terminal.
    close = [visible(name) for name in suggested_names(agent, names)]
    typed = visible(repr(agent))
    searched = f"; searched the first {len(listing.agents)} agents" if listing.more else ""
    if not close:
        return SessionError(f"no agent named {typed} in your team (see tucdesk agents{searched})")
    return SessionError(f"no agent named {typed} in your team; did you mean "
                        f"{' or '.join(close)}? (see tucdesk agents{searched})")


def suggested_names(wanted: str, names: Sequence[str]) -> list[str]:
    """Names close to ``wanted``: the same but for case first, then the nearest by difflib."""
    import difflib  # here: only the agent_not_found path needs it, not every session's start-up

    folded = {name.casefold(): name for name in names}
    same = [name for name in names if name.casefold() == wanted.casefold()]
    near = difflib.get_close_matches(wanted.casefold(), list(folded), n=MAX_SUGGESTIONS,
                                     cutoff=0.6)
    prefixed = [name for name in names if name.casefold().startswith(wanted.casefold())]
    chosen = dict.fromkeys([*same, *(folded[name] for name in near), *prefixed])
    return list(chosen)[:MAX_SUGGESTIONS]


def _explained_ambiguity(api: Session, agent: str, error: ApiError) -> BaseException:
    """The rendezvous's ambiguous_target refusal with the agents it could mean listed."""
    if error.code != AMBIGUOUS_TARGET:
        return error
    try:
        matches = agents_named(api, agent)
    except (AgentListError, ApiError, HttpError):
        return error  # cannot list them: the server's own message still says what to do
    if len(matches) < 2:
        return error
    return SessionError(ambiguity_message(agent, matches))
