"""Domain errors. The protocol layer maps each class to a status code in one place
(hub/protocol/status.py); nothing here knows about gRPC."""

from __future__ import annotations


class HubError(Exception):
    """Base class: the message is safe to send to a client (no traceback, no internals)."""


class ModelNotFound(HubError):
    """No such model, or no such version of it."""


class ModelUnavailable(HubError):
    """The model exists but is loading, unloading or failed."""


class InvalidInput(HubError):
    """The request does not match the model's contract; the message names the field."""


class QueueFull(HubError):
    """The model's queue is at `max_queue_size`."""


class DeadlineExceeded(HubError):
    """The request's deadline passed before it was computed."""


class ModelExecutionError(HubError):
    """Plugin or runtime code raised while serving a request; the message names the model."""


class Unsupported(HubError):
    """The server does not implement this operation."""


class PluginError(HubError):
    """A plugin could not be imported, or registered something invalid."""


class SpecError(HubError):
    """A ModelSpec (or a deployment override of it) is invalid."""


class BuildError(HubError):
    """Building or validating an artifact failed."""
