"""`tucdesk operators` (list the team's operators) and `tucdesk operators disable` (admins).

An operator is named by email or by id (``op_…``), resolved through the team's list as `agents
remove` resolves agents: an unknown name, or an email several operators share, is refused with
a line saying what to use instead. Disabling kills the operator's tokens, stops its key from
logging in, revokes every API key it created and every unused registration key it (or those
API keys) created, withdraws its pending approval requests, and ends its open shells and exec
sessions: each agent running one ends it at once, and the operator sees "the operator was
disabled by an admin". Approvals it granted are refused when used. Agents keep its key in the
team's signed roster until an admin runs `tucdesk roster sign` (the rendezvous cannot sign a
roster); the output says so when it applies. The team's last active admin cannot be disabled,
nor the last active admin of the signed roster unless ``--freeze-roster`` accepts that nobody
can sign a policy agents take until the server admin resets it (docs/policy.md).
There is no enable: to bring someone back, invite them again.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import quote

from operator_cli.client import ApiError, Session
from operator_cli.confirm import answered_yes
from operator_cli.home import CliHome
from operator_cli.http import HttpError
from operator_cli.session_listing import SessionFilter, SessionListError, fetch_sessions

EXIT_OK = 0
EXIT_FAILURE = 1
OPERATORS_PATH = "/v1/operators"
OPERATOR_ID_PREFIX = "op_"
EMAIL_WIDTH = 32
ID_WIDTH = 24
# Open sessions counted for the confirmation (one page): beyond it, "at least" this many.
MAX_SESSIONS_COUNTED = 1000
OPEN_STATES = ("offered", "accepted")
ROSTER_SIGN_COMMAND = "tucdesk roster sign"
FREEZE_WARNING = (
    "  --freeze-roster: if this is the last active admin of the signed roster, nobody can sign "
    "a policy or roster agents accept (and no operator invited since can open a session) until "
    "the server admin runs `tucdesk-rendezvous team reset-policy` and each agent is re-enrolled"
)


class OperatorCommandError(Exception):
    """The operator named cannot be told (none or several match), or the answer is malformed."""


def operators_list(home: CliHome, *, as_json: bool) -> int:
    """Print the team's operators: a table, or with ``as_json`` one JSON document."""
    session = Session.from_home(home)
    try:
        operators = fetch_operators(session)
    except OperatorCommandError as error:
        print(f"tucdesk: {error}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        session.close()
    if as_json:
        print(json.dumps(operators, indent=2))
        return EXIT_OK
    for line in operator_table(operators):
        print(line)
    return EXIT_OK


def operators_disable(
    home: CliHome,
    name_or_id: str,
    *,
    assume_yes: bool = False,
    ask: Callable[[str], str] = input,
    stdin: TextIO | None = None,
    freeze_roster: bool = False,
) -> int:
    """Disable the operator ``name_or_id`` (an email or an id) names, after showing who and
    how many open sessions end and, unless ``assume_yes``, asking; end its sessions.
    ``freeze_roster`` accepts leaving the signed roster without an active admin."""
    session = Session.from_home(home)
    try:
        try:
            operator = one_operator(fetch_operators(session), name_or_id)
        except OperatorCommandError as error:
            print(f"tucdesk: {error}", file=sys.stderr)
            return EXIT_FAILURE
        already = operator["state"] != "active"
        if freeze_roster and not already:
            print(FREEZE_WARNING)
        if not already and not _confirmed(session, operator, assume_yes, ask, stdin):
            return EXIT_FAILURE
        query = "?freeze_roster=true" if freeze_roster else ""
        answer = session.request(
            "POST", f"{OPERATORS_PATH}/{quote(operator['id'], safe='')}/disable{query}"
        )
    finally:
        session.close()
    who = _printable(f"{operator['email']} ({operator['id']}, {operator['role']})")
    if already:
        print(f"{who} was already disabled; any session of it still open was told to end")
    else:
        print(f"disabled {who}: its tokens are dead, its key cannot log in, and its open "
              "sessions are being ended")  # fmt: skip
    for line in disable_summary(answer if isinstance(answer, dict) else {}):
        print(line)
    return EXIT_OK


def disable_summary(answer: dict[str, Any]) -> list[str]:
    """What the disable took away, and the roster step left to an admin, as printed lines."""
    def count(name: str) -> int:
        value = answer.get(name)
        return len(value) if isinstance(value, list) else value if type(value) is int else 0

    lines = [
        f"  revoked: {count('revoked_api_keys')} API key(s), "
        f"{count('revoked_registration_keys')} unused registration key(s), "
        f"{count('revoked_invites')} unused invite(s); withdrawn: "
        f"{count('withdrawn_approval_requests')} pending approval request(s)"
    ]
    if isinstance(answer.get("roster_frozen"), str):
        lines.append(f"  {_printable(answer['roster_frozen'])}")
    elif isinstance(answer.get("roster_pending"), str):
        lines.append(
            "  agents still accept this operator's key until an admin re-signs the roster "
            "(the rendezvous cannot sign it; only an admin's key can): run "
            f"`{ROSTER_SIGN_COMMAND}`"
        )
    return lines


def creator_names(session: Session) -> dict[str, str]:
    """Who created keys, by id: operator ids to emails (marked when disabled); empty when the
    operator list cannot be read (the listing then shows ids)."""
    try:
        operators = fetch_operators(session)
    except (OperatorCommandError, ApiError, HttpError):
        return {}
    return {
        operator["id"]: _printable(operator["email"])
        + ("" if operator["state"] == "active" else " (disabled)")
        for operator in operators
    }


def creator_of(created_by: object, names: dict[str, str]) -> str:
    """The creator column of a key listing: an email, an API key id, or the id as stored."""
    text = created_by if isinstance(created_by, str) else "-"
    return names.get(text, _printable(text))


def _confirmed(
    session: Session,
    operator: dict[str, Any],
    assume_yes: bool,
    ask: Callable[[str], str],
    stdin: TextIO | None,
) -> bool:
    """Show who is disabled and what ends; ask at a terminal unless ``assume_yes``."""
    print(f"operator {_printable(operator['email'])} ({_printable(operator['id'])}, "
          f"{_printable(operator['role'])})")
    print(f"  open sessions that will end: {_open_sessions(session, operator['id'])}")
    if assume_yes:
        return True
    terminal = stdin if stdin is not None else sys.stdin
    if not terminal.isatty():
        print("tucdesk: not disabled: run it in a terminal to confirm, or pass --yes",
              file=sys.stderr)
        return False
    if not answered_yes(ask, "Disable this operator? It cannot be undone (invite them again "
                        "instead); their sessions end on every instance. [y/N] "):
        print("not disabled")
        return False
    return True


def _open_sessions(session: Session, operator_id: str) -> str:
    """How many sessions of the operator are open (offered and not expired, or accepted)."""
    try:
        listing = fetch_sessions(
            session, SessionFilter(states=OPEN_STATES, operator=operator_id),
            limit=MAX_SESSIONS_COUNTED,
        )  # fmt: skip
    except (ApiError, HttpError, SessionListError):
        return "unknown (the session list could not be read)"
    now = time.time()
    count = sum(
        1 for listed in listing.sessions
        if listed.get("state") == "accepted"
        or not isinstance(listed.get("expires_at"), int | float) or listed["expires_at"] > now
    )  # fmt: skip
    return f"at least {count}" if listing.more else str(count)


def fetch_operators(session: Session) -> list[dict[str, Any]]:
    """The team's operators as the service lists them (admins only: others are refused)."""
    body = session.request("GET", OPERATORS_PATH)
    operators = body.get("operators") if isinstance(body, dict) else None
    if not isinstance(operators, list) or not all(_well_formed(item) for item in operators):
        raise OperatorCommandError("the server sent a malformed operator list")
    return operators


def one_operator(operators: list[dict[str, Any]], name_or_id: str) -> dict[str, Any]:
    """The one operator ``name_or_id`` names: its id, else its email (case-insensitive)."""
    by_id = [operator for operator in operators if operator["id"] == name_or_id]
    if by_id:
        return by_id[0]
    wanted = name_or_id.casefold()
    matches = [operator for operator in operators if operator["email"].casefold() == wanted]
    if not matches:
        raise OperatorCommandError(
            f"no operator {name_or_id!r} in your team (see tucdesk operators)"
        )
    if len(matches) > 1:
        ids = ", ".join(operator["id"] for operator in matches)
        raise OperatorCommandError(
            f"several operators have the email {name_or_id!r} ({ids}); use the operator id"
        )
    return matches[0]


def operator_table(operators: list[dict[str, Any]]) -> list[str]:
    """The lines of `tucdesk operators`: a header, then one operator a line, by email."""
    lines = [f"{'EMAIL':<{EMAIL_WIDTH}} {'ID':<{ID_WIDTH}} {'ROLE':<9} {'STATE':<9} CREATED"]
    for operator in operators:
        state = operator["state"]
        if state != "active" and isinstance(operator.get("disabled_at"), int | float):
            state = f"{state} since {_when(operator['disabled_at'])}"
        email, operator_id = _printable(operator["email"]), _printable(operator["id"])
        lines.append(
            f"{email:<{EMAIL_WIDTH}} {operator_id:<{ID_WIDTH}} {_printable(operator['role']):<9} "
            f"{_printable(state):<9} {_when(operator['created_at'])}"
        )
    return lines


def _well_formed(item: object) -> bool:
    if not isinstance(item, dict):
        return False
    texts = ("id", "email", "role", "state")
    return all(isinstance(item.get(name), str) for name in texts) and isinstance(
        item.get("created_at"), int | float
    )


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _printable(text: str) -> str:
    # An email comes from whoever wrote the invite: it must not drive the terminal.
    return "".join(character if character.isprintable() else "?" for character in text)
