"""Built-in plugin "torch": the eager target, served by PyTorch on CUDA when there is one, else CPU."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from hub.plugins.hookspecs import hookimpl
from hub.runtimes.tensors import as_outputs, check_argument_order, check_no_bytes, to_numpy, to_tensor
from hub.runtimes.tolerances import FP32
from hub.spec import ArtifactContext, ModelSpec, Runtime, Target


class TorchRuntime:
    """Runs an eager module under inference_mode; inputs positionally in the spec's order.

    With `compute_dtype` (fp16/bf16 targets), floating inputs are cast to it and floating
    outputs back to FP32, so the served contract does not change.
    """

    #: Inputs may be torch tensors on the device (CUDA shared memory), not only numpy arrays.
    takes_device_tensors = True

    def __init__(
        self,
        module: Callable[..., Any],
        spec: ModelSpec,
        device: str,
        *,
        move: bool = True,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        check_no_bytes(spec)
        check_argument_order(module, spec)
        if isinstance(module, torch.nn.Module) and move:
            module = module.to(device).eval()
        self.module = module
        self.device = device
        self.compute_dtype = compute_dtype
        self._inputs = [t.name for t in spec.forward_inputs]
        self._outputs = [t.name for t in spec.forward_outputs]
        self._model = spec.name

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        cast = self.compute_dtype
        with torch.inference_mode():
            args = [to_tensor(inputs[name], self.device) for name in self._inputs]
            if cast is not None:
                args = [a.to(cast) if a.is_floating_point() else a for a in args]
            result = as_outputs(self.module(*args), self._outputs, self._model)
            if cast is not None:
                result = {k: v.float() if v.is_floating_point() else v for k, v in result.items()}
            return {name: to_numpy(value) for name, value in result.items()}

    def close(self) -> None:
        self.module = None  # type: ignore[assignment]
        if self.device == "cuda":
            torch.cuda.empty_cache()


def eager_outputs(module: Any, spec: ModelSpec, examples: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference: the eager module on CPU, in float32, on the example inputs.

    Runs a copy, so that the module a target is serving is never moved or changed.
    """
    return TorchRuntime(copy.deepcopy(module), spec, "cpu").run(examples)


def _build(ctx: ArtifactContext) -> None:
    """Eager needs no files; building the module once checks that it constructs."""
    ctx.module()


def _load(ctx: ArtifactContext) -> Runtime:
    return TorchRuntime(ctx.module(), ctx.spec, ctx.device)


@hookimpl(trylast=True)  # a default: a plugin's target of the same name is called first and wins
def register_targets(register: Callable[[Target], None]) -> None:
    register(
        Target(
            name="torch",
            build=_build,
            load=_load,
            description="eager PyTorch, on CUDA when available",
            platform="pytorch_libtorch",
            check_parity=False,  # it is the reference
            # Eager is its own parity reference, but its kernels block differently by batch size:
            # a digits row alone and in a batch of 64 differed by 3e-6. The batch-invariance check
            # allows it the float rounding any fp32 target gets.
            tolerance=FP32,
        )
    )
