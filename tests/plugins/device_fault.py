"""Test plugin: a model served by a target ("faulty-device") whose runtime fails as a CUDA
kernel that read out of bounds would on a GPU, for a row holding FAULT: torch.AcceleratorError,
cudaErrorIllegalAddress, a sticky error. After it the runtime, like torch's, cannot even close
(torch.cuda.empty_cache raises the same error then). Any other row is doubled."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from hub import ArtifactContext, BatchPolicy, ModelSpec, Runtime, Target, TensorSpec, hookimpl

FAULT = -700.0


def illegal_address() -> BaseException:
    """What torch raises after a kernel's illegal memory access."""
    import torch

    error = torch.AcceleratorError(
        "CUDA error: an illegal memory access was encountered\n"
        "CUDA kernel errors might be asynchronously reported at some other API call"
    )
    error.error_code = 700  # type: ignore[attr-defined]
    return error


class FaultyDevice:
    device = "cpu"  # (it stands in for a GPU; the server's CPU paths serve it)

    def __init__(self) -> None:
        self.lost = False

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if (inputs["INPUT0"] == FAULT).any():
            self.lost = True
            raise illegal_address()
        return {"OUTPUT0": inputs["INPUT0"] * 2}

    def close(self) -> None:
        if self.lost:
            raise illegal_address()


def _load(ctx: ArtifactContext) -> Runtime:
    return FaultyDevice()


@hookimpl
def register_targets(register: Callable[[Target], None]) -> None:
    register(Target(name="faulty-device", build=lambda ctx: None, load=_load, check_parity=False))


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    register(
        ModelSpec(
            name="faulty",
            build=lambda: None,
            inputs=[TensorSpec("INPUT0", "FP32", (-1, 1))],
            outputs=[TensorSpec("OUTPUT0", "FP32", (-1, 1))],
            example_inputs={"INPUT0": np.ones((1, 1), np.float32)},
            target="faulty-device",
            batching=BatchPolicy(max_batch_size=4),
        )
    )
