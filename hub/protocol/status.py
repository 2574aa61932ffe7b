"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import grpc

from hub import errors

_CODES: dict[type[errors.HubError], grpc.StatusCode] = {
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ModelExecutionError: grpc.StatusCode.INTERNAL,
    errors.Unsupported: grpc.StatusCode.UNIMPLEMENTED,
    errors.BuildError: grpc.StatusCode.INTERNAL,
    errors.SpecError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.PluginError: grpc.StatusCode.INTERNAL,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-safe message for an exception.

    A HubError's message is written for clients. Anything else is a bug or a plugin crash:
    its details belong in the log (the caller logs them), not on the wire.
    """
    for cls in type(exc).__mro__:
        code = _CODES.get(cls)
        if code is not None:
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"
