"""`tucdesk sessions end`: an admin ends one open session, or every open session of one agent or
one operator, without disabling anyone or removing anything (as Teleport terminates a session).

Each session is shown and, unless ``--yes``, confirmed at a terminal; without a terminal to ask
at, nothing is ended. The rendezvous records ``session.ended`` by the admin (reason
``ended_by_admin``), ends the row, and tells the agent over its control channel on whichever
instance holds it; the agent ends the shell or command at once. Each line printed says whether
the agent was reached: one whose channel is down is told when it reconnects.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TextIO
from urllib.parse import quote

from operator_cli.client import Session
from operator_cli.confirm import answered_yes
from operator_cli.home import CliHome
from operator_cli.session_listing import (
    SESSIONS_PATH,
    SessionFilter,
    fetch_sessions,
    session_table,
)
from operator_cli.terminal_text import visible

EXIT_OK = 0
EXIT_FAILURE = 1
OPEN_STATES = ("offered", "accepted")
# Open sessions one `sessions end --agent/--operator` ends at most (run it again for the rest).
MAX_SESSIONS_ENDED = 1000
# What the service's agent_reached says, in words.
REACHED_WORDS = {
    "here": "the agent was told to end it now",
    "other_instance": "the agent was told (through the rendezvous instance holding its channel)",
    "not_connected": "the agent is not connected now: it is told to end it when it reconnects",
}


class SessionEndError(Exception):
    """What to end cannot be told, or it was not confirmed."""


def sessions_end(
    home: CliHome,
    session_id: str | None,
    *,
    agent: str | None = None,
    operator: str | None = None,
    assume_yes: bool,
    ask: Callable[[str], str] = input,
    stdin: TextIO | None = None,
) -> int:
    """End the session ``session_id`` names, or the open sessions of ``agent`` or ``operator``,
    after showing them and, unless ``assume_yes``, asking."""
    if sum(x is not None for x in (session_id, agent, operator)) != 1:
        print("tucdesk: give one SESSION_ID, or --agent, or --operator", file=sys.stderr)
        return EXIT_FAILURE
    session = Session.from_home(home)
    try:
        targets = _open_sessions(session, session_id, agent, operator)
        if not targets:
            print("no open session to end")
            return EXIT_OK
        if targets[0].get("state") not in OPEN_STATES:  # one session, named by its id
            print(ended_line({"session": targets[0], "already_ended": True}))
            return EXIT_OK
        terminal = stdin if stdin is not None else sys.stdin
        unconfirmable = not assume_yes and not terminal.isatty()
        if unconfirmable:
            print("would end:")
        for line in session_table(targets, None):
            print(line)
        if unconfirmable:
            raise SessionEndError("nothing ended: run it in a terminal to confirm, or pass --yes")
        if not assume_yes and not answered_yes(
            ask, f"End {_count(len(targets))} now? Its shell or command is stopped. [y/N] "
        ):
            print("nothing ended")
            return EXIT_FAILURE
        for target in targets:
            answer = session.request("POST", f"{SESSIONS_PATH}/{_segment(target)}/end")
            print(ended_line(answer))
    except SessionEndError as error:
        print(f"tucdesk: {error}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        session.close()
    return EXIT_OK


def ended_line(answer: dict[str, Any]) -> str:
    """The line printed for one ``POST /v1/sessions/{id}/end`` answer."""
    view = answer["session"]
    session_id = visible(str(view["session_id"]))
    if answer.get("already_ended"):
        reason = f" ({visible(str(view['reason']))})" if view.get("reason") else ""
        return f"session {session_id} was already {visible(str(view['state']))}{reason}"
    reached = REACHED_WORDS.get(str(answer.get("agent_reached")), "the agent's answer is unknown")
    return f"ended session {session_id} (recorded as ended_by_admin): {reached}"


def _open_sessions(
    session: Session, session_id: str | None, agent: str | None, operator: str | None
) -> list[dict[str, Any]]:
    if session_id is not None:
        view = session.request("GET", f"{SESSIONS_PATH}/{_segment({'session_id': session_id})}")
        return [view] if isinstance(view, dict) else []
    listing = fetch_sessions(
        session, SessionFilter(states=OPEN_STATES, agent=agent, operator=operator),
        limit=MAX_SESSIONS_ENDED,
    )  # fmt: skip
    return listing.sessions


def _segment(view: dict[str, Any]) -> str:
    return quote(str(view["session_id"]), safe="")


def _count(count: int) -> str:
    return "this session" if count == 1 else f"these {count} sessions"
