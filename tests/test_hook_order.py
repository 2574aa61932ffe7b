"""Every hook goes through pluggy: tryfirst and trylast order hold, and MODELHUB_TRACE_HOOKS
traces each call, whichever PluginHost method calls the hook."""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from hub import BatchPolicy, ModelSpec, TensorSpec, Tolerance, hookimpl
from hub.plugins.manager import PluginHost

from .plugins.identity import NumpyRuntime
from .test_hooks_documented import HOOKS

SPEC = ModelSpec(
    name="ordered",
    build=lambda: lambda inputs: {"OUT": inputs["IN"]},
    inputs=[TensorSpec("IN", "FP32", (-1, 2))],
    outputs=[TensorSpec("OUT", "FP32", (-1, 2))],
    example_inputs={"IN": np.ones((1, 2), np.float32)},
    target="numpy",
    batching=BatchPolicy(max_batch_size=4),
)


def _validate(host: PluginHost) -> None:
    examples = SPEC.examples()
    host.validate_artifact(SPEC, NumpyRuntime(lambda i: {"OUT": i["IN"]}), examples, None, Tolerance(), None)


#: How the hub calls each hook: the PluginHost method the server or the builder uses.
CALLERS: dict[str, Callable[[PluginHost], object]] = {
    "register_targets": lambda host: host.collect_targets(),
    "register_models": lambda host: host.collect_models(),
    "validate_artifact": _validate,
    "server_started": lambda host: host.server_started(object()),
    "server_stopping": lambda host: host.server_stopping(object()),
}


def recorder(label: str, calls: list[tuple[str, str]], **marks: bool) -> object:
    """A plugin object implementing every hook, each call appending (hook, label)."""

    def implementation(hook: str) -> Callable[..., None]:
        def record(**ignored: Any) -> None:  # takes no hook arguments: pluggy passes none
            calls.append((hook, label))

        return hookimpl(**marks)(record)

    plugin = type(f"Recorder_{label}", (), {})()
    for hook in HOOKS:
        setattr(plugin, hook, implementation(hook))
    return plugin


def test_every_hook_has_a_caller() -> None:
    assert set(CALLERS) == set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_tryfirst_and_trylast_order_and_tracing(
    hook: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MODELHUB_TRACE_HOOKS", "1")
    calls: list[tuple[str, str]] = []
    # Registered in the order that pluggy, unmarked, would call backwards: newest first.
    plugins = {
        "early": recorder("early", calls, tryfirst=True),
        "plain_old": recorder("plain_old", calls),
        "plain_new": recorder("plain_new", calls),
        "late": recorder("late", calls, trylast=True),
    }
    host = PluginHost(None, entry_points=False, extra=plugins)
    host.load()
    with caplog.at_level(logging.INFO, logger="modelhub.plugins"):
        CALLERS[hook](host)
    assert [label for name, label in calls if name == hook] == ["early", "plain_new", "plain_old", "late"]
    traced = [r.getMessage() for r in caplog.records if r.getMessage().startswith("hook: ")]
    assert sum(f"{hook} [hook]" in message for message in traced) >= len(plugins), traced
    named = [m.split('plugin "')[1].rstrip('"') for m in traced if m.startswith(f"hook: {hook}: plugin ")]
    assert [name for name in named if name in plugins] == ["early", "plain_new", "plain_old", "late"], traced


def test_a_raising_plugin_does_not_hide_later_ones() -> None:
    calls: list[tuple[str, str]] = []

    class Raiser:
        @hookimpl(tryfirst=True)
        def register_models(self, register: Callable[[ModelSpec], None]) -> None:
            raise RuntimeError("no weights")

    host = PluginHost(None, entry_points=False, extra={"raiser": Raiser(), "after": recorder("after", calls)})
    host.collect_models()
    assert ("register_models", "after") in calls
    assert host.records["raiser"].status == "failed"
    assert 'plugin "raiser"' in host.records["raiser"].errors[0] and "no weights" in host.records["raiser"].errors[0]
    assert host.records["after"].status == "loaded"


def test_an_unhashable_plugin_is_refused_with_a_reason() -> None:
    host = PluginHost(None, entry_points=False, extra={"unhashable": types.SimpleNamespace()})
    host.load()
    assert host.records["unhashable"].status == "failed"
    assert "unhashable SimpleNamespace" in host.records["unhashable"].errors[0]
