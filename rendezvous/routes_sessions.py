"""Session endpoints: ``POST /v1/sessions`` (token and request proof), ``GET /v1/sessions``
(the team's sessions, newest first, a page at a time) and ``GET /v1/sessions/{id}``.

Reading sessions: whoever holds ``sessions:read`` (admins and auditors by role, API keys by
scope) reads the whole team's; any other operator only their own.

The list's ``agent`` filter takes an agent's id (a removed agent's too: its history stays) or
name, ``operator`` an operator's id or email; one that names nobody in the caller's team is
refused (404 naming it), never answered with an empty list that reads as "no sessions".

``POST /v1/sessions/{id}/end`` (admins; token and request proof) ends one open session of the
team without disabling anyone, as Teleport can terminate a session: ``session.ended`` by the
admin (reason ``ended_by_admin``) is recorded, the row ends, then the agent is told over its
control channel on whichever instance holds it (rendezvous/offer_bus.py ``tell_agent_to_end``);
the answer says whether it was reached. A session already ended or refused is answered as it
is (``already_ended``), nothing recorded. Of two ends of one session at once (two admins, a
retry, a removal), one claims it (offer_bus.py ``end_open_sessions``) and records it; the other
records nothing and is answered 409 ``session_being_ended`` while the row is still open. A
refused end (not an admin, or no such session in the caller's team: another team's id is
answered and recorded alike) leaves a ``session.end_failed`` record with the id as sent in the
CALLER's team log.

The contract is docs/sessions.md §1; the brokering itself is rendezvous/session_broker.py.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from protocol.exec_limits import CommandTooLargeError, check_exec_command
from rendezvous.agent_list_query import openapi_query_parameter
from rendezvous.audit_trail import (
    REFUSED_NOT_FOUND,
    REFUSED_NOT_PERMITTED,
    Action,
    caller_actor,
    refused_id,
)
from rendezvous.auth import Permission, Principal, authorize, is_granted
from rendezvous.context import ServiceContext
from rendezvous.dependencies import Caller, Context
from rendezvous.errors import BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge
from rendezvous.offer_bus import (
    ENDED_BY_ADMIN_REASON,
    ENDING_CLAIM_SECONDS,
    AgentReach,
    end_open_sessions,
)
from rendezvous.schemas import SessionList, SessionView, StrictModel
from rendezvous.session_broker import (
    AmbiguousTarget,
    SessionRequest,
    open_session,
    validate_command,
)
from rendezvous.session_list_query import (
    DEFAULT_SESSIONS_PER_PAGE,
    MAX_SESSIONS_PER_PAGE,
    encode_session_cursor,
    session_query,
)
from rendezvous.store import SessionState
from rendezvous.store.base import ListedSession, SessionQuery

router = APIRouter(tags=["sessions"])

MAX_SESSION_REQUEST_BYTES = 16 * 1024
MAX_TARGET_LENGTH = 255
MAX_TERM_LENGTH = 64
MAX_WINDOW_CELLS = 10_000
MAX_APPROVAL_ID_LENGTH = 64
NO_SUCH_SESSION = "no such session in your team"
# Ending another operator's session is an admin's act, as disabling one is (never an API key's).
SESSIONS_END_PERMISSION = Permission.OPERATORS_WRITE
OPEN_STATES = (SessionState.OFFERED, SessionState.ACCEPTED)


class SessionBeingEnded(Conflict):
    """Another request holds the claim on ending this session (it records and ends it)."""

    code = "session_being_ended"


class EndedSessionView(BaseModel):
    """``POST /v1/sessions/{id}/end``: the session as it is now, whether this request ended it
    (False: it had ended or been refused already), and how its agent was asked to end it
    (rendezvous/offer_bus.py AgentReach: ``here``, ``other_instance``, ``not_connected``)."""

    session: SessionView
    already_ended: bool
    agent_reached: str


class SessionBody(StrictModel):
    """A session request: target agent (name or id), mode, exec argv, and the terminal."""

    target: str = Field(min_length=1, max_length=MAX_TARGET_LENGTH)
    mode: Literal["shell", "exec"]
    # Outer bounds only (no request body within its size holds more): the grant's own limits
    # are checked in create_session, with a message that says which one and what to do.
    command: list[Annotated[str, Field(max_length=MAX_SESSION_REQUEST_BYTES)]] | None = Field(
        default=None, max_length=MAX_SESSION_REQUEST_BYTES // 3
    )
    term: str = Field(
        default="xterm-256color", min_length=1, max_length=MAX_TERM_LENGTH,
        pattern=r"^[A-Za-z0-9._+-]+$",
    )  # fmt: skip
    rows: int = Field(default=24, ge=1, le=MAX_WINDOW_CELLS)
    cols: int = Field(default=80, ge=1, le=MAX_WINDOW_CELLS)
    approval_id: str | None = Field(
        default=None, min_length=1, max_length=MAX_APPROVAL_ID_LENGTH, pattern=r"^apr_[a-z0-9]+$"
    )


@router.post("/sessions", status_code=201)
async def create_session(
    body: SessionBody, caller: Caller, ctx: Context, request: Request
) -> JSONResponse:
    """Broker a session (201 with grant and relay token), or park it for approval (202)."""
    if len(await request.body()) > MAX_SESSION_REQUEST_BYTES:
        raise PayloadTooLarge(f"a session request is at most {MAX_SESSION_REQUEST_BYTES} bytes")
    command = validate_command(body.mode, body.command)
    if command is not None:
        if any("\x00" in argument for argument in command):
            raise BadRequest("command arguments hold no NUL")
        try:
            check_exec_command(command)
        except CommandTooLargeError as error:
            raise BadRequest(
                f"{error}; for a long script, send it on stdin: tucdesk exec AGENT -- sh -s "
                "< script.sh"
            ) from None
    session_request = SessionRequest(
        target=body.target, mode=body.mode, command=command, term=body.term,
        rows=body.rows, cols=body.cols, approval_id=body.approval_id,
    )  # fmt: skip
    status, answer = await open_session(ctx, caller, session_request)
    return JSONResponse(answer, status_code=status)


@router.get("/sessions/{session_id}", response_model=SessionView)
async def get_session(session_id: str, caller: Caller, ctx: Context) -> SessionView:
    """A session's state (e.g. why the agent refused it), as the list shows it: for its
    operator, admins, auditors and API keys with the sessions:read scope."""
    # An API key without the scope is refused before the lookup: it learns no session ids.
    reader = _session_reader(caller)
    listed = await ctx.store.listed_session(caller.team_id, session_id[:MAX_TARGET_LENGTH])
    if listed is None:
        raise NotFound("no such session in your team")
    if reader is not None and reader != listed.session.operator_id:
        raise Forbidden("only the session's operator, admins and auditors may see it")
    return _listed_session_view(listed)


@router.post("/sessions/{session_id}/end", response_model=EndedSessionView)
async def end_session(session_id: str, caller: Caller, ctx: Context) -> EndedSessionView:
    """End an open session of the caller's team (admins): recorded first, then its row ends and
    its agent is told to end it at once; the agent signs its own ``session.ended`` as well."""
    try:
        authorize(caller, SESSIONS_END_PERMISSION)
    except Forbidden:
        await _record_end_refused(ctx, caller, session_id, REFUSED_NOT_PERMITTED)
        raise Forbidden(
            "only admins may end a session (your own: exit it, or type ~. in a shell)"
        ) from None
    listed = await ctx.store.listed_session(caller.team_id, session_id[:MAX_TARGET_LENGTH])
    if listed is None:
        await _record_end_refused(ctx, caller, session_id, REFUSED_NOT_FOUND)
        raise NotFound(NO_SUCH_SESSION)
    session = listed.session
    if session.state not in OPEN_STATES:
        return EndedSessionView(
            session=_listed_session_view(listed), already_ended=True,
            agent_reached=AgentReach.NOT_CONNECTED.value,
        )  # fmt: skip
    ended = await end_open_sessions(
        ctx, [session], ENDED_BY_ADMIN_REASON, caller_actor(caller),
        {"ended_by": caller.email or caller.subject},
    )  # fmt: skip
    now = await ctx.store.listed_session(caller.team_id, session.id)
    assert now is not None  # open sessions are never deleted
    if not ended.session_ids and now.session.state in OPEN_STATES:
        # Another end (an admin, a retry, a removal) claimed it first and records it; or one
        # failed within the claim's time. Not "already ended": it is not, yet.
        raise SessionBeingEnded(
            f"another request is ending session {session.id} now (or one failed in the last "
            f"{ENDING_CLAIM_SECONDS:.0f} s); look again with tucdesk sessions show {session.id}"
        )
    return EndedSessionView(
        session=_listed_session_view(now), already_ended=not ended.session_ids,
        agent_reached=ended.reach.value,
    )  # fmt: skip


async def _record_end_refused(
    ctx: ServiceContext, caller: Principal, session_id: str, reason: str
) -> None:
    """Record, in the caller's own team log, an end refused before anything was done."""
    await ctx.audit.record_refusal(
        caller.team_id, actor=caller_actor(caller), action=Action.SESSION_END_FAILED,
        target=f"session:{refused_id(session_id)}", details={"reason": reason},
    )  # fmt: skip


