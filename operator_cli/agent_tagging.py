"""`tucdesk agents tag AGENT --add TAG --remove TAG`: change an agent's tags (admins).

Tags come from the registration key at enrollment; an admin changes them here without
re-enrolling the host. Like a roster change the new tags are pending: policy, on the rendezvous
and on the agent alike, decides on the tags an admin signed, so they count once an admin runs
``tucdesk roster sign`` (``tucdesk roster show`` lists what is pending).

``--add``/``--remove`` are computed from the tags just read, which the request names: if another
admin changed them meanwhile the service refuses (409 ``tags_changed``) and the change is
computed again from a fresh read, once, before giving up with the service's message.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from urllib.parse import quote

from operator_cli.agent_listing import AGENTS_PATH, AgentListError, one_agent_named
from operator_cli.client import ApiError, Session
from operator_cli.home import CliHome
from operator_cli.terminal_text import visible

EXIT_OK = 0
EXIT_FAILURE = 1
# The service's error code when the tags changed between the read and the write (409); the
# change is computed again from a fresh read this many times before giving up.
TAGS_CHANGED = "tags_changed"
TAGS_CHANGED_RETRIES = 1


def agents_tag(
    home: CliHome,
    agent: str,
    *,
    add: Sequence[str] = (),
    remove: Sequence[str] = (),
    replace: Sequence[str] | None = None,
) -> int:
    """Give the agent ``agent`` names the tags ``replace`` (when given), then add ``add`` and
    take away ``remove``; print the change. Without any of them, print its tags."""
    session = Session.from_home(home)
    try:
        for attempt in range(1 + TAGS_CHANGED_RETRIES):
            try:
                listed = one_agent_named(session, agent)
            except AgentListError as error:
                print(f"tucdesk: {error}", file=sys.stderr)
                return EXIT_FAILURE
            current = [str(tag) for tag in listed.get("tags") or []]
            label = f"agent {visible(str(listed['name']))} ({listed['id']})"
            if replace is None and not add and not remove:
                print(f"{label}: {_tag_list(current)}")
                return EXIT_OK
            wanted = new_tags(current, add=add, remove=remove, replace=replace)
            body: dict[str, list[str]] = {"tags": wanted}
            if replace is None:
                # Computed from ``current``: the service refuses it if they changed meanwhile.
                body["previous_tags"] = current
            try:
                changed = session.request(
                    "PUT", f"{AGENTS_PATH}/{quote(str(listed['id']), safe='')}/tags", body
                )
                break
            except ApiError as error:
                if error.code != TAGS_CHANGED or attempt == TAGS_CHANGED_RETRIES:
                    raise
                # Another admin changed them between our read and write: read them again.
    finally:
        session.close()
    before, after = changed["previous_tags"], changed["tags"]
    if before == after:
        print(f"{label}: tags unchanged: {_tag_list(after)}")
        return EXIT_OK
    print(f"{label}: tags {_tag_list(before)} -> {_tag_list(after)}")
    print(
        "pending: policy decides on signed tags, so this counts once an admin runs "
        "`tucdesk roster sign` (see `tucdesk roster show`)"
    )
    return EXIT_OK


def new_tags(
    current: Sequence[str],
    *,
    add: Sequence[str] = (),
    remove: Sequence[str] = (),
    replace: Sequence[str] | None = None,
) -> list[str]:
    """The tags after the change, in order: the base (``replace`` or ``current``), then ``add``,
    without ``remove``. Tags compare lower-cased, as the service stores them."""
    base = list(current) if replace is None else [tag for tag in replace if tag.strip()]
    removed = {tag.strip().lower() for tag in remove}
    result: list[str] = []
    for tag in [*base, *add]:
        normal = tag.strip().lower()
        if normal not in removed and normal not in result:
            result.append(normal)
    return result


def _tag_list(tags: Sequence[object]) -> str:
    return ", ".join(visible(str(tag)) for tag in tags) if tags else "(none)"
