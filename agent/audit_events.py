"""The agent's own audit events for sessions, signed with its identity key.

The agent signs what it saw happen on its host — a session started, the command it ran, how
the session ended, a session it refused — and hands the signed events to the control channel,
which delivers them to the rendezvous for the team's log. Times in the context are integers
(milliseconds): audit records carry no floating-point numbers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from agent.grant_policy import LocalDecision
from agent.process_group import ExitStatus
from audit.actions import Action, ActorKind, PolicyOutcome
from audit.errors import RecordError
from audit.record import Actor, AuditEvent, PolicyResult, SignedEvent, sign_event
from protocol.identity import SigningIdentity
from protocol.session_grant import SessionGrant

# Audit context is at most 16 KiB encoded; long commands are cut to fit, and say so.
MAX_AUDITED_ARGUMENT_CHARACTERS = 1024
MAX_AUDITED_COMMAND_CHARACTERS = 8 * 1024
MAX_AUDITED_REASON_CHARACTERS = 1000


class SessionAuditor:
    """Builds and signs the agent's session events for one agent identity."""

    def __init__(
        self,
        identity: SigningIdentity,
        agent_id: str,
        team_id: str,
        agent_name: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._identity = identity
        self._team_id = team_id
        self._actor = Actor(ActorKind.AGENT, agent_id, agent_name[:320])
        self._clock = clock

    def started(
        self,
        grant: SessionGrant,
        operator_fingerprint: str,
        decision: LocalDecision | None = None,
        *,
        terminal: bool = False,
    ) -> SignedEvent:
        """``session.started``: the handshake and grant checked out and the session runs.

        With ``decision``, the policy result is the agent's own (its version, and the approval
        it executed), not the one the grant claims. ``terminal``: an exec on a terminal
        (``exec -t``), recorded as ``"terminal": true``.
        """
        context: dict[str, Any] = {
            "mode": grant.mode.value,
            "operator_email": grant.operator_email,
            "operator_key_fingerprint": operator_fingerprint,
            "role": grant.role,
            "grant_id": grant.grant_id,
        }
        if terminal:
            context["terminal"] = True
        policy_result = _policy_result(grant)
        if decision is not None:
            approved = decision.approval_request_id is not None
            policy_result = PolicyResult(
                PolicyOutcome.APPROVED if approved else PolicyOutcome(decision.result.value),
                decision.rule_id,
                decision.reason[:MAX_AUDITED_REASON_CHARACTERS],
            )
            context["policy_version"] = decision.policy_version
            if approved:
                context["approval_request_id"] = decision.approval_request_id
        return self._sign(
            Action.SESSION_STARTED,
            grant.session_id,
            target=grant.operator_id,
            policy_result=policy_result,
            context=context,
        )

    def command(self, grant: SessionGrant, argv: Sequence[str]) -> SignedEvent:
        """``session.command``: the exact argv an exec session runs (cut to fit if very long)."""
        audited, truncated = audited_command(argv)
        return self._sign(
            Action.SESSION_COMMAND,
            grant.session_id,
            target=grant.operator_id,
            context={"argv": audited, "truncated": truncated, "argc": len(argv)},
        )

    def ended(
        self,
        session_id: str,
        *,
        duration_ms: int,
        exit_status: ExitStatus | None,
        bytes_in: int,
        bytes_out: int,
        reason: str,
        recording: Mapping[str, Any] | None = None,
    ) -> SignedEvent:
        """``session.ended``: duration, exit code or signal, bytes each way, and why it ended.

        With ``recording`` (agent/recording.py RecordingSummary.audit_context), the context
        names the session's recording file and its SHA-256 and size, binding it to the log.
        """
        context: dict[str, Any] = {
            "duration_ms": max(0, int(duration_ms)),
            "exit_code": None if exit_status is None else exit_status.code,
            "signal": None if exit_status is None else exit_status.signal_name,
            "bytes_in": int(bytes_in),
            "bytes_out": int(bytes_out),
            "reason": reason[:MAX_AUDITED_REASON_CHARACTERS],
        }
        if recording is not None:
            context["recording"] = dict(recording)
        return self._sign(Action.SESSION_ENDED, session_id, context=context)

    def interrupted(
        self, session_id: str, duration_ms: int, recording: Mapping[str, Any]
    ) -> SignedEvent:
        """``session.ended`` for a session the agent stopped during (killed, host down), sent
        at its next start: reason "interrupted", the recording as marked then, and no exit
        status or byte counts (nobody counted them). ``duration_ms`` is at least how long the
        session ran: up to the recording's last event."""
        context: dict[str, Any] = {
            "duration_ms": max(0, int(duration_ms)),
            "exit_code": None,
            "signal": None,
            "reason": "interrupted: the agent stopped before the session ended",
            "recording": dict(recording),
        }
        return self._sign(Action.SESSION_ENDED, session_id, context=context)

    def refused(
        self, session_id: str, code: str, reason: str, operator_fingerprint: str | None
    ) -> SignedEvent:
        """``session.refused``: the agent turned a session down (grant, handshake, start)."""
        return self._sign(
            Action.SESSION_REFUSED,
            session_id,
            policy_result=PolicyResult(
                PolicyOutcome.DENY, None, reason[:MAX_AUDITED_REASON_CHARACTERS]
            ),
            context={"code": code[:64], "operator_key_fingerprint": operator_fingerprint},
        )

    def _sign(
        self,
        action: Action,
        session_id: str,
        *,
        context: dict[str, Any],
        target: str | None = None,
        policy_result: PolicyResult | None = None,
    ) -> SignedEvent:
        event = AuditEvent(
            occurred_at=datetime.fromtimestamp(self._clock(), UTC),
            team_id=self._team_id,
            actor=self._actor,
            action=action,
            signer=self._identity.public.key_id,
            target=target,
            session_id=session_id[:256],
            policy_result=policy_result,
            context=context,
        )
        return sign_event(self._identity, event)


def audited_command(argv: Sequence[str]) -> tuple[list[str], bool]:
    """``argv`` cut to the audit limits, and whether anything was cut."""
    audited: list[str] = []
    budget = MAX_AUDITED_COMMAND_CHARACTERS
    truncated = False
    for argument in argv:
        if budget <= 0 or len(audited) >= 64:
            truncated = True
            break
        piece = argument[: min(MAX_AUDITED_ARGUMENT_CHARACTERS, budget)]
        truncated = truncated or len(piece) < len(argument)
        audited.append(piece)
        budget -= len(piece)
    return audited, truncated


def _policy_result(grant: SessionGrant) -> PolicyResult | None:
    try:
        return PolicyResult(PolicyOutcome(grant.policy_result), grant.policy_rule_id)
    except (ValueError, RecordError):
        return None
