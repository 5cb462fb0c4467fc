"""The rendezvous service's error hierarchy: each error maps to one HTTP status and a stable code.

A response body is always ``{"error": CODE, "message": TEXT}``; the message is safe to show to the
caller (never a secret, never a traceback).
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base class for errors the service reports to its caller."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    """The request is malformed or fails validation."""

    status = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    """The caller did not prove who they are; ``reason`` labels the auth-failure metric."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str, reason: str = "invalid_credentials") -> None:
        super().__init__(message)
        self.reason = reason


class Forbidden(ServiceError):
    """The caller is known but may not do this."""

    status = 403
    code = "forbidden"


class NotFound(ServiceError):
    """The thing asked for does not exist in the caller's team."""

    status = 404
    code = "not_found"


class Conflict(ServiceError):
    """The request conflicts with the current state (already used, already exists)."""

    status = 409
    code = "conflict"


class PayloadTooLarge(ServiceError):
    """The request body is larger than the service accepts."""

    status = 413
    code = "payload_too_large"


class TooManyRequests(ServiceError):
    """The caller's address sent more unauthenticated requests than its rate allows."""

    status = 429
    code = "rate_limited"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServiceUnavailable(ServiceError):
    """A dependency (the store, the audit log) failed; the action did not happen."""

    status = 503
    code = "unavailable"


class ConfigError(Exception):
    """The service configuration is invalid; the message says which setting and why."""
