"""The hook recorder's target: a model that is a numpy function."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from hub import ArtifactContext, Runtime

Forward = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class RecordingRuntime:
    device = "cpu"

    def __init__(self, function: Forward) -> None:
        self.function = function

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.function(inputs)

    def close(self) -> None:
        pass


def doubler() -> Forward:
    return lambda inputs: {"OUT": inputs["IN"] * 2}


def build(ctx: ArtifactContext) -> None:
    ctx.module()


def load(ctx: ArtifactContext) -> Runtime:
    return RecordingRuntime(ctx.module())
