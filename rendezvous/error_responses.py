"""The JSON error responses of the service, shared by FastAPI's exception handlers and the
endpoints answered without FastAPI (``rendezvous.agent_list_endpoint``)."""

from __future__ import annotations

import logging
import math

from fastapi.responses import JSONResponse

from rendezvous.errors import ServiceError, ServiceUnavailable, TooManyRequests, Unauthorized

logger = logging.getLogger("tucdesk.rendezvous")
MAX_LOGGED_STORE_REASON = 500
# Substrings of the stores' messages (SQLite's, PostgreSQL's, asyncpg's) and the kind of failure
# each one means, first match wins.
STORE_FAILURE_KINDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("disk is full", "no space left", "diskfull", "disk full"), "the database's disk is full"),
    (("read-only", "readonly", "read only"), "the database is read-only"),
    (("i/o error", "ioerr"), "the database's disk failed (I/O error)"),
    (("connection", "connect call", "locked"), "the database is unreachable"),
)


def error_body(code: str, message: str) -> dict[str, str]:
    """The JSON body of every error response."""
    return {"error": code, "message": message}


def service_error_response(error: ServiceError) -> JSONResponse:
    """The response for a ServiceError: its status and code, plus the headers it implies."""
    headers: dict[str, str] | None = None
    if isinstance(error, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(error, TooManyRequests):
        headers = {"Retry-After": str(max(1, math.ceil(error.retry_after)))}
    return JSONResponse(
        error_body(error.code, error.message), status_code=error.status, headers=headers
    )


def store_failure_reason(error: Exception) -> str:
    """The store's reason for a failure, for the log (the stores' messages name no secrets)."""
    return str(error)[:MAX_LOGGED_STORE_REASON] or type(error).__name__


def store_failure_kind(reason: str) -> str:
    """What an unauthenticated caller (``/healthz``) is told of a store failure: its kind, not
    the database's own words (they may name hosts, files or tables)."""
    lowered = reason.lower()
    for markers, kind in STORE_FAILURE_KINDS:
        if any(marker in lowered for marker in markers):
            return kind
    return "the database failed"


def store_error_response(method: str, path: str, error: Exception) -> JSONResponse:
    """503 for a store error no handler translated: the database misbehaved; the client is
    told nothing more, the log gets the store's reason (it names no secrets)."""
    reason = store_failure_reason(error)
    logger.error("store error on %s %s: %s", method, path, reason)
    unavailable = ServiceUnavailable("the service's database is unavailable; retry later")
    return JSONResponse(error_body(unavailable.code, unavailable.message), status_code=503)


def store_unhealthy_response(path: str, error: Exception) -> JSONResponse:
    """503 for ``/healthz`` when the store failed it: the body names the kind of failure, the
    log the store's own reason."""
    reason = store_failure_reason(error)
    logger.error("store error on GET %s: %s", path, reason)
    message = f"the service's database refuses reads or writes: {store_failure_kind(reason)}"
    return JSONResponse(error_body(ServiceUnavailable.code, message), status_code=503)


def unexpected_error_response(method: str, path: str, error: Exception) -> JSONResponse:
    """500 for any other failure; only the exception type is logged (messages may quote
    request data)."""
    logger.error("unexpected %s on %s %s", type(error).__name__, method, path)
    return JSONResponse(
        error_body("internal_error", "the service failed; the request did not complete"),
        status_code=500,
    )
