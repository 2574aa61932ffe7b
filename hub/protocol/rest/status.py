"""The one place where domain errors become HTTP statuses (the REST twin of
hub/protocol/status.py), and the `{"error": ...}` body every failure carries."""

from __future__ import annotations

import json

from hub.errors import BodyTimeout, TooLarge, client_message, code_of

#: Domain code (hub.errors) -> HTTP status. Anything unlisted is a bug or a crash: 500.
HTTP_STATUS: dict[str, int] = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,  # nginx's "client closed request"; the client has gone and reads nothing
    "INTERNAL": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def status_for(exc: BaseException) -> tuple[int, str]:
    """The HTTP status and client-safe message for an exception (no traceback, ever: for a
    non-HubError only its type, and the caller logs the rest)."""
    if isinstance(exc, TooLarge):  # its code (RESOURCE_EXHAUSTED) is also a full queue's, which is 429
        return 413, client_message(exc)
    if isinstance(exc, BodyTimeout):  # the client's slowness, not the model's deadline (504)
        return 408, client_message(exc)
    return HTTP_STATUS.get(code_of(exc), 500), client_message(exc)


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
