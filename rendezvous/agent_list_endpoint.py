"""``GET /v1/agents`` answered in front of FastAPI: the busiest request of a running service.

Issue 4 asks for >= 1,000 list requests/s from one process. FastAPI's middleware layers, its
route matching through the included routers and its dependency solving cost about a third of
this request's CPU inside the app, more than the authentication and the query. This endpoint
runs the same authentication (``auth.authenticate_reading_agents``), the same handler
(``routes_agents.team_agent_list``) and the same error responses as the FastAPI route, which
stays for the OpenAPI document; every other request goes to FastAPI unchanged.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response
from pydantic import TypeAdapter

from rendezvous.auth import authenticate_reading_agents
from rendezvous.context import ServiceContext
from rendezvous.dependencies import request_facts
from rendezvous.error_responses import (
    service_error_response,
    store_error_response,
    store_failure_reason,
    unexpected_error_response,
)
from rendezvous.errors import ServiceError
from rendezvous.metrics import ASGIApp, Receive, Scope, Send
from rendezvous.routes_agents import team_agent_list
from rendezvous.schemas import AgentList
from rendezvous.store import StoreError

JSON_MEDIA_TYPE = "application/json"
# The serializer FastAPI uses for a route's response_model: straight to JSON bytes.
AGENT_LIST_JSON = TypeAdapter(AgentList)


class AgentListEndpoint:
    """ASGI layer answering ``GET path`` itself and passing everything else to ``app``."""

    def __init__(self, app: ASGIApp, ctx: ServiceContext, path: str, route: object) -> None:
        self.app = app
        self.ctx = ctx
        self.path = path
        # FastAPI's route object: set as scope["route"] so metrics label the request as before.
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer the agent list; hand any other request (or method, or path) to the app."""
        if (
            scope["type"] != "http"
            or scope["method"] != "GET"
            or scope["path"] != self.path
            or scope.get("root_path")
        ):
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        response = await self._agent_list(Request(scope, receive))
        await response(scope, receive, send)

    async def _agent_list(self, request: Request) -> Response:
        try:
            caller, query, listing = await authenticate_reading_agents(
                self.ctx, await request_facts(request), request.scope.get("query_string", b"")
            )
            agents = await team_agent_list(self.ctx, caller, query, listing)
        except ServiceError as error:
            return service_error_response(error)
        except StoreError as error:
            self.ctx.store_health.failed(store_failure_reason(error), self.ctx.now())
            return store_error_response(request.method, self.path, error)
        except Exception as error:  # noqa: BLE001 - answered as FastAPI's handler would
            return unexpected_error_response(request.method, self.path, error)
        body = AGENT_LIST_JSON.dump_json(agents, by_alias=True)
        return Response(body, media_type=JSON_MEDIA_TYPE)
