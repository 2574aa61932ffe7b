"""Domain errors. Each class carries a protocol-neutral `code` (the KServe V2 vocabulary,
which Triton's gRPC statuses and our metrics' `code` label share); each frontend maps codes
to its own statuses in one place (hub/protocol/status.py for gRPC, hub/protocol/rest/status.py
for HTTP). Nothing here knows about gRPC or HTTP."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable

#: The code of a successful request, and of anything that is not a HubError (a bug or a
#: plugin crash, whose details go to the log only).
OK = "OK"
INTERNAL = "INTERNAL"
CANCELLED = "CANCELLED"


class HubError(Exception):
    """Base class: the message is safe to send to a client (no traceback, no internals)."""

    code = INTERNAL


class ModelNotFound(HubError):
    """No such model, or no such version of it."""

    code = "NOT_FOUND"


class ModelUnavailable(HubError):
    """The model exists but is loading, unloading or failed."""

    code = "UNAVAILABLE"


class ShuttingDown(HubError):
    """The server is draining (SIGTERM): it answers what it accepted and takes nothing new."""

    code = "UNAVAILABLE"

    def __init__(self, message: str = "the server is shutting down and takes no new requests") -> None:
        super().__init__(message)


class InvalidInput(HubError):
    """The request does not match the model's contract; the message names the field."""

    code = "INVALID_ARGUMENT"


class QueueFull(HubError):
    """The model's queue is at `max_queue_size`."""

    code = "RESOURCE_EXHAUSTED"


class TooLarge(HubError):
    """A request, or a part of it, is larger than a size limit of the server (the message names
    the limit and the setting that changes it). RESOURCE_EXHAUSTED, as gRPC calls a message
    over its receive limit; REST answers 413."""

    code = "RESOURCE_EXHAUSTED"


class LimitReached(HubError):
    """A limit of the server is reached (the number of shared memory regions, say, or the
    bytes of answers a stream's client has not read)."""

    code = "RESOURCE_EXHAUSTED"


class AlreadyExists(HubError):
    """Something by this name exists already (a registered shared memory region)."""

    code = "ALREADY_EXISTS"


class RegionNotFound(HubError):
    """No shared memory region by this name is registered (a status request)."""

    code = "NOT_FOUND"


class DeadlineExceeded(HubError):
    """The request's deadline passed before it was computed."""

    code = "DEADLINE_EXCEEDED"


class Cancelled(HubError):
    """The client went away before it was answered (a REST client that disconnected); what is
    sent back, if anything, is never read."""

    code = CANCELLED


class BodyTimeout(HubError):
    """A request body did not arrive in time: slower than the server's floor rate
    (hub.limits.Limits.body_timeout, body_rate). REST answers 408 and closes the connection."""

    code = "DEADLINE_EXCEEDED"


class ModelExecutionError(HubError):
    """Plugin or runtime code raised while serving a request; the message names the model."""

    code = "INTERNAL"


class Unsupported(HubError):
    """The server does not implement this operation."""

    code = "UNIMPLEMENTED"


class PluginError(HubError):
    """A plugin could not be imported, or registered something invalid."""

    code = "INTERNAL"


class SpecError(HubError):
    """A ModelSpec (or a deployment override of it) is invalid."""

    code = "INVALID_ARGUMENT"


class BuildError(HubError):
    """Building or validating an artifact failed."""

    code = "INTERNAL"


class TargetUnavailable(BuildError):
    """The target cannot build on this machine: it needs a CUDA device, or a package (an
    extra) that is not installed. `modelhub build --compare` lists such targets as skipped,
    with this message as the reason; elsewhere it is a BuildError like any other."""


class Unauthenticated(HubError):
    """The request lacks the token this endpoint requires."""

    code = "UNAUTHENTICATED"


class PermissionDenied(HubError):
    """The operation is turned off on this server (model control, say)."""

    code = "PERMISSION_DENIED"


def code_of(exc: BaseException) -> str:
    """The protocol-neutral code for an exception: its class's, or INTERNAL for non-HubErrors."""
    return exc.code if isinstance(exc, HubError) else INTERNAL


