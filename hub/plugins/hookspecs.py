"""The plugin contract: every hook a modelhub plugin may implement.

Mark implementations with `hub.hookimpl`. Each docstring below is the documentation of its
hook (docs/plugins.md repeats the signatures; a test keeps the two in step).

Every hook is called through pluggy, one plugin at a time: `@hookimpl(tryfirst=True)`
implementations first, then the unmarked ones newest registration first, then
`@hookimpl(trylast=True)`. An exception is reported against the plugin that raised it. No
hook is `firstresult`: every implementation runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pluggy

if TYPE_CHECKING:
    from hub.spec import ModelSpec, Runtime, Target, Tolerance

PROJECT = "modelhub"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --- Registration: what a plugin contributes ------------------------------------------------


@hookspec
def register_models(register: Callable[[ModelSpec], None]) -> None:
    """Register the models this plugin serves.

    :param register: call it once per `ModelSpec` (one per name and version). The hub records
        which plugin registered each spec, so errors name the plugin. A spec that fails
        validation (duplicate name and version, unknown datatype, example inputs that do not
        match the TensorSpecs) is reported with the plugin's name and file, and skipped; the
        plugin's other specs and other plugins' models still serve.
    :returns: nothing.
    """


@hookspec
def register_targets(register: Callable[[Target], None]) -> None:
    """Register build targets: ways to turn an eager model into a served artifact.

    The built-in targets ("torch", "onnx") are registered by built-in plugins through this
    same hook. A target's name must be unique across plugins.

    :param register: call it once per `Target`.
    :returns: nothing.
    """


# --- Build: checking an artifact ------------------------------------------------------------


@hookspec
def validate_artifact(
    spec: ModelSpec,
    runtime: Runtime,
    examples: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray] | None,
    tolerance: Tolerance,
    labels: np.ndarray | None,
) -> dict[str, Any] | None:
    """Check a freshly built artifact before it is served.

    Called for every build, with the artifact already loaded (the same runtime then serves).
    Every implementation runs, a plugin's before the built-in "validation" (which is trylast);
    their results are merged into the `validation` section of the artifact's manifest.json.

    :param spec: the model being built.
    :param runtime: the loaded artifact.
    :param examples: the inputs to check on: the spec's `validation_data` inputs when it has
        some, else its example inputs; as the model takes them (after the spec's
        `preprocess`, when it has one).
    :param reference: the eager model's outputs on `examples` (the target named "torch",
        run on the CPU), or None when the target is not checked against eager. Like the
        runtime's, they are what the model returns: the spec's `model_outputs`, before its
        `postprocess`, when it has one (`spec.forward_outputs`).
    :param labels: the labels of `examples` from `validation_data` (one per row: a build whose
        labels and inputs differ in length fails first, naming both), or None.
    :param tolerance: the `hub.Tolerance` in force (the spec's for this target, else the
        target's default).
    :returns: None to abstain, or a dict of figures to record (string keys; values that JSON
        holds: Python numbers, strings, lists, dicts, not numpy scalars). A list under the
        key "problems" (human-readable strings) refuses the artifact: the model is marked
        failed with those reasons and is not served. Raising, or returning anything else,
        fails the build with a message naming this plugin, and no manifest is written; an
        exception out of `runtime.run` is the artifact's own failure, not the validator's: a
        BuildError passes through as it is, anything else fails the build naming the model, the
        error and the line of the plugin's files that raised it.
    """


# --- Serving: server lifecycle --------------------------------------------------------------


@hookspec
def server_started(server: Any) -> None:
    """The server is listening and every model has finished loading (or failed).

    :param server: the `hub.server.ServerInfo` facade: `grpc_port`, `http_port` and
        `metrics_port` (each None when that listener is off), `device` and `models()`, a list of
        (name, version, state) triples. With `--workers N` this runs once, in the model process.
    :returns: nothing. An exception is logged and does not stop the server.
    """


@hookspec
def server_stopping(server: Any) -> None:
    """The server is about to stop; in-flight requests are still being answered.

    :param server: the same `hub.server.ServerInfo` facade as in `server_started`.
    :returns: nothing. An exception is logged and does not stop the shutdown.
    """
