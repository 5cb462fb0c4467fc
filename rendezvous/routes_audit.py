"""Audit export: the caller's team's log as a bundle ``tucdesk-audit verify`` checks offline."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from rendezvous.audit_trail import Action, caller_actor
from rendezvous.auth import Permission, authorize
from rendezvous.dependencies import Caller, Context

router = APIRouter(tags=["audit"])
BUNDLE_MEDIA_TYPE = "application/x-ndjson"


@router.get("/audit/export")
async def export_audit(caller: Caller, ctx: Context) -> StreamingResponse:
    """Stream the team's audit bundle (auditor and admin roles, or an audit:read API key)."""
    authorize(caller, Permission.AUDIT_READ)
    await ctx.audit.record(
        caller.team_id,
        actor=caller_actor(caller),
        action=Action.AUDIT_EXPORTED,
        target=f"team:{caller.team_id}",
        details={},
    )
    return StreamingResponse(
        ctx.audit.export(caller.team_id),
        media_type=BUNDLE_MEDIA_TYPE,
        headers={"Content-Disposition": 'attachment; filename="audit-export.jsonl"'},
    )