#: CUDA errors that leave a process's CUDA context unusable ("sticky"): every later CUDA call in
#: the process fails too, and only a new process recovers. Codes (cudaError_t, as
#: torch.AcceleratorError's `error_code`) and the runtime's texts for them.
STICKY_CUDA_ERRORS = {
    214: "uncorrectable ECC error",
    220: "uncorrectable NVLink error",
    700: "an illegal memory access was encountered",
    702: "the launch timed out and was terminated",
    710: "device-side assert triggered",
    714: "hardware stack error",
    715: "an illegal instruction was encountered",
    716: "misaligned address",
    717: "operation not supported on global/shared address space",
    718: "invalid program counter",
    719: "unspecified launch failure",
}


def device_lost(error: BaseException) -> str | None:
    """What happened, when `error` is a sticky CUDA error (see STICKY_CUDA_ERRORS); else None.
    Only a RuntimeError (torch's, Triton's kernel launcher's and ONNX Runtime's all are): by
    torch.AcceleratorError's code where it has one, else by the runtime's text in its first
    line beside "CUDA" ("CUDA error: ...", "Triton Error [CUDA]: ...", "CUDA failure 700: ...")."""
    if not isinstance(error, RuntimeError):
        return None
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    code = getattr(error, "error_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return text if code in STICKY_CUDA_ERRORS else None
    if "CUDA" in text and any(known in text for known in STICKY_CUDA_ERRORS.values()):
        return text
    return None


#: The longest name (model, input, output) echoed in an error message, and the longest message
#: sent to a client at all. gRPC carries the message in a trailer, and a default client refuses
#: metadata over 8 KiB (tritonclient reports RESOURCE_EXHAUSTED): both stay far below it.
NAME_LIMIT = 128
MESSAGE_LIMIT = 1024


def shorten(text: str, limit: int = NAME_LIMIT) -> str:
    """`text` cut to at most about `limit` characters, saying how long it was."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text)} chars)"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def exception_line(exc: BaseException, limit: int = 300) -> str:
    """'Type: message' on one line, for a build's problem: the message's lines joined (torch's
    first line often ends in a colon, the substance on the next), terminal colours dropped,
    and cut after about `limit` characters (torch's messages run on for pages)."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    text = ""
    for line in lines:
        if text and len(text) + len(line) > limit:
            text += " ..."
            break
        text = f"{text} {line}" if text else line
    text = text if len(text) <= limit + 4 else text[:limit] + " ..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def did_you_mean(name: str, choices: Iterable[str], quote: str = '"') -> str:
    """' (did you mean "x"?)' for the choice nearest to a misspelt `name`, or '' when none is
    close: every "unknown X" message (a hook, a plugin, a target, a config key) hints alike."""
    close = difflib.get_close_matches(name, sorted(choices), n=1, cutoff=0.6)
    return f" (did you mean {quote}{close[0]}{quote}?)" if close else ""


def name_list(names: list[str], count: int = 8) -> str:
    """A bounded rendering of a list of names: at most `count` of them, each shortened."""
    shown = ", ".join(repr(shorten(n)) for n in names[:count])
    more = f", ... ({len(names) - count} more)" if len(names) > count else ""
    return f"[{shown}{more}]"


def client_message(exc: BaseException) -> str:
    """What a client may read: a HubError's message (capped at MESSAGE_LIMIT characters);
    for anything else only its type."""
    if isinstance(exc, HubError):
        return shorten(str(exc), MESSAGE_LIMIT)
    return f"internal error ({type(exc).__name__}); see the server log"


_BY_CODE: dict[str, type[HubError]] = {
    cls.code: cls
    for cls in (
        ModelNotFound,
        ModelUnavailable,
        InvalidInput,
        QueueFull,
        DeadlineExceeded,
        ModelExecutionError,
        Unsupported,
        Unauthenticated,
        PermissionDenied,
        AlreadyExists,
    )
}


def error_for_code(code: str, message: str) -> HubError:
    """The domain error for a code (an error that crossed from another process)."""
    return _BY_CODE.get(code, HubError)(message)
