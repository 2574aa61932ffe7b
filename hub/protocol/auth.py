"""The gRPC side of the bearer tokens: a grpc.aio interceptor that reads `authorization` from
the call's metadata and refuses what hub.security refuses, with the status hub.protocol.status
gives. Health (grpc.health.v1 and ServerLive/ServerReady/ModelReady) stays open for probes."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from hub.errors import Unauthenticated
from hub.protocol.servicer import SERVICE
from hub.protocol.status import status_for
from hub.security import Access, Tokens

HEALTH_SERVICE = "grpc.health.v1.Health"

_OPEN_PREFIXES = (f"/{HEALTH_SERVICE}/",)
_OPEN = frozenset(f"/{SERVICE}/{name}" for name in ("ServerLive", "ServerReady", "ModelReady"))
#: Model control, registering shared memory (which lets a client point the server at memory),
#: and the log and trace settings.
_CONTROL = frozenset(
    f"/{SERVICE}/{name}"
    for name in (
        "RepositoryModelLoad",
        "RepositoryModelUnload",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
        "CudaSharedMemoryRegister",
        "CudaSharedMemoryUnregister",
        "LogSettings",
        "TraceSetting",
    )
)


def access_of(method: str) -> Access:
    """What a full gRPC method name ("/package.Service/Method") is; anything unlisted,
    reflection included, needs the inference token."""
    if method in _OPEN or method.startswith(_OPEN_PREFIXES):
        return Access.OPEN
    if method in _CONTROL:
        return Access.CONTROL
    return Access.INFERENCE


def _authorization(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _refused(tokens: Tokens, handler_call_details: grpc.HandlerCallDetails) -> tuple[grpc.StatusCode, str] | None:
    """The status that refuses this call, or None if its token is right (or it needs none)."""
    access = access_of(handler_call_details.method)
    if access is Access.OPEN:
        return None
    try:
        tokens.check(access, _authorization(handler_call_details.invocation_metadata))
    except Unauthenticated as exc:
        return status_for(exc)  # the exception is not kept past its block
    return None


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuse calls without the token their method requires (UNAUTHENTICATED)."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        status = _refused(self.tokens, handler_call_details)
        handler = await continuation(handler_call_details)
        return handler if status is None else _refusal(handler, status)


class ThreadedTokenInterceptor(grpc.ServerInterceptor):
    """The same refusals for grpcio's thread-pool server (hub.protocol.threaded)."""

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        status = _refused(self.tokens, handler_call_details)
        handler = continuation(handler_call_details)
        return handler if status is None else _refusal(handler, status, threaded=True)


_UNREAD = object()  # the request of a refused call, which is never parsed


def _refusal(handler: grpc.RpcMethodHandler | None, status: tuple[grpc.StatusCode, str], threaded: bool = False) -> Any:
    """A handler of the same shape as `handler` that ends the call with `status` (set, not
    raised, as hub.protocol.servicer's `_fail`) without reading the request; a plain function
    for the thread-pool server (`threaded`), which iterates what a streaming one returns."""
    if handler is None:  # no such method: grpc answers UNIMPLEMENTED itself
        return None

    async def refuse_async(request: Any, context: grpc.aio.ServicerContext) -> None:
        context.set_code(status[0])
        context.set_details(status[1])

    def refuse_threaded(request: Any, context: grpc.ServicerContext) -> Any:
        context.set_code(status[0])
        context.set_details(status[1])
        return None if handler.unary_unary or handler.stream_unary else iter(())

    refuse = refuse_threaded if threaded else refuse_async

    def nothing(response: Any) -> bytes:
        return b""

    def ignore(data: bytes) -> object:
        return _UNREAD  # not None: grpcio's thread-pool server fails a call whose request is None

    kind = (
        grpc.unary_unary_rpc_method_handler
        if handler.unary_unary
        else grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_unary_rpc_method_handler
        if handler.stream_unary
        else grpc.stream_stream_rpc_method_handler
    )
    return kind(refuse, request_deserializer=ignore, response_serializer=nothing)
