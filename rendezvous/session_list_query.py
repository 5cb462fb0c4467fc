"""The query string of ``GET /v1/sessions``: a page (``limit``, ``after``) and filters
(``state``, ``agent``, ``operator``, ``since``), and the opaque cursor that ``next_after`` hands
out. ``agent`` (an id, or a name) and ``operator`` (an id, or an email) are parsed here and
resolved in the caller's team by the route (rendezvous/routes_sessions.py).

A cursor is the base64url of the JSON ``[created_at, id]`` of the last session listed: the
position in the list's newest-first order, nothing more. The team always comes from the
credential, so a cursor made up, or issued to another team, only positions the caller inside
its own team. The parsing and the cursor encoding are the agent list's
(``rendezvous.agent_list_query``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rendezvous.agent_list_query import (
    MAX_CURSOR_FIELD_LENGTH,
    MalformedCursor,
    decoded_position,
    encode_position,
    page_limit,
    query_values,
)
from rendezvous.errors import ServiceError
from rendezvous.store.base import SessionQuery, SessionState

DEFAULT_SESSIONS_PER_PAGE = 100
MAX_SESSIONS_PER_PAGE = 1000
MAX_ID_FILTER_LENGTH = 255
MAX_TIME_TEXT_LENGTH = 32
MAX_QUERY_FIELDS = len(SessionState) + 8
_SINGLE_VALUED = ("limit", "after", "agent", "operator", "since")
_STATES = ", ".join(state.value for state in SessionState)


class InvalidSessionListQuery(ServiceError):
    """A query parameter is out of bounds: refused as the service refuses any invalid input."""

    status = 422
    code = "invalid_request"


@dataclass(frozen=True)
class SessionListAsk:
    """A parsed session list query: the page and the state and time filters (``query``, its
    agent and operator not set), and the agent and operator as asked, not yet resolved."""

    query: SessionQuery
    agent: str | None = None  # an agent's id (removed agents too) or name
    operator: str | None = None  # an operator's id or email


def session_query(query_string: bytes) -> SessionListAsk:
    """The page and filters a raw query string asks for; InvalidSessionListQuery or
    MalformedCursor (both ServiceErrors) when it is out of bounds. Unknown names are ignored."""
    values = query_values(
        query_string,
        max_fields=MAX_QUERY_FIELDS,
        single_valued=_SINGLE_VALUED,
        invalid=InvalidSessionListQuery,
    )
    limit = page_limit(
        values.get("limit"),
        default=DEFAULT_SESSIONS_PER_PAGE,
        maximum=MAX_SESSIONS_PER_PAGE,
        invalid=InvalidSessionListQuery,
    )
    states: list[SessionState] = []
    for text in values.get("state", []):
        try:
            states.append(SessionState(text))
        except ValueError:
            raise InvalidSessionListQuery(f"state: must be one of {_STATES}") from None
    after = values.get("after")
    since = values.get("since")
    query = SessionQuery(
        limit=limit,
        after=decode_session_cursor(after[0]) if after is not None else None,
        states=tuple(dict.fromkeys(states)),
        since=_since(since[0]) if since is not None else None,
    )
    return SessionListAsk(
        query,
        agent=_identifier("agent", values.get("agent"), "an agent id or name"),
        operator=_identifier("operator", values.get("operator"), "an operator id or email"),
    )


def encode_session_cursor(created_at: float, session_id: str) -> str:
    """The opaque ``next_after`` of a page whose last session is (``created_at``, id)."""
    return encode_position(float(created_at), session_id)


def decode_session_cursor(cursor: str) -> tuple[float, str]:
    """The (created_at, id) position in a cursor from ``encode_session_cursor``;
    MalformedCursor otherwise."""
    position = decoded_position(cursor)
    if position is not None and len(position) == 2:
        created_at, session_id = position
        if (
            isinstance(created_at, float)
            and isinstance(session_id, str)
            and 1 <= len(session_id) <= MAX_CURSOR_FIELD_LENGTH
        ):
            return created_at, session_id
    raise MalformedCursor(
        "after: not a cursor from this list; pass the next_after of the previous page, or "
        "leave after out to start from the newest session"
    )


def _identifier(field: str, values: list[str] | None, what: str) -> str | None:
    if values is None:
        return None
    if not 1 <= len(values[0]) <= MAX_ID_FILTER_LENGTH:
        raise InvalidSessionListQuery(f"{field}: must be {what} of 1..{MAX_ID_FILTER_LENGTH} "
                                      "characters")  # fmt: skip
    return values[0]


def _since(text: str) -> float:
    # A plain decimal Unix time: float() alone would also take "nan", "inf", "1e999", " 5".
    digits = text.replace(".", "", 1)
    if len(text) <= MAX_TIME_TEXT_LENGTH and digits.isascii() and digits.isdigit():
        since = float(text)
        if math.isfinite(since):
            return since
    raise InvalidSessionListQuery(
        "since: must be a Unix time in seconds, e.g. 1767225600 or 1767225600.5"
    )
