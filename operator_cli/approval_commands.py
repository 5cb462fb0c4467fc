"""`tucdesk approvals`, `tucdesk approve ID` and `tucdesk deny ID` (docs/sessions.md §6).

Approving signs, with the approver's own operator key, the exact request the rendezvous
describes: request id, team, target agent, action, command hash, requester key and policy
version (protocol.policy.approve_request). The agent checks that signature against its signed
roster before it runs anything, so the rendezvous cannot stretch an approval to another
command, host or session. The request is shown in full before it is signed — its command whole,
with every control character visibly escaped (operator_cli/terminal_text.py) — and confirmed at
the terminal unless ``--yes``; without a terminal and without ``--yes`` nothing is signed.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO
from urllib.parse import quote

from operator_cli.approval_requests import (
    PENDING,
    ApprovalFormatError,
    ApprovalRequestView,
    age,
)
from operator_cli.client import Session
from operator_cli.confirm import answered_yes
from operator_cli.home import CliHome, HomeError
from operator_cli.terminal_text import ELLIPSIS, cut, visible, wrapped

EXIT_OK = 0
EXIT_NOT_CONFIRMED = 1
MAX_REASON_LENGTH = 500  # what the rendezvous accepts
TABLE_COMMAND_WIDTH = 40
TABLE_REASON_WIDTH = 40
DETAIL_LABEL_WIDTH = 11
DEFAULT_WIDTH = 100  # when the output is not a terminal
MIN_WIDTH = DETAIL_LABEL_WIDTH + 20


class ApprovalCommandError(HomeError):
    """An approval command cannot go ahead; the message says why and what to do."""


def approval_path(request_id: str, action: str = "") -> str:
    """The URL path of one approval request (and an action on it), the id safely quoted."""
    if not request_id or len(request_id) > 128 or not request_id.isprintable():
        raise ApprovalCommandError(f"{request_id[:40]!r} is not an approval request id")
    path = f"/v1/approvals/{quote(request_id, safe='')}"
    return f"{path}/{action}" if action else path


def fetch_request(api: Session, request_id: str) -> ApprovalRequestView:
    """GET one approval request and parse it."""
    try:
        return ApprovalRequestView.from_json(api.request("GET", approval_path(request_id)))
    except ApprovalFormatError as error:
        raise ApprovalCommandError(
            f"the server described request {request_id} in an unexpected form ({error}); "
            "is it the same TucDesk version?"
        ) from None


def list_pending(api: Session) -> list[ApprovalRequestView]:
    """The team's pending approval requests, oldest first."""
    body = api.request("GET", "/v1/approvals")
    items: Any = body.get("approvals", body.get("requests")) if isinstance(body, dict) else body
    if not isinstance(items, list):
        raise ApprovalCommandError("the server's approval list is not a list")
    try:
        views = [ApprovalRequestView.from_json(item) for item in items]
    except ApprovalFormatError as error:
        raise ApprovalCommandError(f"the server's approval list is malformed ({error})") from None
    pending = [view for view in views if view.state == PENDING]
    return sorted(pending, key=lambda view: view.created_at or 0.0)


def approvals_command(home: CliHome, *, as_json: bool = False) -> int:
    """`tucdesk approvals`: pending requests (requester, target, action, command, age, reason).

    A command too long for its column is cut with an ellipsis and a note names
    `tucdesk approvals show ID`, which shows it whole; nothing is cut silently.
    """
    api = Session.from_home(home)
    try:
        pending = list_pending(api)
    finally:
        api.close()
    if as_json:
        print(json.dumps([_view_json(view) for view in pending], indent=2))
        return EXIT_OK
    if not pending:
        print("no pending approval requests")
        return EXIT_OK
    for line in approval_table(pending):
        print(line)
    return EXIT_OK


