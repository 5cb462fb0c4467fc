"""`tucdesk approvals`, `tucdesk approve ID` and `tucdesk deny ID` (docs/sessions.md §6).

Approving signs, with the approver's own operator key, the exact request the rendezvous
describes: request id, team, target agent, action, command hash, requester key and policy
version (protocol.policy.approve_request). The agent checks that signature against its signed
roster before it runs anything, so the rendezvous cannot stretch an approval to another
command, host or session. The request is shown in full before it is signed.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any
from urllib.parse import quote

from operator_cli.approval_requests import (
    PENDING,
    ApprovalFormatError,
    ApprovalRequestView,
    age,
    join_command,
)
from operator_cli.client import Session
from operator_cli.home import CliHome, HomeError

EXIT_OK = 0
MAX_REASON_LENGTH = 500  # what the rendezvous accepts
TABLE_COMMAND_WIDTH = 40
TABLE_REASON_WIDTH = 40


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
    """`tucdesk approvals`: pending requests (requester, target, action, command, age, reason)."""
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
    print(
        f"{'ID':<28} {'REQUESTER':<28} {'TARGET':<20} {'ACTION':<6} "
        f"{'COMMAND':<{TABLE_COMMAND_WIDTH}} {'AGE':>4}  REASON"
    )
    for view in pending:
        command = view.shown_command(TABLE_COMMAND_WIDTH)
        print(
            f"{view.request_id:<28} {view.requester_email:<28} {view.agent_name:<20} "
            f"{view.action.value:<6} {command:<{TABLE_COMMAND_WIDTH}} "
            f"{age(view.created_at):>4}  {view.reason[:TABLE_REASON_WIDTH]}"
        )
    return EXIT_OK


def approve_command(home: CliHome, request_id: str, reason: str | None) -> int:
    """`tucdesk approve ID`: sign the exact request with this operator's key and send it."""
    _check_reason(reason)
    api = Session.from_home(home)
    try:
        view = fetch_request(api, request_id)
        if view.state != PENDING:
            raise ApprovalCommandError(f"request {request_id} is {view.state}, not pending")
        api.token()  # the cached token record names our team
        token = home.load_token() or {}
        team_id = str(token.get("team_id") or view.team_id or "")
        if not team_id:
            raise ApprovalCommandError("cannot tell your team; log in again with 'tucdesk login'")
        if view.requester_thumbprint == api.identity.public.key_id:
            raise ApprovalCommandError("nobody may approve their own request")
        _describe(view, "approving")
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
    print(f"approved {request_id} for {view.requester_email}; the approval is signed with your "
          f"key {api.identity.public.fingerprint}")
    return EXIT_OK


def deny_command(home: CliHome, request_id: str, reason: str | None) -> int:
    """`tucdesk deny ID`: refuse a pending request; the requester is told the reason."""
    _check_reason(reason)
    api = Session.from_home(home)
    try:
        view = fetch_request(api, request_id)
        if view.state != PENDING:
            raise ApprovalCommandError(f"request {request_id} is {view.state}, not pending")
        _describe(view, "denying")
        api.request("POST", approval_path(request_id, "deny"), {"reason": reason or ""})
    finally:
        api.close()
    print(f"denied {request_id} for {view.requester_email}")
    return EXIT_OK


def _check_reason(reason: str | None) -> None:
    if reason is not None and (len(reason) > MAX_REASON_LENGTH or not reason.isprintable()):
        raise ApprovalCommandError(
            f"--reason is one line of at most {MAX_REASON_LENGTH} printable characters"
        )


def _describe(view: ApprovalRequestView, doing: str) -> None:
    command = "an interactive shell" if view.command is None else join_command(view.command)
    print(f"{doing} request {view.request_id}:", file=sys.stderr)
    print(f"  requester: {view.requester_email}", file=sys.stderr)
    print(f"  target:    {view.agent_name} ({view.agent_id})", file=sys.stderr)
    print(f"  action:    {view.action.value}: {command}", file=sys.stderr)
    print(f"  policy:    version {view.policy_version}, rule {view.rule_id or '-'}: "
          f"{view.reason or '-'}", file=sys.stderr)


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
