"""Unauthenticated service routes: health, Prometheus metrics and the published JWK set."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from rendezvous.dependencies import Context
from rendezvous.errors import NotFound
from rendezvous.metrics import PROMETHEUS_CONTENT_TYPE

router = APIRouter()


# A store that answers reads can still refuse writes (disk full, read-only file system or
# database): health writes too, at most this often while writes succeed.
HEALTH_WRITE_PROBE_SECONDS = 10.0
HEALTH_PROBE_SCOPE = "healthz"
_last_good_write: dict[str, float] = {}


@router.get("/healthz")
async def healthz(ctx: Context) -> dict[str, Any]:
    """Liveness and store reachability, reads and writes (503 when the store fails either)."""
    await ctx.store.get_team("tm_healthcheck")
    now = ctx.now()
    if now - _last_good_write.get(ctx.instance_id, -HEALTH_WRITE_PROBE_SECONDS) >= (
        HEALTH_WRITE_PROBE_SECONDS
    ):
        _last_good_write.pop(ctx.instance_id, None)
        # One row per instance, rewritten in place (already expired, so pruning removes it).
        await ctx.store.remember_nonce(HEALTH_PROBE_SCOPE, ctx.instance_id, now, now)
        _last_good_write[ctx.instance_id] = now
    return {"status": "ok", "instance": ctx.instance_id, "backend": ctx.store.backend}


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
