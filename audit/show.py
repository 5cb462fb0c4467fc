"""`tucdesk-audit show`: the records of a verified bundle, one line each, for people.

Nothing is shown from a bundle that does not verify: records are picked as they pass their
checks, in the verifier's one read of the file (``verify_bundle(..., on_record=...)``), and kept
only if the whole bundle verified. Each line gives the log time, action, who acted (``by=``),
the agent and the operator the record is about (``operator=``: the target of an ``operator.*``
action, the requester of an ``approval.*``, the operator of a ``session.*``, joined from earlier
records where the record itself holds only an id), a policy result (``decision=``, ``rule=``)
and for session records the command; a ``session.started`` that executed an approval names who
approved it (joined with the ``approval.approved`` record of its approval id). A record with
an agent actor that an audit key signed (the rendezvous's word, not the agent's: it connected,
refused a session or a policy) says ``signed_by=service``, and ``--json`` gives every record's
``signed_by`` (``agent`` or ``service``). Every string a record holds went
through protocol/terminal_text.py: no control character from a bundle ever reaches the
terminal. Memory grows with the records shown, not with the bundle.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from audit.actions import Action, ActorKind
from audit.checkpoint import Checkpoint
from audit.record import AuditEvent, AuditRecord, format_time
from audit.trust import agent_names as registered_names
from audit.verify import (
    EarlierCheckpoint,
    ProgressCallback,
    VerificationResult,
    verify_bundle,
)
from protocol.identity import PublicIdentity
from protocol.terminal_text import shown_command, visible

APPROVAL_ID_FIELD = "approval_request"  # in approval.* records (rendezvous/approval_gate.py)
STARTED_APPROVAL_ID_FIELD = "approval_request_id"  # in session.started (agent/audit_events.py)
REQUESTED_COMMAND_FIELD = "command"  # session.requested: shell-quoted by the rendezvous
EXECUTED_ARGV_FIELD = "argv"  # session.command: the argv the agent ran
STARTED_OPERATOR_FIELD = "operator_email"
REQUESTER_FIELD = "requester"  # approval.approved/denied/withdrawn: the requester's email
OPERATOR_EMAIL_FIELD = "email"  # operator.revoked, operator.invite_*: the operator's email
LOGIN_JTI_FIELD = "jti"  # operator.login_succeeded: the access token it issued
OPERATOR_TARGET = "operator:"  # operator.revoked, operator.login_*: target = operator:<id>
INVITE_TARGET = "invite:"
REVOKED_JTI_TARGET = "token:"  # operator.token_revoked: target = token:<jti>
SIGNED_BY_AGENT = "agent"  # the agent's own key signed the record
SIGNED_BY_SERVICE = "service"  # an audit key did: the rendezvous wrote it
MAX_SHOWN_FIELD = 1024  # characters of one field on a line (already escaped), then an ellipsis


class TimeError(ValueError):
    """A --from / --to time that is not ISO 8601."""


def parse_when(text: str) -> datetime:
    """An ISO 8601 time (``Z`` or an offset; without one, UTC); TimeError otherwise."""
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise TimeError(
            f"{text[:80]!r} is not a time: give ISO 8601, e.g. 2026-11-26T10:00:00Z"
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


@dataclass(frozen=True)
class RecordFilter:
    """Which records to show; every criterion given must match."""

    agent: str | None = None
    """Agent id, name or hostname."""
    operator: str | None = None
    """Operator email or id: records by them or about them (either ``by=`` or ``operator=``)."""
    actor: str | None = None
    """Actor id or display (email, hostname): records by them only."""
    decision: str | None = None
    """A policy outcome (``deny``…): records whose policy result says it."""
    action_prefix: str | None = None
    start: datetime | None = None
    end: datetime | None = None


@dataclass(frozen=True)
class ShownRecord:
    """One record as ``show`` prints it (strings as the record holds them, not yet escaped)."""

    seq: int
    time: str
    action: str
    actor_kind: str
    actor_id: str
    actor_display: str
    agent_id: str | None
    agent_name: str | None
    operator: str | None
    """The operator the record is about (email, else id), not necessarily who acted."""
    session_id: str | None
    command: str | None
    """Already quoted: ``shown_command`` of an argv, or the rendezvous's shell-quoted text."""
    approved_by: str | None
    signer_key_id: str
    operator_id: str | None = None
    decision: str | None = None
    """The policy result's outcome (allow, deny, approval_required, approved, denied)."""
    rule_id: str | None = None
    reason: str | None = None
    signed_by: str = SIGNED_BY_SERVICE
    """``agent`` when the agent's own key signed the record, ``service`` when an audit key did
    (the rendezvous wrote it, whatever actor it names)."""

    def line(self) -> str:
        """The record on one line, every part escaped for a terminal."""
        actor = f"{self.actor_kind}:{self.actor_id}"
        if self.actor_display:
            actor += f" ({self.actor_display})"
        parts = [self.time, self.action, f"by={actor}"]
        if self.actor_kind == ActorKind.AGENT.value and self.signed_by == SIGNED_BY_SERVICE:
            # In an agent's name, but the rendezvous's word: the agent's key did not sign it.
            parts.append(f"signed_by={SIGNED_BY_SERVICE}")
        if self.agent_id is not None:
            name = f"{self.agent_name} ({self.agent_id})" if self.agent_name else self.agent_id
            parts.append(f"agent={name}")
        if self.operator is not None:
            parts.append(f"operator={self.operator}")
        if self.session_id is not None:
            parts.append(f"session={self.session_id}")
        if self.decision is not None:
            parts.append(f"decision={self.decision}")
            if self.rule_id:
                parts.append(f"rule={self.rule_id}")
        if self.approved_by is not None:
            parts.append(f"approved_by={self.approved_by}")
        if self.command is not None:
            parts.append(f"command={self.command}")
        return " ".join(_shown(part) for part in parts)

    def to_json(self) -> dict[str, object]:
        """The record as a JSON-ready dict (``--json``; JSON escapes control characters)."""
        return {
            "seq": self.seq,
            "time": self.time,
            "action": self.action,
            "actor": {"kind": self.actor_kind, "id": self.actor_id, "display": self.actor_display},
            "agent_id": self.agent_id,
            "agent_name": self.agent_name,
            "operator": self.operator,
            "operator_id": self.operator_id,
            "session_id": self.session_id,
            "command": self.command,
            "approved_by": self.approved_by,
            "policy_result": None
            if self.decision is None
            else {"outcome": self.decision, "rule_id": self.rule_id, "reason": self.reason},
            "signed_by": self.signed_by,
            "signer_key_id": self.signer_key_id,
        }