def approval_table(pending: list[ApprovalRequestView]) -> list[str]:
    """The lines of `tucdesk approvals`: a heading, one line a request, every cell visibly
    escaped; a cut command ends in an ellipsis and a last line says how to see it whole."""
    lines = [
        f"{'ID':<28} {'REQUESTER':<28} {'TARGET':<20} {'ACTION':<6} "
        f"{'COMMAND':<{TABLE_COMMAND_WIDTH}} {'AGE':>4}  REASON"
    ]
    any_cut = False
    for view in pending:
        command, command_cut = cut(view.shown_command(), TABLE_COMMAND_WIDTH)
        any_cut = any_cut or command_cut
        lines.append(
            f"{visible(view.request_id):<28} {_cell(view.requester_email, 28)} "
            f"{_cell(view.agent_name, 20)} {view.action.value:<6} "
            f"{command:<{TABLE_COMMAND_WIDTH}} {age(view.created_at):>4}  "
            f"{_cell(view.reason, TABLE_REASON_WIDTH).rstrip()}"
        )
    if any_cut:
        lines.append(
            f"a COMMAND ending in {ELLIPSIS} is cut; see it whole with "
            "'tucdesk approvals show ID' before approving"
        )
    return lines


def approvals_show_command(home: CliHome, request_id: str, *, as_json: bool = False) -> int:
    """`tucdesk approvals show ID`: one request in full, its command whole and visibly escaped
    (``as_json``: one JSON document with the fields of `approvals --json`)."""
    api = Session.from_home(home)
    try:
        view = fetch_request(api, request_id)
    finally:
        api.close()
    if as_json:
        print(json.dumps(_view_json(view), indent=2))
        return EXIT_OK
    for line in request_details(view, _terminal_width()):
        print(line)
    return EXIT_OK


def approve_command(
    home: CliHome,
    request_id: str,
    reason: str | None,
    *,
    assume_yes: bool = False,
    ask: Callable[[str], str] | None = None,
    stdin: TextIO | None = None,
) -> int:
    """`tucdesk approve ID`: show the whole request, confirm it at the terminal (unless
    ``assume_yes``), then sign exactly it with this operator's key and send the approval."""
    _check_reason(reason)
    if not assume_yes and not (stdin if stdin is not None else sys.stdin).isatty():
        raise ApprovalCommandError(
            f"not approved: run it in a terminal to confirm, or pass --yes (check the request "
            f"first with 'tucdesk approvals show {visible(request_id)}')"
        )
    api = Session.from_home(home)
    try:
        view = fetch_request(api, request_id)
        if view.state != PENDING:
            raise ApprovalCommandError(
                f"request {request_id} is {visible(view.state)}, not pending"
            )
        api.token()  # the cached token record names our team
        token = home.load_token() or {}
        team_id = str(token.get("team_id") or view.team_id or "")
        if not team_id:
            raise ApprovalCommandError("cannot tell your team; log in again with 'tucdesk login'")
        if view.requester_thumbprint == api.identity.public.key_id:
            raise ApprovalCommandError("nobody may approve their own request")
        for line in request_details(view, _terminal_width()):
            print(line, file=sys.stderr)
        if not assume_yes and not _confirmed(ask or _ask_on_stderr):
            print(f"not approved: request {request_id} stays pending", file=sys.stderr)
            return EXIT_NOT_CONFIRMED
        from protocol.policy import SelfApprovalError, approve_request

        try:
            signed = approve_request(api.identity, view.context(team_id), now=time.time())
        except SelfApprovalError:
            raise ApprovalCommandError("nobody may approve their own request") from None
        body: dict[str, Any] = {"approval": signed.to_json()}
        if reason:
            body["reason"] = reason
        api.request("POST", approval_path(request_id, "approve"), body)
    finally:
        api.close()
    print(f"approved {request_id} for {visible(view.requester_email)}; the approval is signed "
          f"with your key {api.identity.public.fingerprint}")
    return EXIT_OK


