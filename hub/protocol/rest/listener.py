"""An aiohttp application listening on one port of the running event loop (the loop that
also runs grpc.aio): bind, report the port (0 picks a free one), stop with a grace period."""

from __future__ import annotations

import logging
import socket
import ssl
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from hub.limits import DEFAULT_LIMITS
from hub.logs import Throttle
from hub.protocol.rest.status import error_body

log = logging.getLogger("modelhub.rest")


async def _no_server_header(request: web.Request, response: web.StreamResponse) -> None:
    """aiohttp names itself and Python, with their versions, in a Server header on every
    response: what a scanner looks for first. Triton's HTTP server sends none; nor do we."""
    response.headers.popall("Server", None)


def _malformed_answered(throttle: Throttle) -> type[web.Server]:
    """An aiohttp Server whose connections answer a request aiohttp cannot parse (a bad header
    token, a header line over 8190 bytes, TLS on the plain port) as every other error of ours:
    `{"error": ...}` as JSON, its cause without the bytes that caused it, and one throttled
    INFO line. aiohttp answered it in plain text echoing up to 100 bytes of the offending
    header, and logged an ERROR with a traceback for each: a client could flood the log with
    them at will. A fault of ours (an exception out of a handler) is still aiohttp's to answer
    and log, with its traceback. aiohttp has no setting for this: the connection handler's
    `handle_error` is overridden on the handlers this server makes (tests/test_rest.py holds
    it to aiohttp's behaviour)."""

    class Connection(web.RequestHandler):
        __slots__ = ()

        def handle_error(
            self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
        ) -> web.StreamResponse:
            if not isinstance(exc, HttpProcessingError):
                return super().handle_error(request, status, exc, message)
            cause = str(exc.message).split("\n", 1)[0].split(": b'", 1)[0].strip().rstrip(":")[:160]
            throttle(log, logging.INFO, "malformed HTTP request from %s: %s (%d)", request.remote, cause, status)
            if request.writer.output_size > 0:  # as aiohttp: an answer has begun, the connection is broken
                raise ConnectionError("a response was sent already; cannot send the error")
            response = web.Response(
                status=status, body=error_body(f"malformed HTTP request: {cause}"), content_type="application/json"
            )
            response.force_close()
            return response

    class Server(web.Server):
        def __call__(self) -> web.RequestHandler:
            connection = super().__call__()
            connection.__class__ = Connection  # (the same slots: only handle_error differs)
            return connection

    return Server


class HttpListener:
    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(
        self,
        host: str,
        port: int,
        *,
        shutdown_timeout: float = 10.0,
        header_timeout: float = DEFAULT_LIMITS.header_timeout,
        reuse_port: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        purpose: str = "HTTP",
    ) -> int:
        """Listen on host:port and return the bound port. We bind the socket ourselves so the
        port a 0 picked is known without reaching into the server's internals. With
        `ssl_context` it speaks HTTPS only. A port that cannot be bound raises OSError naming
        `purpose` and the address (the bare errno names neither).

        A connection that has not sent a whole request line and headers `header_timeout`
        seconds after its accept, or after the previous response on a kept-alive connection,
        is closed (hub.limits.Limits.header_timeout). That is aiohttp's keep-alive timer, public
        API: aiohttp 3.14.5 (pyproject's floor) starts it at the accept as well as after each
        response, and the bytes of a request that has not arrived whole do not put it back
        (tests/test_rest.py holds it to both; older aiohttp started it after a response only).
        It is checked only while no request is being handled, so it never cuts one short. (With
        TLS the timer starts after the handshake, which asyncio gives 60 s of its own.)"""
        family, kind, proto, _, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:  # several frontend processes on one port (hub/workers)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"{purpose} cannot listen on {host}:{port}: {exc.strerror}") from None
        self._app.on_response_prepare.append(_no_server_header)
        # auto_decompress off: a compressed body is inflated by the handler that reads it, with a
        # limit and a 400 of ours (hub/protocol/rest/encoding.py), not by aiohttp's parser.
        self._runner = web.AppRunner(
            self._app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=shutdown_timeout,
            auto_decompress=False,
            keepalive_timeout=header_timeout,
        )
        await self._runner.setup()
        assert self._runner.server is not None
        self._runner.server.__class__ = _malformed_answered(Throttle())
        await web.SockSite(self._runner, sock, backlog=1024, ssl_context=ssl_context).start()
        self.port = sock.getsockname()[1]
        return self.port

    async def stop(self, timeout: float | None = None) -> None:
        """Stop listening; in-flight requests get the runner's shutdown_timeout to finish, or
        `timeout` seconds: what is left of the server's shutdown grace."""
        if self._runner is not None:
            if timeout is not None:
                # aiohttp reads it in cleanup() only; AppRunner takes it nowhere else.
                self._runner._shutdown_timeout = timeout
            await self._runner.cleanup()
            self._runner = None
