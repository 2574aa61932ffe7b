"""Built-in plugin "float8": target `torch-float8`, eager PyTorch with its Linear layers in
float8 (e4m3) on CUDA GPUs that have float8 tensor cores (compute capability 8.9 or later: L4,
L40, H100, H200), through torch's own `torch._scaled_mm`.

Scaling, and why it is batch-invariant: weights are scaled per output channel once, at load;
activations per row (per token for a sequence model) at each forward, each row by its own
largest magnitude (amax / 448, e4m3's largest finite value). No row's scale depends on another
row, so a row's answer does not depend on its batch-mates, as with static int8 and unlike
per-tensor dynamic scaling (torchao's default "tensorwise" float8 and ONNX Runtime's dynamic
int8 take one scale over the whole batch). The batch-invariance check proves it on the GPU.

Why plain torch and not torchao: the GPU image has no torchao, its device machine reaches no
registry, and torchao's compiled extensions are built for particular torch releases (the image
has torch 2.11); `torch._scaled_mm` with row-wise scales is in torch itself and needs no wheel.
The arithmetic is the same as torchao's row-wise float8 (its `PerRow` granularity).

Layers converted: every `nn.Linear` whose input and output sizes are multiples of 16 (what the
float8 matmul accepts), except those the spec's `float8_exclude` option names (torch module
paths, glob patterns, as for `int8_exclude`). Everything else stays in the module's dtype.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Callable, Sequence

import torch
from torch import nn

from hub.errors import BuildError, TargetUnavailable
from hub.plugins.hookspecs import hookimpl
from hub.spec import ArtifactContext, Runtime, Target, Tolerance

log = logging.getLogger("modelhub.float8")

#: e4m3's largest finite value: a row's largest magnitude is scaled to it.
E4M3_MAX = 448.0
#: Compute capability from which CUDA has float8 tensor cores (Ada Lovelace, then Hopper).
MIN_CAPABILITY = (8, 9)


class Float8Linear(nn.Module):
    """`nn.Linear` computed as float8 e4m3 x e4m3 with fp32 accumulation: weights scaled per
    output channel, activations per row, so each output row depends on its input row alone."""

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight_fp8", (weight / scale).to(torch.float8_e4m3fn))  # [out, in], row-major
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("bias", bias)
        #: bf16 where this torch's CUDA row-wise float8 matmul offers no fp32 output.
        self.out_dtype = out_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()
        if rows.shape[0] == 0:
            out = rows.new_zeros((0, self.out_features))
        else:
            scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / E4M3_MAX  # [rows, 1]
            quantised = (rows / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
            out = torch._scaled_mm(
                quantised,
                self.weight_fp8.t(),  # column-major [in, out], as the float8 matmul wants its second operand
                scale_a=scale,
                scale_b=self.weight_scale,
                out_dtype=self.out_dtype,
            ).float()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float8_e4m3fn row-wise"


def float8_module(module: nn.Module, exclude: Sequence[str] = (), out_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A copy of `module` with its suitable Linear layers as Float8Linear (the original stays
    the eager reference). Raises BuildError when `exclude` names no module, or nothing is left
    to convert."""
    converted = copy.deepcopy(module).eval()
    used: set[str] = set()
    names: list[str] = []
    for name, child in list(converted.named_modules()):
        if not isinstance(child, nn.Linear) or child.in_features % 16 or child.out_features % 16:
            continue
        hits = [p for p in exclude if fnmatch.fnmatchcase(name, p)]
        if hits:
            used.update(hits)
            continue
        parent_name, _, attribute = name.rpartition(".")
        parent = converted.get_submodule(parent_name) if parent_name else converted
        setattr(parent, attribute, Float8Linear(child, out_dtype))
        names.append(name)
    unmatched = [p for p in exclude if p not in used]
    if unmatched:
        raise BuildError(f"option float8_exclude: {unmatched} match no Linear layer of sizes divisible by 16")
    if not names:
        raise BuildError("no Linear layer with input and output sizes divisible by 16 to compute in float8")
    log.info("float8: %d Linear layers converted", len(names))
    return converted


def needs_float8_gpu(ctx: ArtifactContext) -> None:
    """Refuse, before any work, where there are no float8 tensor cores to run on."""
    where = f"model '{ctx.spec.name}': target 'torch-float8'"
    if ctx.device != "cuda" or not torch.cuda.is_available():
        raise TargetUnavailable(
            f"{where} needs a CUDA GPU with float8 tensor cores (compute capability 8.9 or later: L4, L40, "
            f"H100, H200); this server runs on {ctx.device} (use onnx-int8 there)"
        )
    capability = torch.cuda.get_device_capability()
    if capability < MIN_CAPABILITY:
        raise TargetUnavailable(
            f"{where} needs float8 tensor cores (compute capability 8.9 or later); "
            f"{torch.cuda.get_device_name()} is {capability[0]}.{capability[1]} (use torch-fp16 or torch-bf16 there)"
        )


def row_wise_out_dtype() -> torch.dtype:
    """fp32 where this torch's CUDA row-wise float8 matmul offers it (no rounding of the
    products' sums), else bf16, which every release with row-wise scaling offers."""
    a = torch.ones((16, 16), device="cuda").to(torch.float8_e4m3fn)
    scale_a, scale_b = torch.ones((16, 1), device="cuda"), torch.ones((1, 16), device="cuda")
    try:
        torch._scaled_mm(a, a.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.float32)
    except (RuntimeError, ValueError) as exc:  # releases refuse through TORCH_CHECK (RuntimeError) or _VALUE
        log.info("float8: row-wise matmul with fp32 output unavailable (%s); bf16 output", str(exc).splitlines()[0])
        return torch.bfloat16
    return torch.float32


def _load(ctx: ArtifactContext) -> Runtime:
    from hub.runtimes.torch import TorchRuntime

    needs_float8_gpu(ctx)
    exclude = [str(p) for p in ctx.spec.options.get("float8_exclude", ())]
    try:
        # float8_module converts a copy on CPU: the eager module stays where it is, the reference.
        module = float8_module(ctx.module(), exclude, row_wise_out_dtype()).to("cuda")
    except BuildError as exc:
        raise BuildError(f"model '{ctx.spec.name}': target 'torch-float8': {exc}") from None
    return TorchRuntime(module, ctx.spec, "cuda", move=False)


def _build(ctx: ArtifactContext) -> None:
    needs_float8_gpu(ctx)
    _load(ctx).close()  # nothing to write: converting once checks that it can


@hookimpl(trylast=True)  # a default: a plugin's target of the same name is called first and wins
def register_targets(register: Callable[[Target], None]) -> None:
    register(
        Target(
            "torch-float8",
            _build,
            _load,
            "eager on CUDA, Linear layers in float8 e4m3 (row-wise scales; compute capability 8.9+)",
            platform="pytorch_libtorch",
            tolerance=Tolerance(atol=0.05, rtol=0.1, min_top1=0.95, max_accuracy_drop=0.01),
        )
    )
