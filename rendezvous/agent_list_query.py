"""The query string of ``GET /v1/agents``: a page (``limit``, ``after``) and filters (``tag``,
``online``, ``name``), and the opaque cursor that ``next_after`` hands out.

A cursor is the base64url of the JSON ``[name, id]`` of the last agent listed: the position in
the list's (name, id) order, nothing more. The team always comes from the credential, so a
cursor made up, or issued to another team, only positions the caller inside its own team.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl

from protocol.errors import ProtocolError
from protocol.identity import b64url, b64url_decode
from rendezvous.errors import BadRequest, ServiceError
from rendezvous.schemas import MAX_TAG_LENGTH, MAX_TAGS
from rendezvous.store import AgentQuery

DEFAULT_AGENTS_PER_PAGE = 500
MAX_AGENTS_PER_PAGE = 1000
MAX_NAME_PREFIX_LENGTH = 255
MAX_CURSOR_FIELD_LENGTH = 255
MAX_CURSOR_BYTES = 2 * MAX_CURSOR_FIELD_LENGTH * 12 + 16  # JSON writes a character in <= 12 bytes
MAX_QUERY_FIELDS = MAX_TAGS + 8
_SINGLE_VALUED = ("limit", "after", "online", "name")


class InvalidAgentListQuery(ServiceError):
    """A query parameter is out of bounds: refused as the service refuses any invalid input."""

    status = 422
    code = "invalid_request"


class MalformedCursor(BadRequest):
    """``after`` is not a cursor this service hands out."""


def agent_query(query_string: bytes) -> AgentQuery:
    """The page and filters a raw query string asks for; InvalidAgentListQuery or
    MalformedCursor (both ServiceErrors) when it is out of bounds. Unknown names are ignored."""
    values = query_values(
        query_string,
        max_fields=MAX_QUERY_FIELDS,
        single_valued=_SINGLE_VALUED,
        invalid=InvalidAgentListQuery,
    )
    limit = page_limit(
        values.get("limit"),
        default=DEFAULT_AGENTS_PER_PAGE,
        maximum=MAX_AGENTS_PER_PAGE,
        invalid=InvalidAgentListQuery,
    )
    after = values.get("after")
    tags = values.get("tag", [])
    if len(tags) > MAX_TAGS:
        raise InvalidAgentListQuery(f"tag: at most {MAX_TAGS} tags")
    for tag in tags:
        if not tag or len(tag) > MAX_TAG_LENGTH:
            raise InvalidAgentListQuery(f"tag: each tag must be 1..{MAX_TAG_LENGTH} characters")
    prefix = values.get("name")
    if prefix is not None and not 1 <= len(prefix[0]) <= MAX_NAME_PREFIX_LENGTH:
        raise InvalidAgentListQuery(f"name: must be 1..{MAX_NAME_PREFIX_LENGTH} characters")
    return AgentQuery(
        limit=limit,
        after=decode_cursor(after[0]) if after is not None else None,
        tags=tuple(dict.fromkeys(tags)),
        online=_online(values.get("online")),
        name_prefix=prefix[0] if prefix is not None else None,
    )


def encode_cursor(name: str, agent_id: str) -> str:
    """The opaque ``next_after`` of a page whose last agent is (``name``, ``agent_id``)."""
    return encode_position(name, agent_id)


def decode_cursor(cursor: str) -> tuple[str, str]:
    """The (name, id) position in a cursor from ``encode_cursor``; MalformedCursor otherwise."""
    position = decoded_position(cursor)
    if (
        position is not None
        and len(position) == 2
        and all(
            isinstance(part, str) and 1 <= len(part) <= MAX_CURSOR_FIELD_LENGTH
            for part in position
        )
    ):
        return str(position[0]), str(position[1])
    raise MalformedCursor(
        "after: not a cursor from this list; pass the next_after of the previous page, or "
        "leave after out to start from the first agent"
    )


# ---- shared by the list endpoints (rendezvous.session_list_query too) ----------------------


def query_values(
    query_string: bytes,
    *,
    max_fields: int,
    single_valued: Iterable[str],
    invalid: type[ServiceError],
) -> dict[str, list[str]]:
    """Each field of a raw query string with its values in order; ``invalid`` when it is not
    UTF-8, has more than ``max_fields`` fields, or repeats one of ``single_valued``."""
    try:
        fields = parse_qsl(
            query_string.decode("latin-1"),
            keep_blank_values=True,
            encoding="utf-8",
            errors="strict",
            max_num_fields=max_fields,
        )
    except UnicodeDecodeError:
        raise invalid("query: not valid UTF-8 once percent-decoded") from None
    except ValueError:
        raise invalid(f"query: more than {max_fields} fields") from None
    values: dict[str, list[str]] = {}
    for field, value in fields:
        values.setdefault(field, []).append(value)
    for field in single_valued:
        if len(values.get(field, ())) > 1:
            raise invalid(f"{field}: give it at most once")
    return values


def page_limit(
    values: list[str] | None, *, default: int, maximum: int, invalid: type[ServiceError]
) -> int:
    """The ``limit`` a query asks for (``default`` without one); ``invalid`` unless it is a
    whole number from 1 to ``maximum``."""
    if values is None:
        return default
    text = values[0]
    # ASCII digits only: int() would also take "+5", " 5", "5_0" and other digits.
    if text.isascii() and text.isdigit() and len(text) <= 7:
        limit = int(text)
        if 1 <= limit <= maximum:
            return limit
    raise invalid(f"limit: must be a whole number from 1 to {maximum} (default {default})")


def openapi_query_parameter(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    """An optional query parameter as the OpenAPI document describes it (lists parse their own
    query strings, so FastAPI cannot derive these)."""
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema}  # fmt: skip


def encode_position(*parts: str | float) -> str:
    """An opaque cursor: the base64url of the JSON list of a position's sort keys."""
    return b64url(json.dumps(list(parts), separators=(",", ":")).encode("utf-8"))


def decoded_position(cursor: str) -> list[str | float] | None:
    """The sort keys in a cursor exactly as ``encode_position`` writes them (text, or finite
    non-integral-typed numbers), or None: the caller checks their number and types."""
    try:
        position = json.loads(b64url_decode(cursor, max_size=MAX_CURSOR_BYTES))
    except (ProtocolError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(position, list) or not all(
        isinstance(part, str) or (type(part) is float and math.isfinite(part))
        for part in position
    ):
        return None
    # Only the one spelling this service writes: no second cursor for the same position.
    if encode_position(*position) != cursor:
        return None
    return position


def _online(values: list[str] | None) -> bool | None:
    if values is None:
        return None
    if values[0] in ("true", "false"):
        return values[0] == "true"
    raise InvalidAgentListQuery("online: must be true or false")