def deny_command(home: CliHome, request_id: str, reason: str | None) -> int:
    """`tucdesk deny ID`: refuse a pending request; the requester is told the reason."""
    _check_reason(reason)
    api = Session.from_home(home)
    try:
        view = fetch_request(api, request_id)
        if view.state != PENDING:
            raise ApprovalCommandError(
                f"request {request_id} is {visible(view.state)}, not pending"
            )
        for line in request_details(view, _terminal_width()):
            print(line, file=sys.stderr)
        api.request("POST", approval_path(request_id, "deny"), {"reason": reason or ""})
    finally:
        api.close()
    print(f"denied {request_id} for {visible(view.requester_email)}")
    return EXIT_OK


def approvals_withdraw_command(home: CliHome, request_id: str) -> int:
    """`tucdesk approvals withdraw ID`: take back one's own pending request."""
    api = Session.from_home(home)
    try:
        api.request("POST", approval_path(request_id, "withdraw"))
    finally:
        api.close()
    print(f"withdrew {request_id}: nobody can approve it now")
    return EXIT_OK


def request_details(
    view: ApprovalRequestView, width: int = DEFAULT_WIDTH, now: float | None = None
) -> list[str]:
    """The whole request, one field a line: the command complete (wrapped over several lines
    when long, never cut) and every character from elsewhere visibly escaped."""
    indent = " " * DETAIL_LABEL_WIDTH
    lines = [
        _detail("request", view.request_id),
        _detail("state", view.state),
        _detail("requester", view.requester_email),
        _detail("target", f"{view.agent_name} ({view.agent_id})"),
        _detail("action", view.action.value),
    ]
    if view.command is None:
        lines.append(_detail("command", "- (an interactive shell)"))
    else:
        chunks = wrapped(view.shown_command(), width - DETAIL_LABEL_WIDTH)
        lines.append(f"{'command:':<{DETAIL_LABEL_WIDTH}}{chunks[0]}")
        lines += [indent + chunk for chunk in chunks[1:]]
        count = len(view.command)
        note = ", wrapped: the line breaks are not part of it" if len(chunks) > 1 else ""
        lines.append(f"{indent}({count} argument{'' if count == 1 else 's'}{note})")
    lines.append(_detail(
        "policy", f"version {view.policy_version}, rule {view.rule_id or '-'}: {view.reason or '-'}"
    ))
    lines.append(_detail("expires", _expiry(view.expires_at, now)))
    return lines


def _detail(label: str, value: str) -> str:
    return f"{label + ':':<{DETAIL_LABEL_WIDTH}}{visible(value)}"


def _cell(text: str, width: int) -> str:
    return cut(visible(text), width)[0].ljust(width)


def _expiry(expires_at: float | None, now: float | None) -> str:
    if expires_at is None:
        return "-"
    left = int(expires_at - (time.time() if now is None else now))
    when = datetime.fromtimestamp(expires_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"{when} (in {left // 60}m {left % 60:02d}s)" if left > 0 else f"{when} (past)"


def _terminal_width() -> int:
    return max(MIN_WIDTH, shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns)


def _ask_on_stderr(prompt: str) -> str:
    # The prompt goes where the request was shown (stderr), so stdout stays the result line.
    print(prompt, end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    if not answer:
        raise EOFError
    return answer


def _confirmed(ask: Callable[[str], str]) -> bool:
    return answered_yes(ask, "Approve? [y/N] ", echo=sys.stderr)


def _check_reason(reason: str | None) -> None:
    if reason is not None and (len(reason) > MAX_REASON_LENGTH or not reason.isprintable()):
        raise ApprovalCommandError(
            f"--reason is one line of at most {MAX_REASON_LENGTH} printable characters"
        )


def _view_json(view: ApprovalRequestView) -> dict[str, Any]:
    return {
        "id": view.request_id,
        "state": view.state,
        "requester": view.requester_email,
        "agent_id": view.agent_id,
        "agent_name": view.agent_name,
        "action": view.action.value,
        "command": None if view.command is None else list(view.command),
        "reason": view.reason,
        "rule_id": view.rule_id,
        "policy_version": view.policy_version,
        "created_at": view.created_at,
        "expires_at": view.expires_at,
    }
