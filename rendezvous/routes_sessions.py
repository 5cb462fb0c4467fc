"""Session endpoints: ``POST /v1/sessions`` (token and request proof) and ``GET /v1/sessions/{id}``.

The contract is docs/sessions.md §1; the brokering itself is rendezvous/session_broker.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from protocol.session_grant import MAX_ARGUMENT_SIZE, MAX_COMMAND_ARGUMENTS
from rendezvous.dependencies import Caller, Context
from rendezvous.errors import BadRequest, Forbidden, NotFound, PayloadTooLarge
from rendezvous.schemas import StrictModel
from rendezvous.session_broker import SessionRequest, open_session, session_view, validate_command

router = APIRouter(tags=["sessions"])

MAX_SESSION_REQUEST_BYTES = 16 * 1024
MAX_TARGET_LENGTH = 255
MAX_TERM_LENGTH = 64
MAX_WINDOW_CELLS = 10_000
MAX_APPROVAL_ID_LENGTH = 64
SESSION_VIEWER_ROLES = frozenset({"admin", "auditor"})


class SessionBody(StrictModel):
    """A session request: target agent (name or id), mode, exec argv, and the terminal."""

    target: str = Field(min_length=1, max_length=MAX_TARGET_LENGTH)
    mode: Literal["shell", "exec"]
    command: list[Annotated[str, Field(max_length=MAX_ARGUMENT_SIZE)]] | None = Field(
        default=None, max_length=MAX_COMMAND_ARGUMENTS
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
    for argument in command or ():
        if len(argument.encode("utf-8")) > MAX_ARGUMENT_SIZE or "\x00" in argument:
            raise BadRequest(
                f"command arguments are at most {MAX_ARGUMENT_SIZE} bytes and hold no NUL"
            )
    session_request = SessionRequest(
        target=body.target, mode=body.mode, command=command, term=body.term,
        rows=body.rows, cols=body.cols, approval_id=body.approval_id,
    )  # fmt: skip
    status, answer = await open_session(ctx, caller, session_request)
    return JSONResponse(answer, status_code=status)


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, caller: Caller, ctx: Context) -> dict[str, Any]:
    """A session's state (e.g. why the agent refused it): for its operator, admins, auditors."""
    session = await ctx.store.get_session(caller.team_id, session_id[:MAX_TARGET_LENGTH])
    if session is None:
        raise NotFound("no such session in your team")
    may_view = caller.kind == "operator" and (
        caller.subject == session.operator_id or caller.role in SESSION_VIEWER_ROLES
    )
    if not may_view:
        raise Forbidden("only the session's operator, admins and auditors may see it")
    return session_view(session)
