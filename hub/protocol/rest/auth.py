"""The REST side of the bearer tokens: an aiohttp middleware that reads `Authorization` and
refuses what hub.security refuses, with the status hub.protocol.rest.status gives. Health
(`/v2/health/*` and a model's `/ready`) stays open for probes."""

from __future__ import annotations

import re

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from hub.errors import Unauthenticated
from hub.protocol.rest.status import error_body, status_for
from hub.security import Access, Tokens

_OPEN = re.compile(r"/v2/health/(live|ready)|/v2/models/[^/]+(/versions/[^/]+)?/ready")
#: Model control, (un)registering shared memory (a region name may hold '/', so any path
#: under the shared-memory prefix that ends in register or unregister), the log and trace settings.
_CONTROL = re.compile(
    r"/v2/repository/models/[^/]+/(load|unload)|/v2/(system|cuda)sharedmemory(/.*)?/(un)?register|/v2/logging"
    r"|/v2(/models/[^/]+)?/trace/setting"
)


def access_of(path: str) -> Access:
    """What a request path (or a route's template, as `route_path` gives) is; anything
    unlisted needs the inference token."""
    if _OPEN.fullmatch(path):
        return Access.OPEN
    if _CONTROL.fullmatch(path):
        return Access.CONTROL
    return Access.INFERENCE


#: The name of the catch-all route, which only answers 404 or 405 (hub/protocol/rest/app.py).
UNROUTED = "unrouted"


def route_path(request: web.Request) -> str:
    """The template of the route that will answer `request` ("/v2/repository/models/{model}/load"),
    or its path where no route but the catch-all matched. The router matches the path with %2F
    still encoded, while `request.path` is decoded: `/v2/repository/models/a%2Fb/load` is routed
    to load (model 'a/b'), yet its decoded path has one segment too many for the patterns
    above, and read as an inference path it let a client without the model-control token
    reach load (and its re-import of the plugins). The template is what the router decided, so
    both agree. The catch-all keeps its path's access (a POST to a health path is its 405)."""
    route = request.match_info.route
    if route.resource is None or route.name == UNROUTED:
        return request.path
    return route.resource.canonical


def token_middleware(tokens: Tokens, *, access: Access | None = None) -> Middleware:
    """Refuse requests without the token their path requires (401). `access` fixes one kind
    for every path (the metrics port: INFERENCE)."""

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            tokens.check(access or access_of(route_path(request)), request.headers.get("Authorization"))
        except Unauthenticated as exc:
            status, message = status_for(exc)
            return web.Response(
                body=error_body(message),
                status=status,
                headers={"Content-Type": "application/json", "WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    return require_token
