"""Following a list the service answers a page at a time (``GET /v1/agents``, ``/v1/sessions``).

Each page carries the opaque ``next_after`` of the page that follows (null on the last), which
the next request passes as ``after``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_PAGES = 100_000  # far past any team; a server that never ends its list is stopped here


class ApiSession(Protocol):
    """What listing needs of ``operator_cli.client.Session``: an authenticated request."""

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send an authenticated request and return its JSON answer."""


@dataclass
class Pages:
    """The items of the pages fetched, the first page's answer (for list-wide fields such as
    the team's policy version), and whether ``limit`` stopped before the service's last page."""

    items: list[dict[str, Any]] = field(default_factory=list)
    first: dict[str, Any] | None = None
    more: bool = False


def follow_pages(
    session: ApiSession,
    page_path: Callable[[int, str | None], str],
    items_key: str,
    *,
    limit: int | None,
    page_size: int,
    error: type[Exception],
) -> Pages:
    """Fetch ``page_path(wanted, after)`` page after page until the last page or ``limit`` items
    (None: all); ``error`` if the service repeats a page or never ends its list."""
    pages = Pages()
    after: str | None = None
    for _ in range(MAX_PAGES):
        wanted = page_size if limit is None else min(page_size, limit - len(pages.items))
        listing = session.request("GET", page_path(wanted, after))
        if pages.first is None:
            pages.first = listing
        pages.items.extend(listing[items_key])
        next_after = listing.get("next_after")
        if next_after is None:
            return pages
        if limit is not None and len(pages.items) >= limit:
            pages.more = True
            return pages
        if next_after == after or not listing[items_key]:
            raise error("the server handed out the same page twice; try again")
        after = next_after
    raise error(f"the server's list did not end after {MAX_PAGES} pages")
