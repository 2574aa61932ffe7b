"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import grpc

from hub.errors import client_message, code_of

#: Domain codes (hub.errors) are named after gRPC's, so the map is by name; the table keeps
#: it explicit and checked (tests/test_conformance.py runs every code through both frontends).
_CODES: dict[str, grpc.StatusCode] = {
    code.name: code
    for code in (
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ALREADY_EXISTS,
    )
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-safe message for an exception.

    A HubError's message is written for clients. Anything else is a bug or a plugin crash:
    its details belong in the log (the caller logs them), not on the wire.
    """
    return _CODES.get(code_of(exc), grpc.StatusCode.INTERNAL), client_message(exc)
