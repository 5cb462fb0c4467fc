"""The rendezvous ASGI application: FastAPI routes under /v1, JSON errors, body caps, metrics.

``create_app(ctx)`` builds one application around one ServiceContext; it holds no global state,
so tests can run several side by side.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from rendezvous.agent_list_endpoint import AgentListEndpoint
from rendezvous.body_limit import BodyLimitMiddleware
from rendezvous.context import ServiceContext
from rendezvous.error_responses import (
    error_body,
    service_error_response,
    store_error_response,
    store_failure_reason,
    unexpected_error_response,
)
from rendezvous.errors import ServiceError
from rendezvous.metrics import RequestMetricsMiddleware
from rendezvous.store import StoreError

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


def create_app(ctx: ServiceContext) -> Any:
    """The ASGI app for one service instance: FastAPI behind the agent list endpoint, wrapped in
    body-cap and metrics layers."""
    from rendezvous import (
        control_channel,
        routes_agents,
        routes_approvals,
        routes_audit,
        routes_auth,
        routes_keys,
        routes_meta,
        routes_operators,
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
    app.include_router(routes_operators.router, prefix=API_PREFIX)
    app.include_router(routes_keys.router, prefix=API_PREFIX)
    app.include_router(routes_agents.router, prefix=API_PREFIX)
    app.include_router(routes_audit.router, prefix=API_PREFIX)
    app.include_router(routes_sessions.router, prefix=API_PREFIX)
    app.include_router(routes_policy.router, prefix=API_PREFIX)
    app.include_router(routes_approvals.router, prefix=API_PREFIX)
    app.include_router(control_channel.router, prefix=API_PREFIX)
    _install_error_handlers(app, ctx)
    listed = AgentListEndpoint(
        app, ctx, API_PREFIX + routes_agents.AGENT_LIST_PATH, routes_agents.agent_list_route()
    )
    capped = BodyLimitMiddleware(listed, ctx.config.max_body_bytes, ctx.metrics)
    return RequestMetricsMiddleware(capped, ctx.metrics)


def _install_error_handlers(app: FastAPI, ctx: ServiceContext) -> None:
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> Response:
        return service_error_response(error)

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
        # Kept for /healthz, which then probes at once instead of trusting its last write.
        ctx.store_health.failed(store_failure_reason(error), ctx.now())
        return store_error_response(_method(request), request.url.path, error)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> Response:
        return unexpected_error_response(_method(request), request.url.path, error)


def _method(connection: Request) -> str:
    # These handlers also see WebSocket connections (the agent control channel), which have no
    # HTTP method.
    return getattr(connection, "method", "WEBSOCKET")


def _describe_validation(error: RequestValidationError) -> str:
    parts = []
    for item in error.errors()[:5]:
        location = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
        parts.append(f"{location or 'body'}: {item.get('msg', 'invalid')}")
    return "; ".join(parts)[:MAX_VALIDATION_MESSAGE] or "request is invalid"
