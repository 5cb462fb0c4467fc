"""The requester's side of an approval: ask for a session, wait for an approver, ask again.

``POST /v1/sessions`` answers 202 with an approval request when the policy says a human must
confirm first (docs/sessions.md §6). ``obtain_ticket`` then tells the operator who may approve,
polls ``GET /v1/approvals/{id}`` until the request is approved, denied or expired, and on
approval repeats the session request with ``approval_id``. ``--no-wait`` returns the request id
instead; ``--approval ID`` resumes with an id from an earlier run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from operator_cli.approval_commands import fetch_request
from operator_cli.approval_requests import (
    APPROVED,
    DENIED,
    EXPIRED,
    PENDING,
    WITHDRAWN,
    ApprovalRequestView,
    PendingApproval,
)
from operator_cli.client import Session
from operator_cli.session_client import (
    ApprovalPending,
    SessionError,
    SessionTicket,
    request_session,
)
from operator_cli.terminal_text import visible

APPROVAL_POLL_SECONDS = 1.0
# While waiting, the requester is reminded this often (a script's log shows why it is idle).
APPROVAL_REMINDER_SECONDS = 60.0
MAX_APPROVAL_WAIT_SECONDS = 60 * 60
EXPIRY_GRACE_SECONDS = 5.0

Say = Callable[[str], None]


class ApprovalRefused(SessionError):
    """The approval request was denied or expired, or does not fit this session."""


class ApprovalWaitInterrupted(SessionError):
    """The operator stopped waiting (Ctrl-C); the request stays pending, to be resumed with
    --approval or withdrawn with `tucdesk approvals withdraw`."""


@dataclass(frozen=True)
class SessionAsk:
    """What the operator asked for: target, mode, exec argv and the terminal."""

    target: str
    mode: Literal["shell", "exec"]
    command: list[str] | None = None
    term: str = "xterm-256color"
    rows: int = 24
    cols: int = 80


@dataclass(frozen=True)
class Parked:
    """The session waits for approval and the caller chose not to wait (``--no-wait``)."""

    pending: PendingApproval


def obtain_ticket(
    api: Session,
    ask: SessionAsk,
    say: Say,
    *,
    wait: bool = True,
    approval_id: str | None = None,
    poll_seconds: float = APPROVAL_POLL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> SessionTicket | Parked:
    """A session ticket for ``ask``, waiting for approval when the policy requires it.

    Raises ApprovalRefused when the request is denied or expires, and the errors of
    request_session otherwise. With ``wait`` false a parked request is returned as Parked.
    """
    if approval_id is None:
        try:
            return _request(api, ask, None)
        except ApprovalPending as parked:
            pending = parked.pending
        say(f"approval required: {visible(pending.reason or 'the policy asks for it')}")
        if not wait:
            return Parked(pending)
        say(waiting_message(pending))
        view = wait_for_decision(api, pending.request_id, say, poll_seconds=poll_seconds,
                                 sleep=sleep, expires_at=pending.expires_at)
        return _request(api, ask, view.request_id)
    view = fetch_request(api, approval_id)
    check_fits(view, ask)
    if view.state == PENDING:
        pending = PendingApproval(view.request_id, view.expires_at, view.approvers, view.reason,
                                  view.rule_id)
        if not wait:
            return Parked(pending)
        say(waiting_message(pending))
        view = wait_for_decision(api, view.request_id, say, poll_seconds=poll_seconds,
                                 sleep=sleep, expires_at=pending.expires_at)
    elif view.state != APPROVED:
        raise _refusal(view)
    return _request(api, ask, view.request_id)


def waiting_message(pending: PendingApproval) -> str:
    """Said at once when the wait starts: who may approve, until when, how to stop and withdraw
    (a script without a terminal would otherwise just seem to hang)."""
    return (
        f"{pending.waiting_line()}{_until(pending.expires_at)}; Ctrl-C stops waiting (the "
        f"request stays pending; tucdesk approvals withdraw {visible(pending.request_id)} "
        f"takes it back)"
    )


def _until(expires_at: float | None) -> str:
    if expires_at is None:
        return ""
    return f" until {datetime.fromtimestamp(expires_at, UTC).strftime('%H:%M:%S UTC')}"


def wait_for_decision(
    api: Session,
    request_id: str,
    say: Say,
    *,
    poll_seconds: float = APPROVAL_POLL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
    max_wait_seconds: float = MAX_APPROVAL_WAIT_SECONDS,
    remind_seconds: float = APPROVAL_REMINDER_SECONDS,
    expires_at: float | None = None,
) -> ApprovalRequestView:
    """Poll the request until it is approved (returned) or denied/expired (ApprovalRefused),
    saying every ``remind_seconds`` that it is still waiting."""
    try:
        return _poll(api, request_id, say, poll_seconds, sleep, max_wait_seconds,
                     remind_seconds, expires_at)
    except KeyboardInterrupt:
        raise ApprovalWaitInterrupted(
            f"interrupted; request {request_id} stays pending until decided or expired: to use "
            f"it, run the same command with --approval {request_id}; to take it back, run "
            f"tucdesk approvals withdraw {request_id}"
        ) from None


def _poll(
    api: Session,
    request_id: str,
    say: Say,
    poll_seconds: float,
    sleep: Callable[[float], None],
    max_wait_seconds: float,
    remind_seconds: float,
    expires_at: float | None,
) -> ApprovalRequestView:
    started = time.monotonic()
    give_up = started + max_wait_seconds
    next_reminder = started + remind_seconds
    while True:
        view = fetch_request(api, request_id)
        if view.state == APPROVED:
            # Who decided and why come from another person: shown, never acted on by the terminal.
            say(visible(f"approved by {view.decided_by or 'an approver'}"
                        f"{f': {view.decision_reason}' if view.decision_reason else ''}"))
            return view
        if view.state != PENDING:
            raise _refusal(view)
        if view.expires_at is not None and time.time() > view.expires_at + EXPIRY_GRACE_SECONDS:
            raise ApprovalRefused(f"approval request {request_id} expired without a decision")
        if time.monotonic() > give_up:
            raise ApprovalRefused(
                f"gave up waiting for approval of {request_id} after {max_wait_seconds:.0f}s"
            )
        now = time.monotonic()
        if now >= next_reminder:
            next_reminder = now + remind_seconds
            shown = visible(request_id)
            say(f"still waiting for approval of {shown} ({now - started:.0f} s so far)"
                f"{_until(view.expires_at if view.expires_at is not None else expires_at)}; "
                f"tucdesk approvals withdraw {shown} takes it back")
        sleep(poll_seconds)


def check_fits(view: ApprovalRequestView, ask: SessionAsk) -> None:
    """Refuse to use an approval request for anything but the session it was made for."""
    if ask.target not in (view.agent_id, view.agent_name):
        raise ApprovalRefused(
            visible(f"approval request {view.request_id} is for agent {view.agent_name}, not "
                    f"{ask.target}")
        )
    if view.action.value != ask.mode:
        raise ApprovalRefused(
            f"approval request {view.request_id} is for {view.action.value}, not {ask.mode}"
        )
    if view.command != (None if ask.command is None else tuple(ask.command)):
        raise ApprovalRefused(f"approval request {view.request_id} is for another command")


def _refusal(view: ApprovalRequestView) -> ApprovalRefused:
    if view.state == DENIED:
        why = f": {view.decision_reason}" if view.decision_reason else " (no reason given)"
        return ApprovalRefused(visible(
            f"approval request {view.request_id} was denied by {view.decided_by or 'an approver'}"
            f"{why}"
        ))
    if view.state == EXPIRED:
        return ApprovalRefused(f"approval request {view.request_id} expired; ask again")
    if view.state == WITHDRAWN:
        return ApprovalRefused(f"approval request {view.request_id} was withdrawn; ask again")
    return ApprovalRefused(
        visible(f"approval request {view.request_id} is {view.state}; ask again")
    )


def _request(api: Session, ask: SessionAsk, approval_id: str | None) -> SessionTicket:
    return request_session(
        api, ask.target, ask.mode, ask.command, term=ask.term, rows=ask.rows, cols=ask.cols,
        approval_id=approval_id,
    )
