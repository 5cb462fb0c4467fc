"""Approval requests as the rendezvous describes them (docs/sessions.md §6 "Approvals").

Two shapes come back from the service: the 202 answer to ``POST /v1/sessions`` when a session
needs approval (``PendingApproval``), and an approval request from ``GET /v1/approvals`` or
``GET /v1/approvals/{id}`` (``ApprovalRequestView``). Both are parsed here, in one place, into
values the commands print and the approver signs. Nothing here does I/O.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from operator_cli.terminal_text import shown_command, visible

if TYPE_CHECKING:
    # Imported where used: the policy package is only needed once an approval is in play, and
    # `tucdesk exec` start-up time is measured against ssh.
    from protocol.policy import ApprovalContext
    from protocol.policy.request import Action

PENDING = "pending"
APPROVED = "approved"
DENIED = "denied"
EXPIRED = "expired"
EXECUTED = "executed"
WITHDRAWN = "withdrawn"
FINAL_STATES = frozenset({DENIED, EXPIRED, EXECUTED, WITHDRAWN})


class ApprovalFormatError(Exception):
    """The service described an approval request in a form this CLI does not understand."""


@dataclass(frozen=True)
class PendingApproval:
    """A session request parked until an approver confirms it (the 202 answer)."""

    request_id: str
    expires_at: float | None
    approvers: tuple[str, ...]
    reason: str
    rule_id: str | None

    @classmethod
    def from_response(cls, body: object) -> PendingApproval:
        """Parse ``{"approval_request": {...}}``; ApprovalFormatError if it is not that."""
        if not isinstance(body, Mapping) or not isinstance(body.get("approval_request"), Mapping):
            raise ApprovalFormatError("the 202 answer carries no approval_request")
        data = body["approval_request"]
        approvers = data.get("approvers") or []
        if not isinstance(approvers, list) or not all(isinstance(a, str) for a in approvers):
            raise ApprovalFormatError("approvers must be a list of emails")
        return cls(
            request_id=_text_of(data, "id"),
            expires_at=_number(data.get("expires_at")),
            approvers=tuple(approvers),
            reason=str(data.get("reason") or ""),
            rule_id=_optional(data, "rule_id"),
        )

    def waiting_line(self) -> str:
        """What the requester is told while waiting, naming who may approve."""
        who = ", ".join(self.approvers) if self.approvers else "nobody (no approver in the team)"
        return visible(f"waiting for approval by {who} (request {self.request_id})")


@dataclass(frozen=True)
class ApprovalRequestView:
    """One approval request: who asked for what, where, under which policy version, and its state.

    Field names follow the service's JSON; where the contract leaves a name open, the usual
    alternatives are accepted (``agent_id`` or ``agent.id``, ``requester_email`` or
    ``requester.email``), so this is the only place that knows the exact spelling.
    """

    request_id: str
    state: str
    agent_id: str
    agent_name: str
    action: Action
    command: tuple[str, ...] | None
    requester_email: str
    requester_thumbprint: str
    policy_version: int
    reason: str
    rule_id: str | None
    created_at: float | None
    expires_at: float | None
    team_id: str | None
    decided_by: str | None
    decision_reason: str | None
    approvers: tuple[str, ...]

    @classmethod
    def from_json(cls, data: object) -> ApprovalRequestView:
        """Parse one request object; ApprovalFormatError when a needed field is missing."""
        if not isinstance(data, Mapping):
            raise ApprovalFormatError("an approval request is a JSON object")
        from protocol.policy.request import Action

        action_text = _first(data, "action", "mode")
        try:
            action = Action(str(action_text))
        except ValueError:
            raise ApprovalFormatError(f"unknown action {action_text!r}") from None
        command = _first(data, "command")
        if command is not None and (
            not isinstance(command, list) or not all(isinstance(arg, str) for arg in command)
        ):
            raise ApprovalFormatError("command must be a list of arguments")
        version = _first(data, "policy_version", "policy.version")
        if type(version) is not int:
            raise ApprovalFormatError("policy_version must be a whole number")
        approvers = _first(data, "approvers") or []
        agent_id = _text_of(data, "agent_id", "agent.id", "target.id")
        decided_by = _first(
            data, "decided_by_email", "decided_by.email", "approver_email", "approver.email",
            "decided_by",
        )
        return cls(
            request_id=_text_of(data, "id", "request_id"),
            state=str(_first(data, "state", "status") or PENDING),
            agent_id=agent_id,
            agent_name=str(_first(data, "agent_name", "agent.name", "target.name") or agent_id),
            action=action,
            command=None if command is None else tuple(command),
            requester_email=_text_of(data, "requester_email", "requester.email", "requester"),
            requester_thumbprint=_text_of(
                data, "requester_thumbprint", "requester.key_thumbprint", "requester.thumbprint",
                "requester_key_thumbprint",
            ),
            policy_version=version,
            reason=str(_first(data, "reason") or ""),
            rule_id=_optional(data, "rule_id", "policy.rule_id"),
            created_at=_number(_first(data, "created_at", "requested_at")),
            expires_at=_number(_first(data, "expires_at")),
            team_id=_optional(data, "team_id"),
            decided_by=decided_by if isinstance(decided_by, str) else None,
            decision_reason=_optional(data, "decision_reason", "decided_reason"),
            approvers=tuple(str(a) for a in approvers) if isinstance(approvers, list) else (),
        )

    def context(self, team_id: str) -> ApprovalContext:
        """The exact request an approver signs, in ``team_id`` (the approver's own team)."""
        from protocol.policy import ApprovalContext

        return ApprovalContext(
            request_id=self.request_id,
            team_id=team_id,
            agent_id=self.agent_id,
            action=self.action,
            command=self.command,
            requester_thumbprint=self.requester_thumbprint,
            policy_version=self.policy_version,
        )

    def shown_command(self) -> str:
        """The whole command as one line a shell would run as exactly this argv ("-" for a
        shell), every control character visibly escaped."""
        if self.command is None:
            return "-"
        return shown_command(self.command)


def age(created_at: float | None, now: float | None = None) -> str:
    """How long ago ``created_at`` was, as ``45s``, ``12m`` or ``3h``."""
    if created_at is None:
        return "?"
    seconds = max(0, int((time.time() if now is None else now) - created_at))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _lookup(data: Mapping[str, Any], dotted: str) -> Any:
    value: Any = data
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _first(data: Mapping[str, Any], *names: str) -> Any:
    for name in names:
        value = _lookup(data, name)
        if value is not None:
            return value
    return None


def _text_of(data: Mapping[str, Any], *names: str) -> str:
    value = _first(data, *names)
    if not isinstance(value, str) or not value:
        raise ApprovalFormatError(f"the approval request lacks {names[0]}")
    return value


def _optional(data: Mapping[str, Any], *names: str) -> str | None:
    value = _first(data, *names)
    return value if isinstance(value, str) and value else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)
