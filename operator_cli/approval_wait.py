"""The requester's side of an approval: ask for a session, wait for an approver, ask again.

``POST /v1/sessions`` answers 202 with an approval request when the policy says a human must
confirm first (docs/sessions.md §6). ``obtain_ticket`` then tells the operator who may approve,
polls ``GET /v1/approvals/{id}`` until the request is approved, denied or expired, and on
approval repeats the session request with ``approval_id``. ``--no-wait`` returns the request id
instead; ``--approval ID`` resumes with an id from an earlier run.

A wait that ends without a decision takes its request back (``POST .../withdraw``), so nothing
stays pending for approvers that nobody will use: when ``--approval-timeout`` runs out (exit
255), on SIGTERM or SIGHUP (a job's ``timeout`` or cancellation; the process then ends by that
signal), and on Ctrl-C when a timeout was given. Ctrl-C without one keeps the request pending
to resume with ``--approval ID``, as a person at a terminal may want.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Literal

from operator_cli.approval_commands import approval_path, fetch_request
from operator_cli.approval_requests import (
    APPROVED,
    DENIED,
    EXPIRED,
    PENDING,
    WITHDRAWN,
    ApprovalRequestView,
    PendingApproval,
)
from operator_cli.client import ApiError, Session
from operator_cli.home import HomeError
from operator_cli.http import ResponseTooLargeError, TransportError
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
HTTP_CONFLICT = 409  # a withdrawal the server refuses: the request was decided or expired
# Signals that end a waiting job (timeout(1), a CI cancel, a closed terminal): its request is
# withdrawn before the process ends by the signal.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)

Say = Callable[[str], None]
# The command line (after ``tucdesk``) that redeems approval request ID for this very session.
ResumeCommand = Callable[[str], str]


class ApprovalRefused(SessionError):
    """The approval request was denied or expired, or does not fit this session."""


class ApprovalWaitInterrupted(SessionError):
    """The operator stopped waiting (Ctrl-C); the request stays pending, to be resumed with
    --approval or withdrawn with `tucdesk approvals withdraw` (withdrawn already when the wait
    had --approval-timeout)."""


class _StopSignal(BaseException):
    """One of STOP_SIGNALS arrived while waiting (raised by its handler)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _GaveUp(Exception):
    """The wait reached its limit without a decision."""


# --approval-timeout of this process's session command (main.py sets it before running it).
_approval_timeout_seconds: float | None = None