@dataclass
class _Picker:
    """Called with each verified record: keeps what it needs to join, and the matching ones."""

    wanted: RecordFilter
    agent_names: dict[str, str] = field(default_factory=dict)
    """Agent id -> the name (else hostname) its registration gives, for display."""
    agent_aliases: dict[str, list[str]] = field(default_factory=dict)
    """Agent id -> its id, name and hostname, for the ``--agent`` filter."""
    session_operators: dict[str, _Operator] = field(default_factory=dict)
    operator_emails: dict[str, str] = field(default_factory=dict)
    """Operator id -> email, from operator actors and operator.* records."""
    token_operators: dict[str, _Operator] = field(default_factory=dict)
    """Access token id (jti) -> the operator it was issued to (operator.login_succeeded)."""
    requesters: dict[str, _Operator] = field(default_factory=dict)
    """Approval request id -> its requester (the actor of approval.requested)."""
    session_commands: dict[str, str] = field(default_factory=dict)
    approvers: dict[str, str] = field(default_factory=dict)
    picked: list[ShownRecord] = field(default_factory=list)

    def __call__(self, record: AuditRecord) -> None:
        event = record.event
        actor, context, session_id = event.actor, event.context, event.session_id
        if event.action is Action.AGENT_REGISTERED and event.target:
            names = registered_names(event, event.target)
            self.agent_names[event.target] = names[1] if len(names) > 1 else ""
            self.agent_aliases[event.target] = names
        operator_actor = _Operator.acting(event)
        if operator_actor is not None and operator_actor.operator_id and operator_actor.email:
            self.operator_emails[operator_actor.operator_id] = operator_actor.email
        approval_id = context.get(APPROVAL_ID_FIELD)
        if event.action is Action.APPROVAL_APPROVED and isinstance(approval_id, str):
            self.approvers[approval_id] = actor.display or actor.id
        if (
            event.action is Action.APPROVAL_REQUESTED
            and isinstance(approval_id, str)
            and operator_actor is not None
        ):
            self.requesters.setdefault(approval_id, operator_actor)
        if event.action is Action.OPERATOR_LOGIN_SUCCEEDED and operator_actor is not None:
            jti = context.get(LOGIN_JTI_FIELD)
            if isinstance(jti, str):
                self.token_operators[jti] = operator_actor
        if session_id is not None:
            if operator_actor is not None:
                self.session_operators.setdefault(session_id, operator_actor)
            if event.action is Action.SESSION_STARTED:
                email = context.get(STARTED_OPERATOR_FIELD)
                if isinstance(email, str):
                    self.session_operators.setdefault(session_id, _Operator(None, email))
            command = _command(record)
            if command is not None:
                self.session_commands.setdefault(session_id, command)
        shown = self._shown(record)
        if self._matches(shown, record):
            self.picked.append(shown)

    def _shown(self, record: AuditRecord) -> ShownRecord:
        event = record.event
        actor, session_id = event.actor, event.session_id
        agent_id: str | None = None
        if actor.kind is ActorKind.AGENT:
            agent_id = actor.id
        elif event.target is not None and event.target in self.agent_names:
            agent_id = event.target
        subject = self._subject(record)
        if subject is not None and subject.operator_id and not subject.email:
            subject = _Operator(subject.operator_id, self.operator_emails.get(subject.operator_id))
        result = event.policy_result
        command = None
        approved_by = None
        if event.action.value.startswith("session."):
            command = _command(record)
            if command is None and session_id is not None:
                command = self.session_commands.get(session_id)
        if event.action is Action.SESSION_STARTED:
            approval_id = event.context.get(STARTED_APPROVAL_ID_FIELD)
            if isinstance(approval_id, str):
                approved_by = self.approvers.get(approval_id, f"unknown (approval {approval_id})")
        return ShownRecord(
            seq=record.seq,
            time=format_time(record.time),
            action=event.action.value,
            actor_kind=actor.kind.value,
            actor_id=actor.id,
            actor_display=actor.display,
            agent_id=agent_id,
            agent_name=None if agent_id is None else self.agent_names.get(agent_id) or None,
            operator=None if subject is None else subject.shown(),
            operator_id=None if subject is None else subject.operator_id,
            session_id=session_id,
            command=command,
            approved_by=approved_by,
            signer_key_id=event.signer,
            decision=None if result is None else result.outcome.value,
            rule_id=None if result is None else result.rule_id,
            reason=None if result is None else result.reason,
        )

    def _subject(self, record: AuditRecord) -> _Operator | None:
        """The operator a record is about: whom an operator.* action was done to, whose
        request an approval.* decides, whose session a session.* is part of."""
        event = record.event
        action, target, context = event.action, event.target or "", event.context
        if action.value.startswith("operator."):
            email = context.get(OPERATOR_EMAIL_FIELD)
            email = email if isinstance(email, str) and email else None
            if target.startswith(OPERATOR_TARGET):
                return _Operator(target.removeprefix(OPERATOR_TARGET), email)
            if target.startswith(INVITE_TARGET):
                acting = _Operator.acting(event)
                if action is Action.OPERATOR_INVITE_USED and acting is not None:
                    return _Operator(acting.operator_id, email or acting.email)
                return None if email is None else _Operator(None, email)
            if target.startswith(REVOKED_JTI_TARGET):
                return self.token_operators.get(target.removeprefix(REVOKED_JTI_TARGET))
            return None
        if action.value.startswith("approval."):
            approval_id = context.get(APPROVAL_ID_FIELD)
            known = self.requesters.get(approval_id) if isinstance(approval_id, str) else None
            requester = context.get(REQUESTER_FIELD)
            if isinstance(requester, str) and requester:
                if known is not None and known.email == requester:
                    return known
                return _Operator(None, requester)
            return known
        if action.value.startswith("session.") and event.session_id is not None:
            return self.session_operators.get(event.session_id)
        return None

    def _matches(self, shown: ShownRecord, record: AuditRecord) -> bool:
        wanted = self.wanted
        if wanted.action_prefix is not None and not shown.action.startswith(wanted.action_prefix):
            return False
        if wanted.start is not None and record.time < wanted.start:
            return False
        if wanted.end is not None and record.time > wanted.end:
            return False
        if wanted.agent is not None and (
            shown.agent_id is None
            or wanted.agent not in self.agent_aliases.get(shown.agent_id, [shown.agent_id])
        ):
            return False
        if wanted.decision is not None and shown.decision != wanted.decision:
            return False
        actor_names = {shown.actor_id.casefold(), shown.actor_display.casefold()} - {""}
        if wanted.actor is not None and wanted.actor.casefold() not in actor_names:
            return False
        if wanted.operator is None:
            return True
        # By them (an operator actor) or about them (the subject), by email or id.
        operator_names = {
            name.casefold() for name in (shown.operator, shown.operator_id) if name
        }
        if shown.actor_kind == ActorKind.OPERATOR.value:
            operator_names |= actor_names
        return wanted.operator.casefold() in operator_names


