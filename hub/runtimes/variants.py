"""Built-in plugin "variants": the optimised torch and ONNX targets.

| target | what it is |
| --- | --- |
| onnx-int8 | the ONNX export, dynamically quantised to int8 by ONNX Runtime (MatMul/Gemm, per channel) |
| torch-compile | torch.compile (Inductor), cache in models/<name>/<version>/inductor; CUDA graphs per bucket |
| torch-int8 | torchao's int8 dynamic-activation/int8-weight quantisation (torch's own quantize_dynamic is deprecated) |
| torch-fp16, torch-bf16 | half-precision eager on CUDA; the served tensors stay FP32 |

Every one is validated against eager like any other target; each has a default tolerance that
a spec can tighten or loosen.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Mapping

import numpy as np

from hub.errors import BuildError
from hub.plugins.hookspecs import hookimpl
from hub.runtimes.onnx import FILENAME, OnnxRuntime, export_onnx
from hub.spec import ArtifactContext, ModelSpec, Runtime, Target, Tolerance

log = logging.getLogger("modelhub.variants")

INT8_FILENAME = "model.int8.onnx"
INDUCTOR_DIR = "inductor"


# --- onnx-int8 --------------------------------------------------------------------------------


def _build_onnx_int8(ctx: ArtifactContext) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = ctx.directory / FILENAME
    export_onnx(ctx.module(), ctx.spec, str(fp32))
    # Conv quantisation made a small CNN 3x slower on CPU (STACK-NOTES); MatMul/Gemm pay off.
    quantize_dynamic(
        str(fp32),
        str(ctx.directory / INT8_FILENAME),
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
        weight_type=QuantType.QInt8,
    )
    fp32.unlink()


def _load_onnx_int8(ctx: ArtifactContext) -> Runtime:
    return OnnxRuntime(str(ctx.directory / INT8_FILENAME), ctx.spec, ctx.device, ctx.threads)


# --- torch variants ----------------------------------------------------------------------------


def _warm_batches(spec: ModelSpec) -> list[int]:
    """Batch sizes worth compiling before the model reports ready: 1, 2 and 16 cover Inductor's
    dynamic-shape guards on CPU (STACK-NOTES); preferred sizes and the maximum are what the
    batcher will send."""
    policy = spec.batching
    if not policy.batching:
        return [0]
    sizes = {1, 2, 16, *policy.preferred_batch_sizes, policy.max_batch_size}
    return sorted(s for s in sizes if s <= policy.max_batch_size)


def _tile(examples: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    if rows == 0:
        return dict(examples)
    return {k: np.resize(v, (rows, *v.shape[1:])) for k, v in examples.items()}


class BucketedRuntime:
    """Pads each batch up to the next bucket (CUDA graphs replay fixed shapes) and slices the
    padding off the outputs."""

    def __init__(self, inner: Runtime, buckets: list[int]) -> None:
        self.inner = inner
        self.buckets = buckets
        self.device = inner.device

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = len(next(iter(inputs.values())))
        bucket = next((b for b in self.buckets if b >= rows), rows)
        if bucket != rows:
            inputs = {k: np.concatenate([v, np.repeat(v[-1:], bucket - rows, axis=0)]) for k, v in inputs.items()}
        return {k: v[:rows] for k, v in self.inner.run(inputs).items()}

    def close(self) -> None:
        self.inner.close()


def _load_compiled(ctx: ArtifactContext) -> Runtime:
    import torch

    from hub.runtimes.torch import TorchRuntime

    cache = ctx.directory / INDUCTOR_DIR
    cache.mkdir(parents=True, exist_ok=True)
    # Inductor reads these when it compiles; loads run one at a time, so setting them here is safe.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(max(1, ctx.threads)))
    cuda_graphs = ctx.device == "cuda" and bool(ctx.spec.options.get("cuda_graphs", True))
    mode = str(ctx.spec.options.get("compile_mode", "reduce-overhead" if cuda_graphs else "default"))
    module = ctx.module()
    if isinstance(module, torch.nn.Module):
        module = module.to(ctx.device).eval()
    compiled = torch.compile(module, mode=mode, dynamic=not cuda_graphs)
    runtime: Runtime = TorchRuntime(compiled, ctx.spec, ctx.device)
    batches = _warm_batches(ctx.spec)
    if cuda_graphs and ctx.spec.batching.batching:
        runtime = BucketedRuntime(runtime, batches)
    examples = ctx.spec.examples()
    for rows in batches:  # compile now, so that no client request pays for it
        runtime.run(_tile(examples, rows))
    log.info("model '%s': torch.compile(mode=%s) warmed up at batch sizes %s", ctx.spec.key, mode, batches)
    return runtime


def _build_compiled(ctx: ArtifactContext) -> None:
    _load_compiled(ctx).close()  # compiling once fills the Inductor cache under the artifact


def _half(dtype_name: str) -> Callable[[ArtifactContext], Runtime]:
    def load(ctx: ArtifactContext) -> Runtime:
        import torch

        if ctx.device != "cuda":
            raise BuildError(
                f"model '{ctx.spec.name}': target 'torch-{dtype_name}' needs a CUDA device; this server runs on "
                f"{ctx.device} (use torch, onnx or onnx-int8 there)"
            )
        from hub.runtimes.torch import TorchRuntime

        dtype = getattr(torch, {"fp16": "float16"}.get(dtype_name, dtype_name))
        # .to(dtype) works in place: convert a copy, the eager module stays the reference.
        module = copy.deepcopy(ctx.module()).to(device=ctx.device, dtype=dtype).eval()
        return TorchRuntime(module, ctx.spec, ctx.device, move=False, compute_dtype=dtype)

    return load


def _build_torch_int8(ctx: ArtifactContext) -> None:
    _load_torch_int8(ctx).close()


def _load_torch_int8(ctx: ArtifactContext) -> Runtime:
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        raise BuildError(
            f"model '{ctx.spec.name}': target 'torch-int8' needs torchao (pip install 'modelhub[torchao]')"
        ) from None
    from hub.runtimes.torch import TorchRuntime

    module = copy.deepcopy(ctx.module()).to(ctx.device).eval()  # quantize_ works in place
    quantize_(module, Int8DynamicActivationInt8WeightConfig())
    return TorchRuntime(module, ctx.spec, ctx.device, move=False)  # quantised tensors do not support .to()


def _nothing(ctx: ArtifactContext) -> None:
    ctx.module()


QUANTISED = Tolerance(atol=0.05, rtol=0.1, min_top1=0.95)
HALF = Tolerance(atol=1e-2, rtol=2e-2, min_top1=0.99)


@hookimpl
def register_targets(register: Callable[[Target], None]) -> None:
    register(
        Target(
            "onnx-int8",
            _build_onnx_int8,
            _load_onnx_int8,
            "ONNX Runtime, dynamic int8 (MatMul/Gemm)",
            platform="onnxruntime_onnx",
            tolerance=QUANTISED,
            artifact=INT8_FILENAME,
        )
    )
    register(
        Target(
            "torch-compile",
            _build_compiled,
            _load_compiled,
            "torch.compile (Inductor), cached",
            platform="pytorch_libtorch",
            tolerance=Tolerance(atol=1e-4, rtol=1e-3),
            artifact=INDUCTOR_DIR,
        )
    )
    register(
        Target(
            "torch-int8",
            _build_torch_int8,
            _load_torch_int8,
            "torchao int8 dynamic quantisation",
            platform="pytorch_libtorch",
            tolerance=QUANTISED,
        )
    )
    for dtype in ("fp16", "bf16"):
        register(
            Target(
                f"torch-{dtype}",
                _nothing,
                _half(dtype),
                f"eager {dtype} on CUDA",
                platform="pytorch_libtorch",
                tolerance=HALF,
            )
        )
