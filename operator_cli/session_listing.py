"""The team's sessions as ``GET /v1/sessions`` pages them, newest first, and the table
``tucdesk sessions`` prints of them.

The service answers at most a page of sessions at a time, with the opaque ``next_after`` of the
page that follows (null on the last); an operator who is neither admin nor auditor gets only
their own sessions (asking for someone else's is refused). The agent and operator filters go to
the service as given: it resolves an agent's name or id (a removed agent's too) and an
operator's email or id in the team, and refuses one that names nobody.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from operator_cli.agent_listing import AgentListError
from operator_cli.paged_list import ApiSession, follow_pages
from operator_cli.terminal_text import cut, shown_command, visible

SESSIONS_PATH = "/v1/sessions"
PAGE_SIZE = 1000  # the largest page the service hands out: the fewest round trips
MIN_COMMAND_WIDTH = 12
MAX_COMMAND_WIDTH = 1_000_000  # no cut: an exec argv is far shorter (a grant's size limit)
# (heading, width) of each column before COMMAND, which gets what is left of the terminal.
_COLUMNS = (
    ("SESSION", 24), ("AGENT", 20), ("OPERATOR", 24), ("MODE", 5), ("STATE", 8),
    ("CREATED", 19),
)  # fmt: skip


class SessionListError(AgentListError):
    """The service's pages do not make a list."""


@dataclass(frozen=True)
class SessionFilter:
    """Which sessions to list: in any of ``states`` (empty: any), on one agent (its id or name)
    and of one operator (its id or email) (None: any), created at or after the Unix time
    ``since`` (None: ever)."""

    states: tuple[str, ...] = ()
    agent: str | None = None
    operator: str | None = None
    since: float | None = None


@dataclass
class SessionList:
    """The sessions fetched, newest first; ``more`` is True when ``limit`` stopped the listing
    before the service's last page."""

    sessions: list[dict[str, Any]] = field(default_factory=list)
    more: bool = False


def fetch_sessions(
    session: ApiSession,
    filters: SessionFilter | None = None,
    *,
    limit: int,
    page_size: int = PAGE_SIZE,
) -> SessionList:
    """The newest ``limit`` sessions matching ``filters``, following ``next_after`` page by
    page until the last page or until ``limit`` sessions."""
    chosen = filters or SessionFilter()
    pages = follow_pages(
        session,
        lambda wanted, after: sessions_page_path(chosen, wanted, after),
        "sessions",
        limit=limit,
        page_size=page_size,
        error=SessionListError,
    )
    return SessionList(pages.items, pages.more)


def sessions_page_path(filters: SessionFilter, limit: int, after: str | None) -> str:
    """The request path of one page of the session list."""
    query: list[tuple[str, str]] = [("limit", str(limit))]
    query += [("state", state) for state in filters.states]
    if filters.agent is not None:
        query.append(("agent", filters.agent))
    if filters.operator is not None:
        query.append(("operator", filters.operator))
    if filters.since is not None:
        query.append(("since", _unix_time_text(filters.since)))
    if after is not None:
        query.append(("after", after))
    return f"{SESSIONS_PATH}?{urlencode(query)}"


def session_table(sessions: list[dict[str, Any]], width: int | None) -> list[str]:
    """The lines of the sessions table: a heading, then one line a session, each at most
    ``width`` characters (COMMAND cut to fit, never below MIN_COMMAND_WIDTH; None: whole)."""
    fixed = sum(column_width + 1 for _, column_width in _COLUMNS)
    command_width = MAX_COMMAND_WIDTH if width is None else max(MIN_COMMAND_WIDTH, width - fixed)
    lines = [_row([heading for heading, _ in _COLUMNS], "COMMAND", command_width)]
    for entry in sessions:
        command = entry.get("command")
        cells = [
            entry["session_id"],
            entry.get("agent_name") or entry["agent_id"],
            entry.get("operator_email") or entry["operator_id"],
            entry["mode"],
            entry["state"],
            datetime.fromtimestamp(entry["created_at"], UTC).strftime("%Y-%m-%d %H:%M:%S"),
        ]
        shown = shown_command(command) if command else "-"
        lines.append(_row(cells, shown, command_width))
    return lines


def session_details(view: dict[str, Any]) -> list[str]:
    """The lines of ``tucdesk sessions show``: one field a line, names beside their ids."""
    command = view.get("command")
    state = view["state"] + (f" ({view['reason']})" if view.get("reason") else "")
    policy = view.get("policy_result") or "-"
    if view.get("policy_rule_id"):
        policy += f" (rule {view['policy_rule_id']})"
    fields = [
        ("Session", view["session_id"]),
        ("Agent", _named(view.get("agent_name"), view["agent_id"])),
        ("Operator", _named(view.get("operator_email"), view["operator_id"])),
        ("Mode", view["mode"]),
        ("Command", shown_command(command) if command else "-"),
        ("State", state),
        ("Exit", exit_status(view)),
        ("Policy", policy),
        ("Relay", view.get("relay_id") or "-"),
        ("Created", _utc(view["created_at"])),
        ("Updated", _utc(view.get("updated_at"))),
        ("Expires", _utc(view.get("expires_at"))),
    ]
    return [f"{label + ':':<10}{_cut(value, MAX_COMMAND_WIDTH)}" for label, value in fields]


def exit_status(view: dict[str, Any]) -> str:
    """How a session's shell or command ended, as its agent signed it: ``code 0``, ``signal
    TERM``, or ``-`` when the agent has not said (still running, refused, lost, older agent)."""
    code, signal = view.get("exit_code"), view.get("exit_signal")
    if signal:
        return f"signal {signal}"
    if code is not None:
        return f"code {code}"
    return "-"


def _named(name: str | None, identifier: str) -> str:
    # The id always shows; the name beside it when the view has one (removed agents and disabled
    # operators keep theirs).
    return f"{name} ({identifier})" if name else identifier


def _utc(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _row(cells: list[str], command: str, command_width: int) -> str:
    parts = [_cut(cell, column_width).ljust(column_width)
             for cell, (_, column_width) in zip(cells, _COLUMNS, strict=True)]  # fmt: skip
    return " ".join([*parts, _cut(command, command_width)]).rstrip()


def _cut(text: str, width: int) -> str:
    # Control characters from a command or name must not move the terminal's cursor: they are
    # shown as visible escapes (\e, \x9b, \u202e), as everywhere else in the CLI.
    return cut(visible(text), width)[0]


def _unix_time_text(value: float) -> str:
    # The service takes plain decimals only (no exponent): whole seconds, or a fixed fraction.
    return str(int(value)) if value == int(value) else f"{value:.6f}"
