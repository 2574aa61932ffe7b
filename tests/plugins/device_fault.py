"""Test plugin: a model whose forward fails as a kernel that read out of bounds would on a GPU
(torch.AcceleratorError, cudaErrorIllegalAddress: a sticky error, after which no CUDA call in
the process succeeds), for a row holding FAULT; any other row is doubled. Its target, "numpy",
comes from identity.py."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

FAULT = -700.0


def _faulty() -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    def run(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (inputs["INPUT0"] == FAULT).any():
            import torch

            error = torch.AcceleratorError(
                "CUDA error: an illegal memory access was encountered\n"
                "CUDA kernel errors might be asynchronously reported at some other API call"
            )
            error.error_code = 700  # type: ignore[attr-defined]
            raise error
        return {"OUTPUT0": inputs["INPUT0"] * 2}

    return run


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    register(
        ModelSpec(
            name="faulty",
            build=_faulty,
            inputs=[TensorSpec("INPUT0", "FP32", (-1, 1))],
            outputs=[TensorSpec("OUTPUT0", "FP32", (-1, 1))],
            example_inputs={"INPUT0": np.ones((1, 1), np.float32)},
            target="numpy",
            batching=BatchPolicy(max_batch_size=4),
        )
    )
