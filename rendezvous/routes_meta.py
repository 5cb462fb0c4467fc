"""Unauthenticated service routes: health, Prometheus metrics and the published JWK set."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from rendezvous.dependencies import Context

router = APIRouter()
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/healthz")
async def healthz(ctx: Context) -> dict[str, Any]:
    """Liveness and store reachability."""
    await ctx.store.get_team("tm_healthcheck")
    return {"status": "ok", "instance": ctx.instance_id, "backend": ctx.store.backend}


@router.get("/metrics")
async def metrics(ctx: Context) -> Response:
    """Prometheus text exposition of this instance's metrics."""
    return Response(ctx.metrics.exposition(), media_type=PROMETHEUS_CONTENT_TYPE)


@router.get("/.well-known/jwks.json")
async def jwks(ctx: Context) -> dict[str, Any]:
    """The service public keys (kid, use, purpose) for relays, agents and verifiers to pin."""
    return ctx.keys.jwks()
