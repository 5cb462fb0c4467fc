"""The team's agents as ``GET /v1/agents`` pages them: every page in turn, filtered.

The service answers at most a page of agents at a time, with the opaque ``next_after`` of the
page that follows (null on the last). Listing commands and name resolution go through here, so
they see every agent of a team of any size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

from operator_cli.paged_list import ApiSession, follow_pages

AGENTS_PATH = "/v1/agents"
PAGE_SIZE = 1000  # the largest page the service hands out: the fewest round trips
# Agent ids are ``agt_`` and random letters; a host name could look like one too.
AGENT_ID_PREFIX = "agt_"


class AgentListError(Exception):
    """The service's pages do not make a list (a repeated cursor, an unending list)."""


@dataclass(frozen=True)
class AgentFilter:
    """Which agents to list: carrying every tag, online or offline (None: both), and named
    with a prefix (None: any name)."""

    tags: tuple[str, ...] = ()
    online: bool | None = None
    name_prefix: str | None = None


@dataclass
class AgentList:
    """The agents fetched (in name, id order) and the team's policy version; ``more`` is True
    when ``limit`` stopped the listing before the service's last page."""

    agents: list[dict[str, Any]] = field(default_factory=list)
    policy_version: int | None = None
    more: bool = False


def fetch_agents(
    session: ApiSession,
    filters: AgentFilter | None = None,
    *,
    limit: int | None = None,
    page_size: int = PAGE_SIZE,
) -> AgentList:
    """The agents matching ``filters``, following ``next_after`` page by page until the last
    page, or until ``limit`` agents (None: all of them)."""
    chosen = filters or AgentFilter()
    pages = follow_pages(
        session,
        lambda wanted, after: agents_page_path(chosen, wanted, after),
        "agents",
        limit=limit,
        page_size=page_size,
        error=AgentListError,
    )
    version = None if pages.first is None else pages.first.get("policy_version")
    return AgentList(pages.items, version, pages.more)


def agents_page_path(filters: AgentFilter, limit: int, after: str | None) -> str:
    """The request path of one page of the agent list."""
    query: list[tuple[str, str]] = [("limit", str(limit))]
    query += [("tag", tag) for tag in filters.tags]
    if filters.online is not None:
        query.append(("online", "true" if filters.online else "false"))
    if filters.name_prefix is not None:
        query.append(("name", filters.name_prefix))
    if after is not None:
        query.append(("after", after))
    return f"{AGENTS_PATH}?{urlencode(query)}"


def agents_named(
    session: ApiSession, name_or_id: str, *, page_size: int = PAGE_SIZE
) -> list[dict[str, Any]]:
    """The team's agents whose id or name is exactly ``name_or_id`` (ids first).

    Only the agents whose name starts with it are fetched, unless it looks like an agent id.
    """
    if not name_or_id:
        return []
    by_name = None if name_or_id.startswith(AGENT_ID_PREFIX) else name_or_id
    agents = fetch_agents(session, AgentFilter(name_prefix=by_name), page_size=page_size).agents
    by_id = [agent for agent in agents if agent["id"] == name_or_id]
    return by_id or [agent for agent in agents if agent["name"] == name_or_id]


def one_agent_named(session: ApiSession, name_or_id: str) -> dict[str, Any]:
    """The one agent ``name_or_id`` names (an id wins over a name); AgentListError when none or
    several do, saying what to type instead."""
    matches = agents_named(session, name_or_id)
    if not matches:
        raise AgentListError(f"no agent named {name_or_id!r} in your team (see tucdesk agents)")
    if matches[0]["id"] == name_or_id or len(matches) == 1:
        return dict(matches[0])
    ids = ", ".join(str(match["id"]) for match in matches)
    raise AgentListError(f"several agents are named {name_or_id!r} ({ids}); use the agent id")
