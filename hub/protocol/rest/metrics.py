"""The metrics port: `GET /metrics` serves the server's own registry; every other path is a
404 (another method on /metrics a 405), so an HTTP probe aimed at this port by mistake fails
instead of passing. With `tokens` (--metrics-auth) every path needs the inference token."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from hub.protocol.rest.auth import token_middleware
from hub.security import Access, Tokens


def metrics_app(
    registry: CollectorRegistry,
    tokens: Tokens | None = None,
    refresh: Callable[[], Awaitable[None]] | None = None,
) -> web.Application:
    """`refresh`: awaited before each scrape is rendered (the model process of --workers N asks
    the frontends for their gauges then)."""

    async def metrics(request: web.Request) -> web.Response:
        if refresh is not None:
            await refresh()
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def not_found(request: web.Request) -> web.Response:
        if request.path == "/metrics":  # another method than GET or HEAD: 405, as Triton's metrics port answers
            return web.Response(
                status=405,
                text=f"method {request.method[:16]} is not allowed for /metrics\n",
                headers={"Allow": "GET, HEAD"},
            )
        return web.Response(status=404, text=f"no such endpoint: {request.path[:128]}; metrics are at /metrics\n")

    guarded = [token_middleware(tokens, access=Access.INFERENCE)] if tokens is not None and tokens.required else []
    app = web.Application(middlewares=guarded)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
