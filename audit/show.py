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
``signed_by`` (``agent`` or ``service``). A policy result only the agent's own key signed is
the agent's word: shown as ``agent_decision=``/``agent_rule=``, never matched by ``--decision``;
an operator email an agent wrote is shown only if it is an email (protocol check_email). Every
value goes through ``shown_value``: quoted when it holds whitespace, ``=``, ``"`` or ``\\`` (so
no record can add a field to its line), and with every character a terminal would act on
escaped (protocol/terminal_text.py). After those columns a line gives the record's target
(``target=``: an API key's id, a token, an invite) unless agent= or operator= already names it,
then its context
(its details: why a session ended, which keys a revocation revoked, an API key's id and scopes,
an approved command) as ``details.KEY=VALUE``, under that prefix so no context key can pose as a
column (a session record's own argv or command is left out there only when the command= column
was built from that very field, and its operator_email only when operator= shows that email; a
record carrying a command field of its own never shows its session's command instead: an argv
that is not a list of strings leaves command= out and stays in details as signed); a value
longer than
MAX_SHOWN_DETAIL is cut with an ellipsis, and past MAX_SHOWN_DETAILS characters of details the
rest is counted as ``details_omitted=N``; ``--json`` gives the context unchanged as
``details``. Memory is bounded by the bundle, not by the records
shown alone: the join maps keep about 340 bytes per operator login (and some per agent,
approval and session), measured 6.6 MiB for a 12 MiB bundle of 20,000 logins, plus the
records shown.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from audit.actions import Action, ActorKind
from audit.checkpoint import Checkpoint
from audit.errors import RecordError
from audit.record import AuditEvent, AuditRecord, JsonValue, format_time
from audit.trust import agent_names as registered_names
from audit.trust import introduced_agent_key
from audit.verify import (
    EarlierCheckpoint,
    ProgressCallback,
    VerificationResult,
    verify_bundle,
)
from protocol.identity import PublicIdentity
from protocol.policy.roster import check_email
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
MAX_SHOWN_DETAIL = 200  # characters of one context value on a line (escaped), then an ellipsis
MAX_SHOWN_DETAILS = 1024  # characters of a line's details; the fields past it are counted only
DETAILS_PREFIX = "details."  # a context key on a line: never the name of one of show's columns
DETAILS_OMITTED_KEY = "details_omitted"  # how many context fields did not fit on the line
# Context fields a session.* record's command= column may be built from (then left out of its
# details); operator_email is left out only when operator= shows that very email.
SESSION_COMMAND_FIELDS = (EXECUTED_ARGV_FIELD, REQUESTED_COMMAND_FIELD)
_QUOTED_CHARACTERS = frozenset('="\\')  # and whitespace: a value holding one is quoted
_QUOTED_CHARACTERS_ESCAPED = {'"': '\\"', "\\": "\\\\"}


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
    """``--json``'s ``operator`` as before: the acting operator (email, else id), else the
    operator of the record's session."""
    session_id: str | None
    command: str | None
    """Already quoted: ``shown_command`` of an argv, or the rendezvous's shell-quoted text."""
    approved_by: str | None
    signer_key_id: str
    operator_id: str | None = None
    """The id of ``operator``, if known."""
    subject: str | None = None
    """The operator the record is about (email, else id), not necessarily who acted:
    ``operator=`` on a line, ``subject`` in ``--json``."""
    subject_id: str | None = None
    decision: str | None = None
    """The policy result's outcome (allow, deny, approval_required, approved, denied), from a
    record the service signed only."""
    rule_id: str | None = None
    reason: str | None = None
    agent_decision: str | None = None
    """The policy result of a record the agent's own key signed: the agent's word, shown
    apart (``agent_decision=``) and never matched by ``--decision``."""
    agent_rule_id: str | None = None
    agent_reason: str | None = None
    signed_by: str = SIGNED_BY_SERVICE
    """``agent`` when the agent's own key signed the record, ``service`` when an audit key did
    (the rendezvous wrote it, whatever actor it names)."""
    target: str | None = None
    """What the record acted on, as signed (``api_key:<id>``, ``operator:<id>``, an agent id…)."""
    details: Mapping[str, JsonValue] = field(default_factory=dict)
    """The record's context as signed: what the columns leave out (a reason, revoked key ids,
    scopes, the approved command)."""
    column_fields: frozenset[str] = frozenset()
    """The context fields this record's own columns were built from: left out of its details
    on a line (--json keeps every one)."""

    def line(self) -> str:
        """The record on one line: ``key=value`` fields, every value through ``shown_value``
        (so nothing from a record can pose as another field or drive the terminal)."""
        parts = [shown_value(self.time), shown_value(self.action)]
        parts.append(_field("by", f"{self.actor_kind}:{self.actor_id}", self.actor_display))
        if self.actor_kind == ActorKind.AGENT.value and self.signed_by == SIGNED_BY_SERVICE:
            # In an agent's name, but the rendezvous's word: the agent's key did not sign it.
            parts.append(_field("signed_by", SIGNED_BY_SERVICE))
        if self.agent_id is not None:
            if self.agent_name:
                parts.append(_field("agent", self.agent_name, self.agent_id))
            else:
                parts.append(_field("agent", self.agent_id))
        if self.subject is not None:
            parts.append(_field("operator", self.subject))
        if self.session_id is not None:
            parts.append(_field("session", self.session_id))
        if self.decision is not None:
            parts.append(_field("decision", self.decision))
            if self.rule_id:
                parts.append(_field("rule", self.rule_id))
        if self.agent_decision is not None:
            parts.append(_field("agent_decision", self.agent_decision))
            if self.agent_rule_id:
                parts.append(_field("agent_rule", self.agent_rule_id))
        if self.approved_by is not None:
            parts.append(_field("approved_by", self.approved_by))
        if self.command is not None:
            parts.append(_field("command", self.command))
        named_already = (self.agent_id, f"{OPERATOR_TARGET}{self.subject_id}")
        if self.target and self.target not in named_already:
            parts.append(_field("target", self.target))
        details = {k: v for k, v in self.details.items() if k not in self.column_fields}
        parts.extend(_detail_fields(details))
        return " ".join(parts)

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
            "subject": self.subject,
            "subject_id": self.subject_id,
            "session_id": self.session_id,
            "command": self.command,
            "approved_by": self.approved_by,
            "policy_result": _policy_json(self.decision, self.rule_id, self.reason),
            "agent_policy_result": _policy_json(
                self.agent_decision, self.agent_rule_id, self.agent_reason
            ),
            "signed_by": self.signed_by,
            "signer_key_id": self.signer_key_id,
            "target": self.target,
            "details": dict(self.details),
        }


