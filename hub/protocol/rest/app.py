"""The REST routes (aiohttp): HTTP in, data-plane calls, JSON or binary bodies out. Nothing else.

Statuses come from hub.protocol.rest.status, Triton's views of a model from
hub.protocol.triton (sent as JSON by `as_json`), tensors from hub.protocol.rest.codec.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import HttpVersion11, hdrs, web

from hub.core.dataplane import DataPlane
from hub.errors import BodyTimeout, Cancelled, HubError, InvalidInput, TooLarge
from hub.limits import DEFAULT_LIMITS, Limits
from hub.logs import Throttle
from hub.protocol import triton
from hub.protocol.rest.auth import UNROUTED, token_middleware
from hub.protocol.rest.codec import (
    HEADER_LENGTH,
    decode_request,
    encode_response,
    encoding_is_heavy,
    json_too_large,
    load_json,
    parameters_of,
    parse_request,
)
from hub.protocol.rest.encoding import compressed, read_body
from hub.protocol.rest.status import error_body, status_for
from hub.security import Tokens
from hub.shm import CUDA, SYSTEM, Holds

log = logging.getLogger("modelhub.rest")

#: Triton's default cap on an HTTP request body.
DEFAULT_MAX_BODY = 64 << 20

#: The largest body of a request that carries no tensors (repository, log, trace and shared
#: memory requests). The largest such body a client has reason to send is a trace or log
#: settings update of a few hundred bytes (a load request's `config` and `file:` parameters,
#: which can be large, are refused: hub.core.dataplane), and parsing JSON costs up to ~60
#: times its size in Python objects, so 64 KiB leaves room to spare and bounds that cost.
CONTROL_BODY = 64 << 10

#: What REST adds to the data plane's extensions.
REST_EXTENSIONS = ("binary_tensor_data",)

MAX_BODY = web.AppKey("max_body", int)
LIMITS = web.AppKey("limits", Limits)
#: One line per request its client cut short (disconnected, or sent too slowly), at most 5 per 10 s.
CUT_SHORT_LOG = web.AppKey("gone_log", Throttle)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(payload: Any, status: int = 200) -> web.Response:
    # content_type without a charset: the KServe SDK parses error bodies only when the
    # header reads exactly "application/json".
    return web.Response(
        body=json.dumps(payload, separators=(",", ":")).encode(),
        status=status,
        headers={"Content-Type": "application/json"},
    )


def error_response(exc: BaseException) -> web.Response:
    status, message = status_for(exc)
    return web.Response(body=error_body(message), status=status, headers={"Content-Type": "application/json"})


def body_too_large(limit: int) -> str:
    return f"request body is larger than the server's limit of {limit} bytes (--max-request-bytes)"


def _guarded(handler: Handler) -> Handler:
    """Domain errors become their HTTP status; anything else is logged and answered 500. A
    client that disconnected mid-body, or sent its body too slowly, is not the server's error:
    one line at info, without a traceback, throttled (a client can make as many as it likes; a
    gRPC call cancelled by its client is not logged at all), and the connection is closed."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except (Cancelled, BodyTimeout) as exc:  # read_body: the client disconnected, or sends too slowly
            request.app[CUT_SHORT_LOG](
                log, logging.INFO, "%s %s from %s: %s", request.method, request.path[:128], request.remote, exc
            )
            response = error_response(exc)
            response.force_close()  # what is left of the body is not worth waiting for
            return response
        except HubError as exc:
            return error_response(exc)
        except web.HTTPRequestEntityTooLarge:  # chunked, past client_max_size
            return error_response(TooLarge(body_too_large(request.app[MAX_BODY])))
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.path)
            return error_response(exc)

    guarded.__name__ = handler.__name__
    return guarded


