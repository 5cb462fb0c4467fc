"""The pure parts of the approval commands: parsing the service's answers and what gets signed.

The whole flow (request, wait, approve, run; self-approval; replay) runs through the real stack
in test_approvals_stack.py.
"""

from __future__ import annotations

import io
import shlex
import time
from pathlib import Path

import pyte
import pytest

from operator_cli.approval_commands import (
    ApprovalCommandError,
    approval_table,
    approve_command,
    request_details,
)
from operator_cli.approval_requests import (
    ApprovalFormatError,
    ApprovalRequestView,
    PendingApproval,
    age,
)
from operator_cli.approval_wait import ApprovalRefused, SessionAsk, _refusal, check_fits
from operator_cli.home import CliHome
from protocol.identity import SigningIdentity
from protocol.policy import (
    Action,
    ApprovalMismatchError,
    Roster,
    RosterEntry,
    SelfApprovalError,
    approve_request,
    verify_approval,
)
from protocol.policy.roster import Role

REQUESTER = SigningIdentity.generate()
APPROVER = SigningIdentity.generate()
ROSTER = Roster.of([
    RosterEntry(REQUESTER.public, "req@x.test", Role.OPERATOR),
    RosterEntry(APPROVER.public, "boss@x.test", Role.APPROVER),
])
NOW = 1_800_000_000.0


def request_json(**changes: object) -> dict[str, object]:
    # The fields the rendezvous's ApprovalRequest row carries (rendezvous/store/base.py).
    body: dict[str, object] = {
        "id": "apr_1", "team_id": "team_1", "agent_id": "agt_1", "agent_name": "web-1",
        "requester_id": "opr_1", "requester_email": "req@x.test",
        "requester_thumbprint": REQUESTER.public.key_id, "mode": "exec",
        "command": ["systemctl", "restart", "nginx"], "command_sha256": "0" * 64,
        "policy_version": 5, "rule_id": "restarts", "reason": "restarts need approval",
        "state": "pending", "created_at": NOW - 90, "expires_at": NOW + 510,
        "decided_by": None, "decided_by_email": None, "decision_reason": None,
        "approvers": ["boss@x.test"],
    }
    body.update(changes)
    return body


def test_the_202_answer_names_the_request_and_who_may_approve() -> None:
    pending = PendingApproval.from_response({"approval_request": {
        "id": "apr_1", "expires_at": NOW, "approvers": ["a@x.test", "b@x.test"],
        "reason": "high risk", "rule_id": "high_risk",
    }})
    assert pending.waiting_line() == "waiting for approval by a@x.test, b@x.test (request apr_1)"
    nobody = PendingApproval.from_response({"approval_request": {"id": "apr_2"}})
    assert "nobody" in nobody.waiting_line()
    with pytest.raises(ApprovalFormatError):
        PendingApproval.from_response({"session_id": "ses_1"})


def test_an_approval_signed_over_the_parsed_request_verifies_on_the_agent() -> None:
    view = ApprovalRequestView.from_json(request_json())
    assert (view.action, view.command, view.agent_name) == (
        Action.EXEC, ("systemctl", "restart", "nginx"), "web-1"
    )
    context = view.context("team_1")
    signed = approve_request(APPROVER, context, now=NOW)
    assert verify_approval(signed.to_json(), context, ROSTER, NOW).request_id == "apr_1"


def test_an_approval_does_not_verify_for_another_command() -> None:
    view = ApprovalRequestView.from_json(request_json())
    signed = approve_request(APPROVER, view.context("team_1"), now=NOW)
    other = ApprovalRequestView.from_json(request_json(command=["rm", "-rf", "/"]))
    with pytest.raises(ApprovalMismatchError, match="command"):
        verify_approval(signed.to_json(), other.context("team_1"), ROSTER, NOW)


def test_the_requester_cannot_sign_an_approval_of_their_own_request() -> None:
    view = ApprovalRequestView.from_json(request_json())
    with pytest.raises(SelfApprovalError):
        approve_request(REQUESTER, view.context("team_1"), now=NOW)


def test_a_shell_request_has_no_command_and_nested_field_spellings_parse() -> None:
    view = ApprovalRequestView.from_json({
        "id": "apr_3", "state": "approved", "agent": {"id": "agt_9", "name": "db-1"},
        "requester": {"email": "req@x.test", "key_thumbprint": "thumb"},
        "action": "shell", "command": None, "policy": {"version": 2, "rule_id": "r"},
        "decided_by": {"email": "boss@x.test"},
    })
    assert (view.action, view.command, view.shown_command()) == (Action.SHELL, None, "-")
    assert (view.agent_id, view.policy_version, view.rule_id) == ("agt_9", 2, "r")
    assert view.decided_by == "boss@x.test"


def test_a_request_without_its_policy_version_is_refused() -> None:
    with pytest.raises(ApprovalFormatError, match="policy_version"):
        ApprovalRequestView.from_json(request_json(policy_version=None))
    with pytest.raises(ApprovalFormatError, match="action"):
        ApprovalRequestView.from_json(request_json(mode="sudo"))