@dataclass
class _Picker:
    """Called with each verified record: keeps what it needs to join, and the matching ones."""

    wanted: RecordFilter
    agent_names: dict[str, str] = field(default_factory=dict)
    """Agent id -> the name (else hostname) its registration gives, for display."""
    agent_aliases: dict[str, list[str]] = field(default_factory=dict)
    """Agent id -> its id, name and hostname, for the ``--agent`` filter."""
    agent_keys: set[str] = field(default_factory=set)
    """Key ids of the agent keys ``agent.registered`` records introduced: a record one of them
    signed is the agent's word, not the service's."""
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
        agent_signed = self._agent_signed(event)
        if event.action is Action.AGENT_REGISTERED and event.target and not agent_signed:
            names = registered_names(event, event.target)
            self.agent_names[event.target] = names[1] if len(names) > 1 else ""
            self.agent_aliases[event.target] = names
            try:
                self.agent_keys.add(introduced_agent_key(event)[1].key_id)
            except RecordError:
                pass  # the verifier accepted it, so it introduced no key: nothing to learn
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
                # Written by the agent (any text its key signs): an email or nothing.
                if isinstance(email, str) and (not agent_signed or check_email(email)):
                    self.session_operators.setdefault(session_id, _Operator(None, email))
            command, _ = _command(record.event.context)
            if command is not None:
                self.session_commands.setdefault(session_id, command)
        shown = self._shown(record, agent_signed)
        if self._matches(shown, record):
            self.picked.append(shown)

    def _agent_signed(self, event: AuditEvent) -> bool:
        """Whether the agent's own key signed ``event`` (agent keys sign only as the agent)."""
        return event.actor.kind is ActorKind.AGENT and event.signer in self.agent_keys

    def _shown(self, record: AuditRecord, agent_signed: bool) -> ShownRecord:
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
        # What --json's "operator" always was: who acted if an operator, else the session's.
        operator = _Operator.acting(event)
        if operator is None and session_id is not None:
            operator = self.session_operators.get(session_id)
        result = event.policy_result
        service_result = None if agent_signed else result
        agent_result = result if agent_signed else None
        command = None
        approved_by = None
        column_fields: set[str] = set()
        if event.action.value.startswith("session."):
            command, source = _command(event.context)
            column_fields.update(source)
            carries_one = any(name in event.context for name in SESSION_COMMAND_FIELDS)
            if command is None and not carries_one and session_id is not None:
                # Only a record that holds no command of its own shows its session's: one
                # whose own (malformed) argv or command was not usable shows it in details.
                command = self.session_commands.get(session_id)
            email = event.context.get(STARTED_OPERATOR_FIELD)
            if isinstance(email, str) and subject is not None and subject.email == email:
                column_fields.add(STARTED_OPERATOR_FIELD)
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
            operator=None if operator is None else operator.shown(),
            operator_id=None if operator is None else operator.operator_id,
            subject=None if subject is None else subject.shown(),
            subject_id=None if subject is None else subject.operator_id,
            session_id=session_id,
            command=command,
            approved_by=approved_by,
            signer_key_id=event.signer,
            decision=None if service_result is None else service_result.outcome.value,
            rule_id=None if service_result is None else service_result.rule_id,
            reason=None if service_result is None else service_result.reason,
            agent_decision=None if agent_result is None else agent_result.outcome.value,
            agent_rule_id=None if agent_result is None else agent_result.rule_id,
            agent_reason=None if agent_result is None else agent_result.reason,
            signed_by=SIGNED_BY_AGENT if agent_signed else SIGNED_BY_SERVICE,
            target=event.target,
            details=event.context,
            column_fields=frozenset(column_fields),
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
        operator_names = {name.casefold() for name in (shown.subject, shown.subject_id) if name}
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
    if not verified.verified:  # VALID, or NEWER: records of a newer release, shown as they are
        return ShowResult(verified, ())
    return ShowResult(verified, tuple(picker.picked))