def bound_approval_waits(seconds: float | None) -> None:
    """Wait at most ``seconds`` for an approver from now on (None: until the request expires)."""
    global _approval_timeout_seconds
    _approval_timeout_seconds = seconds


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
    resume: ResumeCommand | None = None,
) -> SessionTicket | Parked:
    """A session ticket for ``ask``, waiting for approval when the policy requires it.

    Raises ApprovalRefused when the request is denied or expires, and the errors of
    request_session otherwise. With ``wait`` false a parked request is returned as Parked.
    ``resume`` names the command that would use the request, for a wait that gives up just as
    it is approved.
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
                                 sleep=sleep, expires_at=pending.expires_at, resume=resume)
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
                                 sleep=sleep, expires_at=pending.expires_at, resume=resume)
    elif view.state != APPROVED:
        raise _refusal(view)
    return _request(api, ask, view.request_id)


def waiting_message(pending: PendingApproval, *, bounded: bool | None = None) -> str:
    """Said at once when the wait starts: who may approve, until when, how to stop and withdraw
    (a script without a terminal would otherwise just seem to hang). ``bounded`` (default:
    whether --approval-timeout was given): Ctrl-C then withdraws the request (wait_for_decision).
    """
    if bounded is None:
        bounded = _approval_timeout_seconds is not None
    if bounded:
        return (
            f"{pending.waiting_line()}{_until(pending.expires_at)}; Ctrl-C stops waiting and "
            f"withdraws the request, as tucdesk approvals withdraw {visible(pending.request_id)} "
            f"does from elsewhere"
        )
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
    timeout_seconds: float | None = None,
    resume: ResumeCommand | None = None,
) -> ApprovalRequestView:
    """Poll the request until it is approved (returned) or denied/expired (ApprovalRefused),
    saying every ``remind_seconds`` that it is still waiting. ``timeout_seconds`` (default:
    --approval-timeout) bounds the wait; a wait that ends without a decision withdraws the
    request (see the module docstring; ``resume`` as for withdraw_quietly)."""
    if timeout_seconds is None:
        timeout_seconds = _approval_timeout_seconds
    limit = max_wait_seconds if timeout_seconds is None else min(max_wait_seconds,
                                                                 timeout_seconds)
    try:
        with _stop_signals_raised():
            return _poll(api, request_id, say, poll_seconds, sleep, limit, remind_seconds,
                         expires_at)
    except _GaveUp:
        flag = " (--approval-timeout)" if limit == timeout_seconds else ""
        raise ApprovalRefused(
            f"gave up waiting for approval of {request_id} after {limit:g}s{flag}: "
            f"{withdraw_quietly(api, request_id, resume)}"
        ) from None
    except _StopSignal as stop:
        name = signal.Signals(stop.signum).name
        # The same signal may come twice (timeout(1) signals its command, then the command's
        # process group): it must not end the process before the request is withdrawn.
        held = [signum for signum in STOP_SIGNALS if signal.getsignal(signum) == signal.SIG_DFL]
        for signum in held:
            signal.signal(signum, signal.SIG_IGN)
        try:
            said = withdraw_quietly(api, request_id, resume)
        finally:
            for signum in held:
                signal.signal(signum, signal.SIG_DFL)
        say(f"{name} while waiting for approval: {said}")
        # End by the signal, as the job's supervisor expects (a shell sees 128+N).
        signal.signal(stop.signum, signal.SIG_DFL)
        os.kill(os.getpid(), stop.signum)
        raise ApprovalWaitInterrupted(name) from None  # not reached: the signal ends us
    except KeyboardInterrupt:
        if timeout_seconds is not None:
            raise ApprovalWaitInterrupted(
                f"interrupted: {withdraw_quietly(api, request_id, resume)}"
            ) from None
        raise ApprovalWaitInterrupted(
            f"interrupted; request {request_id} stays pending until decided or expired: to use "
            f"it, run the same command with --approval {request_id}; to take it back, run "
            f"tucdesk approvals withdraw {request_id}"
        ) from None


def withdraw_quietly(
    api: Session, request_id: str, resume: ResumeCommand | None = None
) -> str:
    """Withdraw one's own pending request and say what came of it; never raises for the
    server's answer (the caller is already ending with an error of its own). A request decided
    meanwhile (409) is read again: approved, the message gives the command that uses it
    (``resume``, else the same command with --approval), as it can no longer be withdrawn."""
    try:
        api.request("POST", approval_path(request_id, "withdraw"))
    except ApiError as error:
        if error.status == HTTP_CONFLICT:
            decided = _decided_meanwhile(api, request_id, resume)
            if decided is not None:
                return decided
        why = visible(error.message)
    except TransportError as error:
        why = error.describe()
    except (HomeError, ResponseTooLargeError, OSError) as error:
        why = str(error)
    else:
        return f"withdrew request {request_id}: nobody can approve it now"
    return (f"could not withdraw request {request_id} ({why}); tucdesk approvals withdraw "
            f"{request_id} takes it back")


def _decided_meanwhile(api: Session, request_id: str, resume: ResumeCommand | None) -> str | None:
    """What became of a request the server would not withdraw because it was decided or expired
    meanwhile; None if it cannot be read or is still pending."""
    try:
        view = fetch_request(api, request_id)
    except (ApiError, TransportError, HomeError, ResponseTooLargeError, OSError):
        return None
    shown = visible(request_id)
    if view.state == APPROVED:
        by = visible(view.decided_by or "an approver")
        use = (f"tucdesk {visible(resume(request_id))}" if resume is not None
               else f"the same command with --approval {shown}")
        return (f"request {shown} was approved by {by} before it could be withdrawn; nothing "
                f"ran: to run it now, use: {use}")
    if view.state == PENDING:
        return None
    return f"request {shown} is {visible(view.state)} already: nobody can approve it now"


@contextmanager
def _stop_signals_raised() -> Iterator[None]:
    """While waiting, STOP_SIGNALS raise _StopSignal instead of ending the process at once.
    Only signals left at their default are taken (not one ignored under nohup, nor a handler
    someone else set), and only on the main thread (the only one Python delivers them to)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: FrameType | None) -> None:
        raise _StopSignal(signum)

    taken = [signum for signum in STOP_SIGNALS if signal.getsignal(signum) == signal.SIG_DFL]
    for signum in taken:
        signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum in taken:
            signal.signal(signum, signal.SIG_DFL)


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
        now = time.monotonic()
        if now >= give_up:
            raise _GaveUp
        if now >= next_reminder:
            next_reminder = now + remind_seconds
            shown = visible(request_id)
            say(f"still waiting for approval of {shown} ({now - started:.0f} s so far)"
                f"{_until(view.expires_at if view.expires_at is not None else expires_at)}; "
                f"tucdesk approvals withdraw {shown} takes it back")
        sleep(max(0.0, min(poll_seconds, give_up - time.monotonic())))


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
