"""`tucdesk agents remove AGENT`: cut a lost, stolen or retired host off for good (admins).

The agent is resolved by name or id through the team's list, shown (name, id, key fingerprint,
last seen) and, unless ``--yes``, confirmed at a terminal; without a terminal to ask at, nothing
is removed; the summary says how many open sessions it has. The rendezvous then ends those
sessions (recorded ``session.ended``, reason ``agent_removed``; the agent is told to stop them
down its live channel before that closes), refuses the agent's key for ever, closes its live
control channel and drops it from the list, so its name is free for the host's next enrollment.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import quote

from operator_cli.agent_listing import AGENTS_PATH, AgentListError, one_agent_named
from operator_cli.client import ApiError, Session
from operator_cli.confirm import answered_yes
from operator_cli.home import CliHome
from operator_cli.http import HttpError
from operator_cli.session_listing import SessionFilter, SessionListError, fetch_sessions

EXIT_OK = 0
EXIT_FAILURE = 1
MAX_SESSIONS_COUNTED = 1000


class AgentRemovalError(Exception):
    """The agent to remove cannot be told (none or several match), or it was not confirmed."""


def agents_remove(
    home: CliHome,
    agent: str,
    *,
    assume_yes: bool,
    ask: Callable[[str], str] = input,
    stdin: TextIO | None = None,
) -> int:
    """Remove the agent ``agent`` names after showing it and, unless ``assume_yes``, asking."""
    session = Session.from_home(home)
    try:
        try:
            listed = one_agent_named(session, agent)
        except AgentListError as error:
            raise AgentRemovalError(str(error)) from None
        terminal = stdin if stdin is not None else sys.stdin
        unconfirmable = not assume_yes and not terminal.isatty()
        if unconfirmable:
            # A hypothetical: the details printed bare read as if the removal had happened.
            print("would remove:")
        for line in agent_summary(listed):
            print(line)
        print(f"  open sessions that will end: {_open_session_count(session, str(listed['id']))}")
        if unconfirmable:
            raise AgentRemovalError("not removed: run it in a terminal to confirm, or pass --yes")
        if not assume_yes:
            if not answered_yes(ask, "Remove this agent? Its key will never connect again; the "
                                "host must re-enroll with a new registration key. [y/N] "):
                print("not removed")
                return EXIT_FAILURE
        removed = session.request("DELETE", f"{AGENTS_PATH}/{quote(str(listed['id']), safe='')}")
    except AgentRemovalError as error:
        print(f"tucdesk: {error}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        session.close()
    print(
        f"removed agent {removed['name']} ({removed['id']}), key {removed['key_fingerprint']}: "
        "it can no longer connect, and its name is free; its sessions stay in the history"
    )
    print(removal_sessions_line(removed))
    return EXIT_OK


def removal_sessions_line(removed: dict[str, Any]) -> str:
    """What the removal did to the agent's open sessions (``DELETE /v1/agents/{id}``'s answer)."""
    if removed.get("ending_sessions_failed"):
        return ("ending its open sessions FAILED (the rendezvous's audit log or database): run "
                "the removal again to end them")
    ended = removed.get("ended_sessions")
    count = len(ended) if isinstance(ended, list) else 0
    if count == 0:
        return "open sessions ended: 0"
    reached = removed.get("agent_reached")
    if reached in ("here", "other_instance"):
        how = "the agent was asked to end them before its channel closed"
    else:
        how = "the agent was not connected to be told: they end in the record only"
    return f"open sessions ended: {count} (recorded as agent_removed); {how}"


def _open_session_count(session: Session, agent_id: str) -> str:
    """How many sessions of the agent are open (offered or accepted), as far as it can tell."""
    try:
        listing = fetch_sessions(
            session, SessionFilter(states=("offered", "accepted"), agent=agent_id),
            limit=MAX_SESSIONS_COUNTED,
        )  # fmt: skip
    except (ApiError, HttpError, SessionListError):
        return "unknown (the session list could not be read)"
    count = len(listing.sessions)
    return f"at least {count}" if listing.more else str(count)


def agent_summary(agent: dict[str, Any]) -> list[str]:
    """What an admin checks before removing ``agent`` (an entry of the agent list)."""
    state = "online now" if agent.get("online") else "offline"
    return [
        f"agent {agent['name']} ({agent['id']})",
        f"  host name: {agent.get('hostname', '-')}",
        f"  key:       {agent['key_fingerprint']}",
        f"  last seen: {_when(agent.get('last_seen_at'))} ({state})",
    ]


def _when(timestamp: object) -> str:
    if not isinstance(timestamp, int | float):
        return "never"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