def _command(context: Mapping[str, JsonValue]) -> tuple[str | None, tuple[str, ...]]:
    """The command a session record's context holds, quoted for a shell, if any, and the one
    field it was taken from (an argv that is not a list of strings is not one)."""
    argv = context.get(EXECUTED_ARGV_FIELD)
    if isinstance(argv, list) and all(isinstance(argument, str) for argument in argv):
        arguments = [argument for argument in argv if isinstance(argument, str)]
        return shown_command(arguments), (EXECUTED_ARGV_FIELD,)
    command = context.get(REQUESTED_COMMAND_FIELD)
    if isinstance(command, str):
        return command, (REQUESTED_COMMAND_FIELD,)
    return None, ()


def shown_value(text: str, limit: int = MAX_SHOWN_FIELD, *, quoted: bool = False) -> str:
    """One value as a line shows it: bare if it is all printable and holds no whitespace,
    ``=``, ``"`` or ``\\``; otherwise in double quotes, JSON-style (``\\"``, ``\\\\``) with every
    character a terminal would act on escaped as protocol/terminal_text.py does (``\\e``,
    ``\\n``, ``\\u202e``). So a value can never read as a further ``key=value`` field. At most
    ``limit`` characters inside, then an ellipsis; ``quoted`` quotes it in any case."""
    bare = not quoted and bool(text) and all(
        char.isprintable() and not char.isspace() and char not in _QUOTED_CHARACTERS
        for char in text
    )
    pieces: list[str] = []
    size = 0
    for char in text:
        piece = _QUOTED_CHARACTERS_ESCAPED.get(char) or visible(char)
        if size + len(piece) > limit - 1:
            pieces.append("…")
            break
        pieces.append(piece)
        size += len(piece)
    body = "".join(pieces)
    return body if bare else f'"{body}"'


def _field(key: str, value: str, aside: str = "") -> str:
    """``key=value``, and `` (aside)`` after it when given (an actor's display, an agent's id)."""
    shown = f"{key}={shown_value(value)}"
    return f"{shown} ({shown_value(aside)})" if aside else shown


def _detail_fields(details: Mapping[str, JsonValue]) -> list[str]:
    """The context as ``details.KEY=VALUE`` fields, in the record's order, within
    MAX_SHOWN_DETAILS characters; then ``details_omitted=N`` for the fields that did not fit."""
    fields: list[str] = []
    size = 0
    for index, (key, value) in enumerate(details.items()):
        shown = f"{DETAILS_PREFIX}{shown_value(key)}={_detail_value(value)}"
        if size + len(shown) > MAX_SHOWN_DETAILS:
            fields.append(f"{DETAILS_OMITTED_KEY}={len(details) - index}")
            break
        fields.append(shown)
        size += len(shown) + 1
    return fields


def _detail_value(value: JsonValue) -> str:
    """One context value on a line, its type still readable: a string bare unless it would read
    as another type (``"3"``, ``"true"``, ``"[a]"`` are quoted), a list of plain strings as
    ``[a,b]``, anything else as compact JSON; at most MAX_SHOWN_DETAIL characters."""
    if isinstance(value, str):
        return shown_value(value, MAX_SHOWN_DETAIL, quoted=_reads_as_json(value))
    if isinstance(value, list) and all(
        isinstance(item, str) and "," not in item and "]" not in item
        and not _reads_as_json(item) and shown_value(item) == item
        for item in value
    ):
        listed = f"[{','.join(item for item in value if isinstance(item, str))}]"
        return listed if len(listed) <= MAX_SHOWN_DETAIL else listed[: MAX_SHOWN_DETAIL - 1] + "…"
    compact = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return shown_value(compact, MAX_SHOWN_DETAIL)


def _reads_as_json(text: str) -> bool:
    """Whether ``text`` parses as JSON (a number, true, a list…): shown bare it would pass for
    one."""
    try:
        json.loads(text)
    except ValueError:
        return text[:1] in ("[", "{")
    return True


def _policy_json(outcome: str | None, rule_id: str | None, reason: str | None) -> object:
    return None if outcome is None else {"outcome": outcome, "rule_id": rule_id, "reason": reason}
