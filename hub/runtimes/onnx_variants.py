"""Built-in plugin "onnx-variants": the ONNX targets beyond plain fp32 ("onnx" is hub/runtimes/onnx.py).

| target | what it is |
| --- | --- |
| onnx-int8 | the ONNX export, static int8 by ONNX Runtime (QDQ, per-channel weights, Conv included), |
| | activation scales fixed by calibration on the spec's calibration inputs |
| onnx-int8-dynamic | the ONNX export, dynamic int8 (MatMul/Gemm, per channel): activation scales per batch |
| onnx-fp16, onnx-bf16 | fp16/bf16 ONNX export served by onnxruntime-gpu's CUDA provider; the served tensors stay FP32 |

Every one is validated against eager like any other target; each has a default tolerance
(hub/runtimes/tolerances.py) that a spec can tighten or loosen.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hub.errors import BuildError, TargetUnavailable
from hub.plugins.hookspecs import hookimpl
from hub.runtimes.onnx import FILENAME, OnnxRuntime, export_onnx
from hub.runtimes.tensors import HALF_DTYPES
from hub.runtimes.tolerances import HALF, QUANTISED
from hub.spec import ArtifactContext, ModelSpec, Runtime, Target

log = logging.getLogger("modelhub.variants")

INT8_FILENAME = "model.int8.onnx"
INT8_DYNAMIC_FILENAME = "model.int8-dynamic.onnx"


# --- onnx-int8 --------------------------------------------------------------------------------


def _build_onnx_int8(ctx: ArtifactContext) -> None:
    """Static int8: QDQ with per-channel int8 weights and uint8 activations whose scales are
    fixed at build time from the calibration inputs, so that no row's answer depends on its
    batch-mates (the batch-invariance check proves it), and Conv is int8 too."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fp32 = ctx.directory / FILENAME
    export_onnx(ctx.module(), ctx.spec, str(fp32), "onnx-int8")
    prepared = ctx.directory / "model.prepared.onnx"
    _prepare_for_quantization(ctx, fp32, prepared)
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
        "distribution": CalibrationMethod.Distribution,
    }
    quantize_static(
        str(prepared),
        str(ctx.directory / INT8_FILENAME),
        _CalibrationReader(ctx.spec),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        # u8 activations, s8 weights: the pair x86's int8 kernels (VNNI, AVX2) are fastest at.
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        # 7-bit weights: AVX2 without VNNI sums u8*s8 pairs into int16, which saturates with
        # full-range weights (a ResNet-50 lost 1 of 16 top-1s to it); VNNI does not need it.
        reduce_range=bool(ctx.spec.options.get("int8_reduce_range", True)),
        calibrate_method=methods[ctx.spec.calibration_method],
        nodes_to_exclude=_excluded_nodes(ctx, str(prepared)),
        # Option int8_op_types: quantise only these ONNX op types (say ["MatMul", "Gemm"] for a
        # transformer, whose additive attention mask and LayerNorms lose too much at 8 bits).
        op_types_to_quantize=list(ctx.spec.options["int8_op_types"]) if "int8_op_types" in ctx.spec.options else None,
    )
    fp32.unlink()
    prepared.unlink()


