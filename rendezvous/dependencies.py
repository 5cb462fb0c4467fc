"""FastAPI dependencies: the instance's ServiceContext and the authenticated caller."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request

from protocol.request_proof import PROOF_HEADER
from rendezvous.auth import Principal, RequestFacts, authenticate, authenticate_reading_agents
from rendezvous.context import ServiceContext
from rendezvous.errors import TooManyRequests
from rendezvous.store import AgentListing, AgentQuery


async def service_context(request: Request) -> ServiceContext:
    """The ServiceContext of the app serving this request (async: no threadpool hop)."""
    context: ServiceContext = request.app.state.context
    return context


def request_target(request: Request) -> str:
    """The path and query of the request exactly as sent (what request proofs sign)."""
    raw_path: bytes = request.scope.get("raw_path") or request.scope["path"].encode("utf-8")
    query: bytes = request.scope.get("query_string", b"")
    target = raw_path + (b"?" + query if query else b"")
    return target.decode("latin-1")


async def request_facts(request: Request) -> RequestFacts:
    """What authentication looks at in this request."""
    return RequestFacts(
        method=request.method,
        target=request_target(request),
        body=await request.body(),
        authorization=request.headers.get("authorization"),
        proof=request.headers.get(PROOF_HEADER),
    )


async def current_principal(
    request: Request, ctx: Annotated[ServiceContext, Depends(service_context)]
) -> Principal:
    """Authenticate the request (token or API key, plus proof on state-changing methods)."""
    return await authenticate(ctx, await request_facts(request))


async def current_principal_reading_agents(
    request: Request, ctx: Annotated[ServiceContext, Depends(service_context)]
) -> tuple[Principal, AgentQuery, AgentListing | None]:
    """``current_principal``, the agent list's query, and its page when read with the
    credential."""
    query_string: bytes = request.scope.get("query_string", b"")
    return await authenticate_reading_agents(ctx, await request_facts(request), query_string)


async def limit_unauthenticated(
    request: Request, ctx: Annotated[ServiceContext, Depends(service_context)]
) -> None:
    """Refuse (429) an unauthenticated request over its address's rate, before any store work.

    Behind a reverse proxy every client shares the proxy's address: raise the limits there.
    """
    address = request.client.host if request.client is not None else "unknown"
    limiter = ctx.unauthenticated_requests
    if not limiter.allow(address, time.monotonic()):
        ctx.metrics.auth_failures.labels("rate_limited").inc()
        raise TooManyRequests(
            f"too many unauthenticated requests from {address}; retry later",
            retry_after=1.0 / limiter.rate,
        )


Context = Annotated[ServiceContext, Depends(service_context)]
RateLimited = Depends(limit_unauthenticated)
Caller = Annotated[Principal, Depends(current_principal)]
CallerReadingAgents = Annotated[
    tuple[Principal, AgentQuery, AgentListing | None], Depends(current_principal_reading_agents)
]