@dataclass(frozen=True)
class _Operator:
    """An operator as far as the log names them: id and email, either may be unknown."""

    operator_id: str | None
    email: str | None

    @classmethod
    def acting(cls, event: AuditEvent) -> _Operator | None:
        """The record's actor, if an operator."""
        actor = event.actor
        if actor.kind is not ActorKind.OPERATOR:
            return None
        return cls(actor.id, actor.display or None)

    def shown(self) -> str:
        """Email if known, else id."""
        return self.email or self.operator_id or ""


@dataclass(frozen=True)
class ShowResult:
    """The bundle's verification, and the records picked (only when it verified)."""

    verification: VerificationResult
    records: tuple[ShownRecord, ...]


def show_records(
    bundle: Path | BinaryIO,
    audit_keys: Sequence[PublicIdentity],
    wanted: RecordFilter,
    *,
    previous_checkpoints: Sequence[Checkpoint | EarlierCheckpoint] = (),
    progress: ProgressCallback | None = None,
    agent_pins: Mapping[str, str] | None = None,
) -> ShowResult:
    """Verify ``bundle`` and pick the records ``wanted`` in the same read; none unless it
    verified."""
    picker = _Picker(wanted)
    verified = verify_bundle(
        bundle,
        audit_keys,
        previous_checkpoints=previous_checkpoints,
        progress=progress,
        on_record=picker,
        agent_pins=agent_pins,
    )
    if not verified.ok:
        return ShowResult(verified, ())
    # Who signed what is known once the bundle verified: the keys' roles as the verifier
    # trusted them (an audit key first, as it checks them).
    agent_keys = {key.key_id for key in verified.signing_keys if key.role == "agent"}
    return ShowResult(
        verified,
        tuple(
            replace(
                shown,
                signed_by=SIGNED_BY_AGENT
                if shown.signer_key_id in agent_keys
                else SIGNED_BY_SERVICE,
            )
            for shown in picker.picked
        ),
    )


def _command(record: AuditRecord) -> str | None:
    """The command a session record holds, quoted for a shell, if any."""
    context = record.event.context
    argv = context.get(EXECUTED_ARGV_FIELD)
    if isinstance(argv, list) and all(isinstance(argument, str) for argument in argv):
        return shown_command([argument for argument in argv if isinstance(argument, str)])
    command = context.get(REQUESTED_COMMAND_FIELD)
    if isinstance(command, str):
        return command
    return None


def _shown(text: str) -> str:
    text = visible(text)
    return text if len(text) <= MAX_SHOWN_FIELD else text[: MAX_SHOWN_FIELD - 1] + "…"
