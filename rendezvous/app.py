"""The rendezvous ASGI application: FastAPI routes under /v1, JSON errors, body caps, metrics.

``create_app(ctx)`` builds one application around one ServiceContext; it holds no global state,
so tests can run several side by side.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from rendezvous.body_limit import BodyLimitMiddleware
from rendezvous.context import ServiceContext
from rendezvous.errors import ServiceError, ServiceUnavailable, TooManyRequests, Unauthorized
from rendezvous.metrics import RequestMetricsMiddleware
from rendezvous.store import StoreError

logger = logging.getLogger("tucdesk.rendezvous")

API_PREFIX = "/v1"
OPENAPI_PATH = "/v1/openapi.json"
MAX_VALIDATION_MESSAGE = 300
_HTTP_ERROR_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
}


def error_body(code: str, message: str) -> dict[str, str]:
    """The JSON body of every error response."""
    return {"error": code, "message": message}


def create_app(ctx: ServiceContext) -> Any:
    """The ASGI app for one service instance (FastAPI wrapped in body-cap and metrics layers)."""
    from rendezvous import (
        control_channel,
        routes_agents,
        routes_approvals,
        routes_audit,
        routes_auth,
        routes_keys,
        routes_meta,
        routes_policy,
        routes_sessions,
    )

    app = FastAPI(
        title="TucDesk rendezvous",
        version="1",
        openapi_url=OPENAPI_PATH,
        docs_url=None,
        redoc_url=None,
    )
    app.state.context = ctx
    app.include_router(routes_meta.router)
    app.include_router(routes_auth.router, prefix=API_PREFIX)
    app.include_router(routes_keys.router, prefix=API_PREFIX)
    app.include_router(routes_agents.router, prefix=API_PREFIX)
    app.include_router(routes_audit.router, prefix=API_PREFIX)
    app.include_router(routes_sessions.router, prefix=API_PREFIX)
    app.include_router(routes_policy.router, prefix=API_PREFIX)
    app.include_router(routes_approvals.router, prefix=API_PREFIX)
    app.include_router(control_channel.router, prefix=API_PREFIX)
    _install_error_handlers(app, ctx)
    capped = BodyLimitMiddleware(app, ctx.config.max_body_bytes, ctx.metrics)
    return RequestMetricsMiddleware(capped, ctx.metrics)


def _install_error_handlers(app: FastAPI, ctx: ServiceContext) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> Response:
        headers: dict[str, str] | None = None
        if isinstance(error, Unauthorized):
            headers = {"WWW-Authenticate": "Bearer"}
        elif isinstance(error, TooManyRequests):
            headers = {"Retry-After": str(max(1, math.ceil(error.retry_after)))}
        return JSONResponse(
            error_body(error.code, error.message), status_code=error.status, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> Response:
        ctx.metrics.rejected_inputs.labels("invalid").inc()
        return JSONResponse(
            error_body("invalid_request", _describe_validation(error)), status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        code = _HTTP_ERROR_CODES.get(error.status_code, "error")
        message = error.detail if isinstance(error.detail, str) else code
        return JSONResponse(
            error_body(code, message), status_code=error.status_code, headers=error.headers
        )

    @app.exception_handler(StoreError)
    async def store_error(request: Request, error: StoreError) -> Response:
        # Store errors a handler did not translate mean the database misbehaved; say nothing more.
        logger.error("store error on %s %s: %s", request.method, request.url.path, type(error))
        unavailable = ServiceUnavailable("the service's database is unavailable; retry later")
        return JSONResponse(error_body(unavailable.code, unavailable.message), status_code=503)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> Response:
        # Only the exception type is logged: messages may quote request data.
        logger.error(
            "unexpected %s on %s %s", type(error).__name__, request.method, request.url.path
        )
        return JSONResponse(
            error_body("internal_error", "the service failed; the request did not complete"),
            status_code=500,
        )


def _describe_validation(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        location = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        parts.append(f"{location or 'body'}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)[:MAX_VALIDATION_MESSAGE] or "request is invalid"
