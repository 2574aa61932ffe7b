"""Test plugin: tiny torch models on the built-in "torch" (eager) and "onnx" targets."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl


class Affine(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2.0 + 1.0, x.sum(dim=1, keepdim=True)


def _spec(name: str, target: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        build=lambda: Affine().eval(),
        inputs=[TensorSpec("x", "FP32", (-1, 4))],
        outputs=[TensorSpec("y", "FP32", (-1, 4)), TensorSpec("total", "FP32", (-1, 1))],
        example_inputs={"x": np.arange(8, dtype=np.float32).reshape(2, 4)},
        target=target,
        batching=BatchPolicy(max_batch_size=32),
    )


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    register(_spec("affine_torch", "torch"))
    register(_spec("affine_onnx", "onnx"))
