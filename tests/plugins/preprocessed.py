"""Test plugin: a model whose spec preprocesses its served input (run in each frontend
process with --workers N) before the batched forward."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


def _halve(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"h": np.asarray(inputs["x"], np.float32) / 2.0}


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    register(
        ModelSpec(
            name="halve_then_double",
            build=lambda: Double().eval(),
            inputs=[TensorSpec("x", "FP32", (-1, 4))],
            model_inputs=[TensorSpec("h", "FP32", (-1, 4))],
            preprocess=_halve,
            outputs=[TensorSpec("y", "FP32", (-1, 4))],
            example_inputs={"x": np.ones((1, 4), np.float32)},
            target="torch",
            batching=BatchPolicy(max_batch_size=8),
        )
    )