# The query is parsed by ``session_list_query`` after the caller is authorized (so 401 and 403
# come before 422 and 400), not by FastAPI: these only document it.
_SESSION_LIST_PARAMETERS = [
    openapi_query_parameter(
        "limit", "sessions per page",
        {"type": "integer", "minimum": 1, "maximum": MAX_SESSIONS_PER_PAGE,
         "default": DEFAULT_SESSIONS_PER_PAGE},
    ),
    openapi_query_parameter(
        "after", "the next_after of the previous page (opaque)", {"type": "string"}
    ),
    openapi_query_parameter(
        "state", "only sessions in this state (repeat: in any of them)",
        {"type": "array", "items": {"type": "string",
                                    "enum": ["offered", "accepted", "refused", "ended"]}},
    ),
    openapi_query_parameter(
        "agent", "only sessions on this agent (id, removed agents too; or name)",
        {"type": "string"},
    ),
    openapi_query_parameter(
        "operator", "only sessions of this operator (id, or email: every id it had)",
        {"type": "string"},
    ),
    openapi_query_parameter("since", "only sessions created at or after this Unix time",
                     {"type": "number"}),
]  # fmt: skip


@router.get(
    "/sessions", response_model=SessionList, openapi_extra={"parameters": _SESSION_LIST_PARAMETERS}
)
async def list_sessions(caller: Caller, ctx: Context, request: Request) -> SessionList:
    """A page of the caller's team's sessions, newest first, filtered by the query: admins,
    auditors and API keys with the sessions:read scope see all of them, any other operator
    only their own (the team comes from the verified credential only)."""
    reader = _session_reader(caller)
    ask = session_query(request.scope.get("query_string", b""))
    query = ask.query
    if reader is not None:
        if ask.operator is not None and not _names_caller(caller, ask.operator):
            # Refused before any lookup: it tells nothing about who else is in the team.
            raise Forbidden(
                f"operator {ask.operator!r}: you may list only your own sessions (admins and "
                "auditors list anyone's); leave --operator out, or give your own id or email"
            )
        query = dataclasses.replace(query, operator_id=reader)
    elif ask.operator is not None:
        query = await _with_operator(ctx, caller.team_id, ask.operator, query)
    if ask.agent is not None:
        agent_id = await _history_agent_id(ctx, caller.team_id, ask.agent)
        query = dataclasses.replace(query, agent_id=agent_id)
    listing = await ctx.store.session_listing(caller.team_id, query)
    last = listing.sessions[-1].session if listing.more and listing.sessions else None
    return SessionList(
        sessions=[_listed_session_view(listed) for listed in listing.sessions],
        next_after=encode_session_cursor(last.created_at, last.id) if last else None,
    )