def _prepare_for_quantization(ctx: ArtifactContext, source: Path, prepared: Path) -> None:
    """ONNX Runtime's recommended pre-processing (shape inference, graph folding), which lets
    the quantiser see every tensor's type (the export is used as it is if that fails); with
    the option int8_fold_scales, then hub.runtimes.onnx_folding's rewrite."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    except Exception as exc:  # an exporter graph the pre-processor cannot take: quantise it unprepared
        log.warning("model '%s': onnx-int8 pre-processing skipped: %r", ctx.spec.key, exc)
        shutil.copyfile(source, prepared)
    if ctx.spec.options.get("int8_fold_scales"):
        # Option int8_fold_scales: an input normalisation's scale into the first Conv's weights
        # (faster at batch 1; on resnet, 90 of 96 other images kept eager's top-1, against 94
        # without: docs/benchmarks.md).
        import onnx

        from hub.runtimes.onnx_folding import fold_scales_into_conv

        model = onnx.load(str(prepared))
        if fold_scales_into_conv(model):
            onnx.save(model, str(prepared))


class _CalibrationReader:
    """Feeds the spec's calibration inputs (after `preprocess`) to ONNX Runtime's calibrator a
    row at a time. With "minmax" a padded row is trimmed to its own length, as when served
    alone; the histogram methods stack what they observe, so their rows keep one shape."""

    def __init__(self, spec: ModelSpec) -> None:
        from hub.pipeline.invariance import rows_of

        _, inputs = spec.calibration()
        forward = spec.to_forward(inputs)
        self._batches = iter(rows_of(spec, forward, trim=spec.calibration_method == "minmax"))

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _build_onnx_int8_dynamic(ctx: ArtifactContext) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp32 = ctx.directory / FILENAME
    export_onnx(ctx.module(), ctx.spec, str(fp32), "onnx-int8-dynamic")
    # Conv quantisation made a small CNN 3x slower on CPU (STACK-NOTES); MatMul/Gemm pay off.
    quantize_dynamic(
        str(fp32),
        str(ctx.directory / INT8_DYNAMIC_FILENAME),
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=_excluded_nodes(ctx, str(fp32)),
    )
    fp32.unlink()


def _excluded_nodes(ctx: ArtifactContext, path: str) -> list[str]:
    """ONNX nodes of the modules named by the spec's `int8_exclude` option (torch module paths,
    glob patterns: "encoder.layer.*.intermediate.dense"), which stay fp32.

    Patterns name torch modules, not ONNX nodes, because node names are the exporter's own and
    change between torch releases; the exporter records each node's module path in its
    `pkg.torch.onnx.name_scopes` metadata.
    """
    import ast
    import fnmatch

    import onnx

    patterns = [str(p) for p in ctx.spec.options.get("int8_exclude", ())]
    if not patterns:
        return []
    graph = onnx.load(path, load_external_data=False).graph
    excluded: list[str] = []
    used: set[str] = set()
    for node in graph.node:
        scopes: list[str] = next(
            (ast.literal_eval(p.value) for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), []
        )
        module = scopes[-2] if len(scopes) > 1 else ""  # the last scope is the op itself
        hits = [p for p in patterns if fnmatch.fnmatchcase(module, p)]
        if hits:
            excluded.append(node.name)
            if node.op_type == "Gemm":  # the dynamic quantiser rewrites a Gemm as <name>_MatMul + Add
                excluded.append(f"{node.name}_MatMul")
            used.update(hits)
    unmatched = [p for p in patterns if p not in used]
    if unmatched:
        raise BuildError(f"model '{ctx.spec.name}': option int8_exclude: {unmatched} match no module of the export")
    log.info("model '%s': onnx-int8 keeps %d nodes fp32 (int8_exclude)", ctx.spec.key, len(excluded))
    return excluded


def _load_onnx_int8(ctx: ArtifactContext) -> Runtime:
    return OnnxRuntime(str(ctx.directory / INT8_FILENAME), ctx.spec, ctx.device, ctx.threads)


def _load_onnx_int8_dynamic(ctx: ArtifactContext) -> Runtime:
    return OnnxRuntime(str(ctx.directory / INT8_DYNAMIC_FILENAME), ctx.spec, ctx.device, ctx.threads)


# --- onnx-fp16, onnx-bf16 ----------------------------------------------------------------------
#
# How: export an fp16/bf16 copy of the module, with hooks that cast its floating inputs in and
# its floating outputs back to the spec's datatypes, through the same export_onnx as the onnx
# target. The exporter then types every weight and intermediate itself, puts the Casts at the
# graph's edges and keeps the dynamic dims. (Hooks, not a wrapper module: the copy keeps the
# module's own forward signature, which export_onnx's dynamic shapes follow.) Rewriting the
# fp32 graph afterwards (onnx's float16 converters) re-types ops and constants by heuristics,
# and does not do bf16 at all.

#: The half-precision targets' suffixes, as torch dtype names.
HALF_ONNX_FILENAMES = {"fp16": "model.fp16.onnx", "bf16": "model.bf16.onnx"}
#: ONNX types Conv, MaxPool, AveragePool... for bfloat16 only from opset 22; the exporter writes
#: opset 18 (torchlib's), so a bf16 graph is converted up the way torch.onnx does it itself.
BF16_OPSET = 22
_TORCH_FLOATS = {"FP16": "float16", "FP32": "float32", "FP64": "float64", "BF16": "bfloat16"}


def _half_module(module: Any, spec: ModelSpec, dtype_name: str) -> Any:
    """A copy of `module` in fp16/bf16 that takes and returns the spec's datatypes."""
    import torch

    compute = getattr(torch, HALF_DTYPES[dtype_name])
    names = [t.name for t in spec.forward_outputs]
    served = {t.name: getattr(torch, _TORCH_FLOATS.get(t.datatype, "float32")) for t in spec.forward_outputs}

    def cast_in(_: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        # Only floating inputs: UINT8 pixels or INT64 token ids stay what they are.
        return tuple(a.to(compute) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)

    def cast_out(_: Any, __: Any, result: Any) -> Any:
        def out(name: str, value: torch.Tensor) -> torch.Tensor:
            return value.to(served[name]) if value.is_floating_point() else value

        if isinstance(result, torch.Tensor):
            return out(names[0], result)
        if isinstance(result, Mapping):
            return {name: out(name, result[name]) for name in names}
        return tuple(out(name, value) for name, value in zip(names, result, strict=True))

    # .to(dtype) works in place: convert a copy, the eager module stays the reference.
    half = copy.deepcopy(module).to(compute).eval()
    half.register_forward_pre_hook(cast_in)
    half.register_forward_hook(cast_out)
    return half


def export_half_onnx(module: Any, spec: ModelSpec, path: str, dtype_name: str) -> None:
    """Export `module` with fp16 or bf16 weights and compute and the spec's datatypes at the
    graph's inputs and outputs; checked with onnx.checker. Runs on CPU (nothing is computed)."""
    import onnx

    export_onnx(_half_module(module, spec, dtype_name), spec, path, f"onnx-{dtype_name}")
    if dtype_name == "bf16":
        from onnxscript import ir
        from onnxscript.version_converter import convert_version

        model = ir.load(path)
        convert_version(model, BF16_OPSET)
        ir.save(model, path)
    where = f"model '{spec.name}': target 'onnx-{dtype_name}'"
    try:
        onnx.checker.check_model(path, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise BuildError(f"{where}: the exported graph is not valid ONNX: {exc}") from None
    graph = onnx.load(path, load_external_data=False).graph
    declared = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    for tensor in (*spec.forward_inputs, *spec.forward_outputs):
        elem_type = declared.get(tensor.name)
        if elem_type is not None and onnx.helper.tensor_dtype_to_np_dtype(elem_type) != tensor.dtype:
            raise BuildError(
                f"{where}: graph tensor '{tensor.name}' is {onnx.TensorProto.DataType.Name(elem_type)}, "
                f"the spec declares {tensor.datatype}"
            )


def _needs_cuda_onnxruntime(ctx: ArtifactContext, target: str) -> None:
    """Refuse, before any work, where the half-precision graph cannot run on CUDA."""
    import onnxruntime as ort

    where = f"model '{ctx.spec.name}': target '{target}'"
    if ctx.device != "cuda":
        raise TargetUnavailable(
            f"{where} needs a CUDA device and onnxruntime-gpu; this server runs on {ctx.device} "
            f"(use onnx or onnx-int8 there)"
        )
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise TargetUnavailable(
            f"{where} needs onnxruntime-gpu with CUDAExecutionProvider; this onnxruntime "
            f"{ort.__version__} offers {available} (install onnxruntime-gpu in place of onnxruntime)"
        )


def _build_onnx_half(dtype_name: str) -> Callable[[ArtifactContext], None]:
    def build(ctx: ArtifactContext) -> None:
        _needs_cuda_onnxruntime(ctx, f"onnx-{dtype_name}")
        export_half_onnx(ctx.module(), ctx.spec, str(ctx.directory / HALF_ONNX_FILENAMES[dtype_name]), dtype_name)

    return build


def _load_onnx_half(dtype_name: str) -> Callable[[ArtifactContext], Runtime]:
    def load(ctx: ArtifactContext) -> Runtime:
        target = f"onnx-{dtype_name}"
        _needs_cuda_onnxruntime(ctx, target)
        path = str(ctx.directory / HALF_ONNX_FILENAMES[dtype_name])
        try:
            runtime = OnnxRuntime(path, ctx.spec, ctx.device, ctx.threads)
        except Exception as exc:
            if "NOT_IMPLEMENTED" not in str(exc):
                raise
            # No CUDA kernel for an op in this dtype, and none on the CPU provider to fall back to.
            raise BuildError(
                f"model '{ctx.spec.name}': target '{target}': this onnxruntime has no {dtype_name} kernel for an "
                f"op of the model ({exc}); use onnx-fp16 or torch-{dtype_name}"
            ) from None
        if runtime.device != "cuda":
            runtime.close()
            raise BuildError(
                f"model '{ctx.spec.name}': target '{target}': onnxruntime's CUDAExecutionProvider did not start "
                f"(see onnxruntime's log: CUDA and cuDNN libraries)"
            )
        return runtime

    return load


@hookimpl(trylast=True)  # a default: a plugin's target of the same name is called first and wins
def register_targets(register: Callable[[Target], None]) -> None:
    register(
        Target(
            "onnx-int8",
            _build_onnx_int8,
            _load_onnx_int8,
            "ONNX Runtime, static int8 (QDQ, Conv included), calibrated",
            platform="onnxruntime_onnx",
            tolerance=QUANTISED,
            artifact=INT8_FILENAME,
            calibrated=True,
        )
    )
    register(
        Target(
            "onnx-int8-dynamic",
            _build_onnx_int8_dynamic,
            _load_onnx_int8_dynamic,
            "ONNX Runtime, dynamic int8 (MatMul/Gemm; activation scales per batch)",
            platform="onnxruntime_onnx",
            tolerance=QUANTISED,
            artifact=INT8_DYNAMIC_FILENAME,
        )
    )
    for dtype in ("fp16", "bf16"):
        register(
            Target(
                f"onnx-{dtype}",
                _build_onnx_half(dtype),
                _load_onnx_half(dtype),
                f"ONNX Runtime {dtype} on CUDA (onnxruntime-gpu)",
                platform="onnxruntime_onnx",
                tolerance=HALF,
                artifact=HALF_ONNX_FILENAMES[dtype],
            )
        )