def test_an_approval_id_is_only_used_for_the_session_it_was_made_for() -> None:
    view = ApprovalRequestView.from_json(request_json())
    check_fits(view, SessionAsk("web-1", "exec", ["systemctl", "restart", "nginx"]))
    check_fits(view, SessionAsk("agt_1", "exec", ["systemctl", "restart", "nginx"]))
    with pytest.raises(ApprovalRefused, match="another command"):
        check_fits(view, SessionAsk("web-1", "exec", ["systemctl", "stop", "nginx"]))
    with pytest.raises(ApprovalRefused, match="agent web-1"):
        check_fits(view, SessionAsk("web-2", "exec", ["systemctl", "restart", "nginx"]))
    with pytest.raises(ApprovalRefused, match="for exec"):
        check_fits(view, SessionAsk("web-1", "shell"))


def test_age_is_short_and_readable() -> None:
    now = time.time()
    assert age(now - 5, now) == "5s"
    assert age(now - 600, now) == "10m"
    assert age(now - 7300, now) == "2h"
    assert age(None) == "?"


# The red team's request: the terminal would move back over "touch /tmp/PW;: " and erase it,
# showing an approver `sh -c 'uptime'` (docs/policy.md, "What an approver sees").
HIDING_COMMAND = ["sh", "-c", "touch /tmp/PW;: \x1b[16D\x1b[Kuptime"]
PADDED_COMMAND = ["sh", "-c", "uptime" + " " * 50 + "; touch /tmp/PW2"]


def on_screen(lines: list[str], columns: int = 200) -> list[str]:
    """What a terminal shows after printing ``lines``."""
    screen = pyte.Screen(columns, len(lines) + 2)
    pyte.Stream(screen).feed("\r\n".join(lines))
    return [row.rstrip() for row in screen.display if row.strip()]


def test_the_list_shows_escape_codes_in_a_command_escaped_not_acted_on() -> None:
    view = ApprovalRequestView.from_json(request_json(command=HIDING_COMMAND))
    lines = approval_table([view])
    assert not any("\x1b" in line for line in lines)
    [row] = [line for line in on_screen(lines) if line.startswith("apr_1")]
    assert "sh -c $'touch /tmp/PW;: \\e[16D\\e[Kuptim…" in row
    assert "sh -c 'uptime'" not in row


def test_the_whole_request_shown_before_approving_escapes_escape_codes() -> None:
    view = ApprovalRequestView.from_json(request_json(command=HIDING_COMMAND))
    lines = request_details(view, width=100, now=NOW)
    assert not any("\x1b" in line for line in lines)
    screen = "\n".join(on_screen(lines))
    assert "command:   sh -c $'touch /tmp/PW;: \\e[16D\\e[Kuptime'" in screen
    assert "requester: req@x.test" in screen and "target:    web-1 (agt_1)" in screen
    assert "policy:    version 5, rule restarts: restarts need approval" in screen
    assert "(in 8m 30s)" in screen


def test_a_long_command_is_never_cut_silently() -> None:
    view = ApprovalRequestView.from_json(request_json(command=PADDED_COMMAND))
    lines = approval_table([view])
    [row] = [line for line in lines if line.startswith("apr_1")]
    assert "…" in row
    assert "tucdesk approvals show ID" in lines[-1]
    details = request_details(view, width=40, now=NOW)
    start = next(index for index, line in enumerate(details) if line.startswith("command:"))
    end = next(index for index, line in enumerate(details) if line.lstrip().startswith("("))
    assert end - start > 1 and all(len(line) <= 40 for line in details[start:end])
    assert "".join(line[11:] for line in details[start:end]) == shlex.join(PADDED_COMMAND)
    assert "3 arguments, wrapped" in details[end]


def test_a_short_command_is_listed_whole_with_no_note() -> None:
    lines = approval_table([ApprovalRequestView.from_json(request_json())])
    assert "systemctl restart nginx" in lines[1] and "…" not in lines[1]
    assert len(lines) == 2


def test_who_decided_and_why_reach_the_waiting_requester_escaped() -> None:
    view = ApprovalRequestView.from_json(request_json(
        state="denied", decided_by="boss@x.test",
        decision_reason="\x1b[2K\r\x1b[1A\x1b[2Ktucdesk: approved by boss",
    ))  # fmt: skip
    refusal = str(_refusal(view))
    assert "\x1b" not in refusal and "\r" not in refusal
    assert "\\e[2K\\r\\e[1A\\e[2Ktucdesk: approved by boss" in refusal


def test_approving_without_a_terminal_and_without_yes_signs_nothing(tmp_path: Path) -> None:
    # Refused before the home is even read: nothing is fetched, nothing signed.
    with pytest.raises(ApprovalCommandError, match="--yes"):
        approve_command(CliHome(tmp_path), "apr_1", None, stdin=io.StringIO())