def _names_caller(caller: Principal, operator: str) -> bool:
    """Whether ``operator`` (an id or an email) is the calling operator."""
    if operator == caller.subject:
        return True
    return caller.email is not None and operator.lower() == caller.email.lower()


async def _with_operator(
    ctx: ServiceContext, team_id: str, operator: str, query: SessionQuery
) -> SessionQuery:
    """``query`` narrowed to the operator ``operator`` names in the team: an id, or an email
    (every id that email had); NotFound naming it when it names no operator of the team."""
    matches = await ctx.store.operators_matching(team_id, operator)
    if not matches:
        raise NotFound(f"no operator {operator!r} in your team (give an operator id or email)")
    if any(match.id == operator for match in matches):
        return dataclasses.replace(query, operator_id=operator)
    return dataclasses.replace(query, operator_email=operator)


async def _history_agent_id(ctx: ServiceContext, team_id: str, agent: str) -> str:
    """The id of the agent ``agent`` names in the team: its id (a removed agent's too), else
    the current agent of that name, else the removed agent that had it. NotFound naming it;
    AmbiguousTarget listing the ids when several agents had the name."""
    matches = await ctx.store.agents_matching(team_id, agent)
    if any(match.id == agent for match in matches):
        return agent
    current = [match for match in matches if not match.is_removed()]
    named = current or matches
    if not named:
        raise NotFound(
            f"no agent {agent!r} in your team, current or removed (give an agent id or name)"
        )
    if len(named) > 1:
        kind = "agents" if current else "removed agents"
        ids = ", ".join(match.id for match in named)
        raise AmbiguousTarget(f"several {kind} are named {agent!r} ({ids}); use the agent id")
    return named[0].id


def _session_reader(caller: Principal) -> str | None:
    """Whose sessions ``caller`` may read: None for the whole team (sessions:read: admins and
    auditors by role, API keys by scope), or the id of an operator without it (their own);
    Forbidden for an API key without the scope."""
    if caller.kind == "operator" and not is_granted(caller, Permission.SESSIONS_READ):
        return caller.subject
    authorize(caller, Permission.SESSIONS_READ)
    return None


def _listed_session_view(listed: ListedSession) -> SessionView:
    session = listed.session
    return SessionView(
        session_id=session.id,
        agent_id=session.agent_id,
        agent_name=listed.agent_name,
        operator_id=session.operator_id,
        operator_email=listed.operator_email,
        mode=session.mode,
        command=None if session.command is None else list(session.command),
        state=session.state.value,
        reason=session.state_reason,
        policy_result=session.policy_result,
        policy_rule_id=session.policy_rule_id,
        relay_id=session.relay_id or None,  # none chosen: refused before brokering
        created_at=session.created_at,
        updated_at=session.updated_at,
        expires_at=session.expires_at,
        exit_code=session.exit_code,
        exit_signal=session.exit_signal,
    )
