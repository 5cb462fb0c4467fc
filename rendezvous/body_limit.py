"""ASGI middleware capping request bodies: refuses oversized ones with 413 before reading them all.

Declared lengths over the cap are refused without reading a byte; chunked bodies are read up
to the cap and refused the moment they pass it. Accepted bodies are replayed to the app.
"""

from __future__ import annotations

import json

from rendezvous.metrics import ASGIApp, Message, Receive, Scope, Send, ServiceMetrics


class BodyLimitMiddleware:
    """Refuse HTTP request bodies larger than ``max_body_bytes`` with a JSON 413."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: ServiceMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Buffer at most the cap; pass the request on, or answer 413 / 400."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared == -1:
            await self._refuse(send, 400, "bad_request", "Content-Length is malformed", "malformed")
            return
        if declared is not None and declared > self.max_body_bytes:
            await self._refuse_too_large(send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._refuse_too_large(send)
                return
            chunks.append(chunk)
            more = bool(message.get("more_body", False))
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse_too_large(self, send: Send) -> None:
        await self._refuse(
            send,
            413,
            "payload_too_large",
            f"request body is larger than {self.max_body_bytes} bytes",
            "oversized",
        )

    async def _refuse(self, send: Send, status: int, code: str, text: str, reason: str) -> None:
        self.metrics.rejected_inputs.labels(reason).inc()
        body = json.dumps({"error": code, "message": text}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _declared_length(scope: Scope) -> int | None:
    """The Content-Length header as an int, None if absent, -1 if malformed."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"content-length":
            text = value.decode("latin-1").strip()
            if not text.isdigit() or len(text) > 18:
                return -1
            return int(text)
    return None
