"""The body cap: any split of a body into chunks is accepted iff its total size fits the cap."""

from __future__ import annotations

from typing import Any

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from rendezvous.body_limit import BodyLimitMiddleware
from rendezvous.metrics import ServiceMetrics

CAP = 64


async def _drive(chunks: list[bytes], declared: int | None) -> tuple[int, bytes | None]:
    """Run the middleware over ``chunks``; return (status, body the inner app saw)."""
    seen: list[bytes] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        seen.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    messages = [
        {"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1}
        for index, chunk in enumerate(chunks)
    ] or [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    middleware = BodyLimitMiddleware(inner, CAP, ServiceMetrics())
    await middleware({"type": "http", "headers": headers}, receive, send)
    return sent[0]["status"], (seen[0] if seen else None)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6), st.booleans())
def test_body_is_passed_whole_iff_it_fits_the_cap(chunks: list[bytes], declare: bool) -> None:
    total = b"".join(chunks)
    status, seen = trio.run(_drive, chunks, len(total) if declare else None)
    if len(total) <= CAP:
        assert status == 200
        assert seen == total
    else:
        assert status == 413
        assert seen is None


def test_declared_length_over_the_cap_is_refused_before_reading() -> None:
    status, seen = trio.run(_drive, [], CAP + 1)
    assert (status, seen) == (413, None)


def test_malformed_declared_length_is_refused() -> None:
    async def run() -> int:
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def never(scope: Any, receive: Any, send: Any) -> None:
            raise AssertionError("the app must not run")

        middleware = BodyLimitMiddleware(never, CAP, ServiceMetrics())
        scope = {"type": "http", "headers": [(b"content-length", b"-5")]}
        await middleware(scope, None, send)  # type: ignore[arg-type]
        return int(sent[0]["status"])

    assert trio.run(run) == 400
