"""`tucdesk agents remove AGENT`: cut a lost, stolen or retired host off for good (admins).

The agent is resolved by name or id through the team's list, shown (name, id, key fingerprint,
last seen) and, unless ``--yes``, confirmed at a terminal; without a terminal to ask at, nothing
is removed. The rendezvous then refuses the agent's key for ever, closes its live control
channel and drops it from the list, so its name is free for the host's next enrollment.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import quote

from operator_cli.agent_listing import AGENTS_PATH, AgentListError, one_agent_named
from operator_cli.client import Session
from operator_cli.confirm import answered_yes
from operator_cli.home import CliHome

EXIT_OK = 0
EXIT_FAILURE = 1


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
    return EXIT_OK


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
