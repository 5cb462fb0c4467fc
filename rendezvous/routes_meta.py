"""Unauthenticated service routes: health, Prometheus metrics and the published JWK set."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from rendezvous.dependencies import Context
from rendezvous.error_responses import (
    error_body,
    store_failure_kind,
    store_failure_reason,
    store_unhealthy_response,
)
from rendezvous.errors import NotFound, ServiceUnavailable
from rendezvous.metrics import PROMETHEUS_CONTENT_TYPE
from rendezvous.offer_bus import listening_failure
from rendezvous.store import StoreError

router = APIRouter()


# A store that answers reads can still refuse writes (disk full, read-only file system or
# database): health writes too, at most this often while writes succeed, and at every call
# while a failure is known (ServiceContext.store_health), until a write succeeds again.
HEALTH_WRITE_PROBE_SECONDS = 10.0
HEALTH_PROBE_SCOPE = "healthz"


@router.get("/healthz")
async def healthz(ctx: Context) -> Response:
    """Liveness and store reachability, reads and writes (503 when the store fails either, or
    when this instance is not listening for the offers other instances send its agents)."""
    health = ctx.store_health
    try:
        await ctx.store.get_team("tm_healthcheck")
        if health.probe_due(ctx.now(), HEALTH_WRITE_PROBE_SECONDS):
            await ctx.store.probe_writes(HEALTH_PROBE_SCOPE, ctx.instance_id)
            health.wrote(ctx.now())
    except StoreError as error:
        health.failed(store_failure_reason(error), ctx.now())
        return store_unhealthy_response("/healthz", error)
    gap = listening_failure(ctx)
    if gap is not None:
        # Offers other instances broker for this instance's agents are lost until it listens.
        message = (
            "this instance is not listening for session offers from other instances (for "
            f"{max(0.0, ctx.now() - gap.since):.0f} s): {store_failure_kind(gap.reason)}"
        )
        return JSONResponse(error_body(ServiceUnavailable.code, message), status_code=503)
    return JSONResponse({"status": "ok", "instance": ctx.instance_id, "backend": ctx.store.backend})


@router.get("/metrics")
async def metrics(ctx: Context) -> Response:
    """Prometheus text exposition of this instance's metrics (404 here when ``metrics_listen``
    serves them on their own address)."""
    if ctx.config.metrics_listen is not None:
        raise NotFound("metrics are served on the metrics address (metrics_listen)")
    return Response(ctx.metrics.exposition(), media_type=PROMETHEUS_CONTENT_TYPE)


@router.get("/.well-known/jwks.json")
async def jwks(ctx: Context) -> dict[str, Any]:
    """The service public keys (kid, use, purpose) for relays, agents and verifiers to pin."""
    return ctx.keys.jwks()
