"""Built-in plugin "torch-variants": the torch targets beyond eager fp32 ("torch" is hub/runtimes/torch.py).

| target | what it is |
| --- | --- |
| torch-compile | torch.compile (Inductor), in the process-wide Inductor cache (hub/process.py); CUDA graphs by bucket |
| torch-int8 | torchao's int8 dynamic-activation/int8-weight quantisation (torch's own quantize_dynamic is deprecated) |
| torch-fp16, torch-bf16 | half-precision eager on CUDA; the served tensors stay FP32 |

Every one is validated against eager like any other target; each has a default tolerance
(hub/runtimes/tolerances.py) that a spec can tighten or loosen.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from collections.abc import Callable
from typing import Any

from hub.errors import TargetUnavailable
from hub.plugins.hookspecs import hookimpl
from hub.runtimes.cudagraph import CudaGraphRuntime
from hub.runtimes.tensors import HALF_DTYPES, tile
from hub.runtimes.tolerances import FP32, HALF, QUANTISED
from hub.spec import ArtifactContext, ModelSpec, Runtime, Target

log = logging.getLogger("modelhub.variants")


def _warm_batches(spec: ModelSpec, cuda_graphs: bool = False) -> list[int]:
    """Batch sizes worth compiling before the model reports ready: 1, 2 and 16 cover Inductor's
    dynamic-shape guards on CPU (STACK-NOTES); preferred sizes and the maximum are what the
    batcher will send.

    With CUDA graphs they are the buckets every batch is padded up to, one graph each: powers of
    two from 2 (padding at most doubles a batch), the preferred sizes and the maximum. No bucket
    of 1: torch always specialises a dim of size 1, so it would cost a second Inductor compile;
    a batch of 1 runs padded to 2."""
    policy = spec.batching
    if not policy.batching:
        return [0]
    if cuda_graphs and policy.max_batch_size > 1:
        powers = (2**i for i in range(1, policy.max_batch_size.bit_length()))
        return sorted({*powers, *policy.preferred_batch_sizes, policy.max_batch_size} - {1})
    sizes = {1, 2, 16, *policy.preferred_batch_sizes, policy.max_batch_size}
    return sorted(s for s in sizes if s <= policy.max_batch_size)


def _load_compiled(ctx: ArtifactContext) -> Runtime:
    """Compile and warm up (or capture, with CUDA graphs) every batch size the batcher sends.

    Inductor's cache is process-wide (TORCHINDUCTOR_CACHE_DIR, set once by hub.process), so a
    second start of the same model compiles from it; the build itself compiles nothing, the
    load it validates and serves does."""
    import torch

    from hub.runtimes.torch import TorchRuntime

    capture, keywords = compile_plan(ctx.spec, ctx.device)
    module = ctx.module()
    if isinstance(module, torch.nn.Module):
        module = module.to(ctx.device).eval()
    batches = _warm_batches(ctx.spec, capture)
    examples = ctx.spec.forward_examples()
    compiled = torch.compile(module, **keywords)
    if capture:
        runtime: Runtime = CudaGraphRuntime(compiled, ctx.spec, batches, examples)
    else:
        runtime = TorchRuntime(compiled, ctx.spec, ctx.device)
        for rows in batches:  # compile now, so that no client request pays for it
            runtime.run(tile(examples, rows))
    log.info(
        "model '%s': torch.compile(%s)%s warmed up at batch sizes %s",
        ctx.spec.key, keywords, " with a CUDA graph per bucket" if capture else "", batches,
    )  # fmt: skip
    return runtime


def compile_plan(spec: ModelSpec, device: str) -> tuple[bool, dict[str, Any]]:
    """How torch-compile compiles `spec` on `device`: whether it captures a CUDA graph per batch
    bucket itself, and torch.compile's keywords.

    It captures on CUDA (unless the spec's `cuda_graphs` option is off) for a batching model
    whose inputs are fixed beyond the batch dim: a graph's input buffers have one shape, and a
    padded length (token ids) differs from batch to batch. Then one Inductor compile serves
    every bucket (the batch dim is marked dynamic, the others stay static; a static compile ran
    Inductor once per bucket: minutes for ResNet-50).

    Otherwise `dynamic=True`, so one compile serves every batch size and length (fixed shapes on
    CUDA without batching stay static). On CUDA, Inductor's own CUDA graphs stay off either way
    ("reduce-overhead", "max-autotune"): inside our capture they cannot nest, and outside it
    their cudagraph trees keep state per thread and asserted when the thread that served was not
    the one that compiled (an H200, torch 2.11)."""
    mode = str(spec.options.get("compile_mode") or "default")
    wants_graphs = device == "cuda" and bool(spec.options.get("cuda_graphs", True))
    batching = spec.batching.batching
    fixed = all(-1 not in (t.shape[1:] if batching else t.shape) for t in spec.forward_inputs)
    if wants_graphs and fixed and batching:
        return True, {"options": options_without_cudagraphs(mode), "dynamic": None}
    dynamic = not (wants_graphs and fixed)
    if device == "cuda":
        return False, {"options": options_without_cudagraphs(mode), "dynamic": dynamic}
    return False, {"mode": mode, "dynamic": dynamic}


def options_without_cudagraphs(mode: str) -> dict[str, Any]:
    """torch.compile's `mode` as Inductor options, less Inductor's own CUDA graphs, which
    "reduce-overhead" and "max-autotune" turn on (`compile_plan` says why they stay off). An
    unknown mode: torch's RuntimeError, naming the modes."""
    import torch._inductor

    return {**torch._inductor.list_mode_options(mode), "triton.cudagraphs": False}


def _half(dtype_name: str) -> Callable[[ArtifactContext], Runtime]:
    def load(ctx: ArtifactContext) -> Runtime:
        import torch

        if ctx.device != "cuda":
            raise TargetUnavailable(
                f"model '{ctx.spec.name}': target 'torch-{dtype_name}' needs a CUDA device; this server runs on "
                f"{ctx.device} (use torch, onnx or onnx-int8 there)"
            )
        from hub.runtimes.torch import TorchRuntime

        dtype = getattr(torch, HALF_DTYPES[dtype_name])
        # .to(dtype) works in place: convert a copy, the eager module stays the reference.
        module = copy.deepcopy(ctx.module()).to(device=ctx.device, dtype=dtype).eval()
        return TorchRuntime(module, ctx.spec, ctx.device, move=False, compute_dtype=dtype)

    return load


def _needs_torchao(ctx: ArtifactContext) -> None:
    """Refuse, before any work, where torchao is not installed."""
    if importlib.util.find_spec("torchao") is None:
        raise TargetUnavailable(
            f"model '{ctx.spec.name}': target 'torch-int8' needs torchao (pip install 'modelhub[torchao]')"
        )


def _build_torch_int8(ctx: ArtifactContext) -> None:
    """Nothing to write: the load quantises (once, for the build's validation and serving alike)."""
    _needs_torchao(ctx)
    ctx.module()


def _load_torch_int8(ctx: ArtifactContext) -> Runtime:
    _needs_torchao(ctx)
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    from hub.runtimes.torch import TorchRuntime

    module = copy.deepcopy(ctx.module()).to(ctx.device).eval()  # quantize_ works in place
    quantize_(module, Int8DynamicActivationInt8WeightConfig())
    return TorchRuntime(module, ctx.spec, ctx.device, move=False)  # quantised tensors do not support .to()


def _nothing(ctx: ArtifactContext) -> None:
    """No files to write: the load does the work; building the module checks that it constructs."""
    ctx.module()


@hookimpl(trylast=True)  # a default: a plugin's target of the same name is called first and wins
def register_targets(register: Callable[[Target], None]) -> None:
    register(
        Target(
            "torch-compile",
            _nothing,
            _load_compiled,
            "torch.compile (Inductor); its cache is process-wide (TORCHINDUCTOR_CACHE_DIR)",
            platform="pytorch_libtorch",
            tolerance=FP32,
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