async def _expect(request: web.Request) -> web.Response | None:
    """An `Expect` header: `100-continue` gets its interim answer, as aiohttp gives it; any
    other expectation our JSON 417 (aiohttp raised its plain-text "Unknown Expect", outside
    the middlewares, so a client that parses every error as JSON could not read it)."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version != HttpVersion11:
        return None
    if expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not started
        return None
    return web.Response(
        body=error_body(f"unknown expectation in the Expect header: {expect[:128]!r}; only 100-continue is known"),
        status=417,
        headers={"Content-Type": "application/json"},
    )


class RestFrontend:
    """The KServe V2 REST API over one DataPlane. `max_body` caps a request body in bytes;
    `tokens` are the bearer tokens required (hub.security), none by default."""

    def __init__(
        self,
        plane: DataPlane,
        *,
        max_body: int = DEFAULT_MAX_BODY,
        limits: Limits = DEFAULT_LIMITS,
        tokens: Tokens | None = None,
    ) -> None:
        self.plane = plane
        self.max_body = max_body
        self.limits = limits
        self.tokens = tokens or Tokens()

    def app(self) -> web.Application:
        middlewares = [self._unrouted, *([token_middleware(self.tokens)] if self.tokens.required else [])]
        app = web.Application(client_max_size=self.max_body, middlewares=middlewares)
        app[MAX_BODY] = self.max_body
        app[LIMITS] = self.limits
        app[CUT_SHORT_LOG] = Throttle()
        routes: list[tuple[str, str, Handler]] = [
            ("GET", "/v2/health/live", self.live),
            ("GET", "/v2/health/ready", self.ready),
            ("GET", "/v2", self.server_metadata),
            ("GET", "/v2/models/stats", self.statistics),
            ("POST", "/v2/repository/index", self.index),
            ("POST", "/v2/repository/models/{model}/load", self.load),
            ("POST", "/v2/repository/models/{model}/unload", self.unload),
            ("GET", "/v2/logging", self.logging),
            ("POST", "/v2/logging", self.update_logging),
            ("GET", "/v2/trace/setting", self.trace),
            ("POST", "/v2/trace/setting", self.update_trace),
            ("GET", "/v2/models/{model}/trace/setting", self.trace),
            ("POST", "/v2/models/{model}/trace/setting", self.update_trace),
        ]
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            routes += [
                ("GET", prefix, self.model_metadata),
                ("GET", prefix + "/ready", self.model_ready),
                ("GET", prefix + "/config", self.model_config),
                ("GET", prefix + "/stats", self.statistics),
                ("POST", prefix + "/infer", self.infer),
            ]
        for area in ("systemsharedmemory", "cudasharedmemory"):
            # A region name may hold '/' (percent-encoded): {name:.+} takes the rest of the path.
            routes += [
                ("GET", f"/v2/{area}/status", self.shm_status),
                ("GET", f"/v2/{area}/region/{{name:.+}}/status", self.shm_status),
                ("POST", f"/v2/{area}/region/{{name:.+}}/register", self.shm_register),
                ("POST", f"/v2/{area}/unregister", self.shm_unregister),
                ("POST", f"/v2/{area}/region/{{name:.+}}/unregister", self.shm_unregister),
            ]
        for method, path, handler in routes:
            if method == "GET":  # and HEAD, as HTTP expects of a resource that answers GET (a probe may send it)
                app.router.add_get(path, _guarded(handler), expect_handler=_expect)
            else:
                app.router.add_route(method, path, _guarded(handler), expect_handler=_expect)
        app.router.add_route("*", "/{tail:.*}", self.not_found, expect_handler=_expect, name=UNROUTED)
        return app

    # --- health and metadata ----------------------------------------------------------------

    async def live(self, request: web.Request) -> web.Response:
        live = self.plane.live()  # a status that is not 200 says false (a liveness probe restarts)
        return json_response({"live": live}, 200 if live else 503)

    async def ready(self, request: web.Request) -> web.Response:
        ready = self.plane.ready()
        return json_response({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        name, version, extensions = self.plane.server_metadata()
        return json_response({"name": name, "version": version, "extensions": [*extensions, *REST_EXTENSIONS]})

    def _model(self, request: web.Request) -> Any:
        info = request.match_info
        return self.plane.model(info["model"], info.get("version", ""))

    async def model_metadata(self, request: web.Request) -> web.Response:
        return json_response(triton.as_json(triton.model_metadata(self.plane, self._model(request))))

    async def model_ready(self, request: web.Request) -> web.Response:
        model = self._model(request)  # 404 for an unknown name or version
        info = request.match_info
        ready = self.plane.model_ready(info["model"], info.get("version", ""))
        return json_response({"name": model.name, "ready": ready}, 200 if ready else 503)

    async def model_config(self, request: web.Request) -> web.Response:
        return json_response(triton.as_json(triton.model_config(self.plane, self._model(request))))

    async def statistics(self, request: web.Request) -> web.Response:
        info = request.match_info
        models = await self.plane.statistics(info.get("model", ""), info.get("version", ""))
        return json_response({"model_stats": [triton.as_json(triton.model_statistics(m)) for m in models]})

    # --- repository -------------------------------------------------------------------------

    async def index(self, request: web.Request) -> web.Response:
        body = await _json_body(request)
        ready = body.get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInput("'ready' must be true or false")
        return json_response([triton.as_json(triton.index_entry(m)) for m in self.plane.index(ready)])

    async def load(self, request: web.Request) -> web.Response:
        parameters = parameters_of(await _json_body(request), "load request")
        await self.plane.load(request.match_info["model"], parameters)
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        await _json_body(request)  # `unload_dependents` has no meaning here: models have none
        await self.plane.unload(request.match_info["model"])
        return web.Response(status=200)

    # --- log settings -----------------------------------------------------------------------

    async def logging(self, request: web.Request) -> web.Response:
        return json_response(self.plane.log_settings())

    async def update_logging(self, request: web.Request) -> web.Response:
        return json_response(await self.plane.update_log_settings(await _json_body(request)))

    # --- trace settings ---------------------------------------------------------------------

    async def trace(self, request: web.Request) -> web.Response:
        return json_response(_trace_json(await self.plane.trace_settings(request.match_info.get("model", ""))))

    async def update_trace(self, request: web.Request) -> web.Response:
        changes = await _json_body(request)
        settings = await self.plane.update_trace_settings(request.match_info.get("model", ""), changes)
        return json_response(_trace_json(settings))

    # --- shared memory ----------------------------------------------------------------------

    async def shm_status(self, request: web.Request) -> web.Response:
        kind = _shm_kind(request)
        return json_response(self.plane.shared_memory_status(kind, request.match_info.get("name", "")))

    async def shm_register(self, request: web.Request) -> web.Response:
        kind = _shm_kind(request)
        self.plane.require_shared_memory(kind)
        body = await _json_body(request)
        name = request.match_info["name"]
        if kind == SYSTEM:
            key = body.get("key")
            if not isinstance(key, str):
                raise InvalidInput("'key' must be a string: the key of the shared memory object")
            arguments: dict[str, Any] = {"key": key, "offset": _count(body, "offset", 0)}
        else:
            raw = body.get("raw_handle")
            encoded = raw.get("b64") if isinstance(raw, dict) else None
            if not isinstance(encoded, str):
                raise InvalidInput("'raw_handle' must be {\"b64\": the base64 of the cudaIpcMemHandle_t}")
            try:
                handle = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInput("'raw_handle.b64' is not valid base64") from None
            arguments = {"raw_handle": handle, "device_id": _count(body, "device_id", 0)}
        arguments["byte_size"] = _count(body, "byte_size", None)
        await self.plane.register_shared_memory(kind, name, arguments)
        return web.Response(status=200)

    async def shm_unregister(self, request: web.Request) -> web.Response:
        kind = _shm_kind(request)
        await self.plane.unregister_shared_memory(kind, request.match_info.get("name", ""))
        return web.Response(status=200)

    # --- inference --------------------------------------------------------------------------

    async def infer(self, request: web.Request) -> web.Response:
        json_length = request.headers.get(HEADER_LENGTH)
        pace = _pace(self.limits)
        if json_length is None and self.limits.json_bytes < self.max_body:  # all of it is JSON
            raw = await read_body(request, self.limits.json_bytes, json_too_large(self.limits.json_bytes), **pace)
        else:
            raw = await read_body(request, self.max_body, body_too_large(self.max_body), **pace)
        parsed = parse_request(raw, json_length, self.limits)
        info = request.match_info
        unsent = self.plane.unsent
        given: list[Callable[[], None]] = []  # what gives a large answer back to the count of unread ones

        def hold(size: int) -> None:  # (a connection carries one request at a time: no bound of its own)
            given.append(unsent.take(size, None))

        try:
            with Holds(self.plane.shared_memory) as holds:  # the regions it names stay mapped until it is answered
                body, header_length = await self.plane.infer(
                    info["model"],
                    info.get("version", ""),
                    parsed.id,
                    lambda spec: decode_request(parsed, spec, self.limits, holds),
                    lambda response: encode_response(parsed, response),
                    timeout=parsed.timeout,
                    heavy=lambda response: encoding_is_heavy(parsed, response),
                    hold=hold,
                )
            if header_length is None:
                headers = {"Content-Type": "application/json"}
            else:
                headers = {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(header_length)}
            response = await compressed(request, web.Response(body=body, headers=headers))
            if given:  # written here, so that it is counted until the client has taken it (or gone)
                try:
                    await response.prepare(request)
                    await response.write_eof()
                except ConnectionError:
                    # The client went away: aiohttp's own writing of the response says the same and
                    # stops there. Raised on from here it was "Error handling request" with a
                    # traceback whose frames kept their answers (4 MiB each) until a full collection.
                    pass
            return response
        finally:
            for give_back in given:
                give_back()

    # --- everything else --------------------------------------------------------------------

    @web.middleware
    async def _unrouted(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """A request target that is no path (`CONNECT host:443`, `OPTIONS *`), which even the
        catch-all route below does not match: aiohttp's router answered it a plain-text
        `404: Not Found`; it is our JSON 404, as for any other unknown endpoint."""
        if request.match_info.http_exception is None:
            return await handler(request)
        return web.Response(
            body=error_body(f"no such endpoint: {request.method[:16]} {request.raw_path[:128]}"),
            status=404,
            headers={"Content-Type": "application/json"},
        )

    async def not_found(self, request: web.Request) -> web.Response:
        # A path that another method answers is a 405 with an Allow header, as Triton answers
        # (`{"error": "Method Not Allowed"}`), not a 404 that says the endpoint does not exist.
        allowed: set[str] = set()
        for resource in request.app.router.resources():
            match, methods = await resource.resolve(request)
            if match is None:  # (the one resource that matches is this catch-all)
                allowed |= methods
        if allowed:
            return web.Response(
                body=error_body(f"method {request.method[:16]} is not allowed for {request.path[:128]}"),
                status=405,
                headers={"Content-Type": "application/json", "Allow": ", ".join(sorted(allowed))},
            )
        return web.Response(
            body=error_body(f"no such endpoint: {request.method} {request.path[:128]}"),
            status=404,
            headers={"Content-Type": "application/json"},
        )


def _trace_json(settings: dict[str, list[str]]) -> dict[str, Any]:
    """Triton's JSON form of the trace settings: trace_level a list, the others one string."""
    return {
        name: values if name == "trace_level" else (values[0] if values else "") for name, values in settings.items()
    }


def _shm_kind(request: web.Request) -> str:
    return SYSTEM if request.path.startswith("/v2/systemsharedmemory") else CUDA


def _count(body: dict[str, Any], key: str, default: int | None) -> int:
    """A non-negative integer field of a JSON body (required when `default` is None)."""
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidInput(f"'{key}' must be a non-negative integer")
    return value


def _pace(limits: Limits) -> dict[str, Any]:
    """read_body's pace: how long a body may take (hub.limits.Limits.body_timeout, body_rate)."""
    return {"grace": limits.body_timeout, "rate": limits.body_rate}


async def _json_body(request: web.Request) -> dict[str, Any]:
    """An optional JSON object body (an empty body reads as {}) of at most CONTROL_BODY bytes."""
    limit = min(CONTROL_BODY, request.app[MAX_BODY])
    raw = await read_body(
        request,
        limit,
        f"request body is larger than the server's limit of {limit} bytes for a request without tensors",
        **_pace(request.app[LIMITS]),
    )
    if not raw.strip():
        return {}
    body = load_json(raw)
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    return body
