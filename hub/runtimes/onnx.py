"""Built-in plugin "onnx": export with torch.onnx (dynamic batch and variable dims) and serve
with ONNX Runtime, on the CUDA execution provider when it is installed and asked for."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from hub.errors import BuildError, exception_line
from hub.plugins.hookspecs import hookimpl
from hub.plugins.manager import raised_in
from hub.runtimes.tolerances import FP32
from hub.spec import ArtifactContext, ModelSpec, Runtime, Target

log = logging.getLogger("modelhub.onnx")

FILENAME = "model.onnx"
OPSET = 18


def export_onnx(module: Any, spec: ModelSpec, path: str, target: str = "onnx") -> None:
    """torch.onnx.export (the dynamo exporter) with every -1 dimension declared dynamic; a
    failure is a BuildError in a line, naming the model and `target` (export_failure)."""
    import torch

    from hub.runtimes.tensors import to_tensor

    examples = spec.forward_examples()
    if spec.batching.batching:
        # torch.export specialises a dimension of size 1; give the batch at least two rows.
        examples = {
            name: np.concatenate([value, value]) if value.shape[0] == 1 else value for name, value in examples.items()
        }
    tensors = spec.forward_inputs
    args = tuple(to_tensor(examples[t.name], "cpu") for t in tensors)
    dynamic_shapes = tuple(
        {axis: torch.export.Dim.DYNAMIC for axis, size in enumerate(t.shape) if size == -1} or None for t in tensors
    )
    with warnings.catch_warnings():
        # The exporter warns about its own internals (treespec deprecations); not actionable here.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                module,
                args,
                path,
                input_names=[t.name for t in spec.forward_inputs],
                output_names=[t.name for t in spec.forward_outputs],
                dynamic_shapes=dynamic_shapes,
                opset_version=OPSET,
                dynamo=True,
                external_data=False,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:
            raise export_failure(spec, target, exc) from exc
    _drop_weight_shapes(path)


def export_failure(spec: ModelSpec, target: str, exc: BaseException) -> BuildError:
    """torch.onnx.export's failure in a line: the innermost cause (the exporter wraps it in pages
    of next steps, in terminal colours), where in the plugin's files it was raised, and what
    to do. The whole traceback goes to the log at DEBUG."""
    log.debug("model '%s': torch.onnx.export failed", spec.key, exc_info=exc)
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    where = raised_in(cause, spec.sources) or raised_in(exc, spec.sources)
    summary = exception_line(cause)
    if "inferred a static shape" in summary:  # torch.export's word for a -1 dim the model fixes
        summary += " (the model fixes a dimension the spec declares -1: a view or reshape with a literal size?)"
    return BuildError(
        f"model '{spec.name}': building target '{target}' failed: torch.onnx.export could not export the model: "
        f"{summary}{where}. The eager model ran on the example inputs: make it exportable "
        f"(https://pytorch.org/docs/stable/generated/exportdb/index.html), or serve it with a target that needs "
        f"no export ('torch', 'torch-compile'); --log-level debug logs the exporter's traceback"
    )


def _drop_weight_shapes(path: str) -> None:
    """Drop the graph's shape records (value_info) of its weights: an initializer carries its own
    shape. With torch 2.11 (the GPU image's) and ONNX Runtime 1.30, the quantiser's strict shape
    inference refused the exporter's model over them ("Inferred shape and existing shape differ
    in dimension 0: (512) vs (64)" for digits), so no int8 target built; without them it builds.
    Newer releases pass either way, and the model computes the same."""
    import onnx

    model = onnx.load(path)
    weights = {initializer.name for initializer in model.graph.initializer}
    records = [info for info in model.graph.value_info if info.name in weights]
    if records:
        for info in records:
            model.graph.value_info.remove(info)
        onnx.save(model, path)


def session_options(threads: int) -> object:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Spinning threads burn the cores the gRPC loop needs; block instead.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def providers(device: str) -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        log.warning("device is cuda but onnxruntime has no CUDAExecutionProvider; using CPU")
    return ["CPUExecutionProvider"]


class OnnxRuntime:
    """An ONNX Runtime session; `run` releases the GIL while it computes."""

    def __init__(self, path: str, spec: ModelSpec, device: str, threads: int) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(path, sess_options=session_options(threads), providers=providers(device))
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self._outputs = [t.name for t in spec.forward_outputs]
        declared = {i.name for i in self.session.get_inputs()}
        missing = [t.name for t in spec.forward_inputs if t.name not in declared]
        if missing:
            raise BuildError(f"model '{spec.name}': {path} lacks inputs {missing}")

        # On the CPU provider, the session's binding itself: InferenceSession.run checks that
        # every input is fed (the batcher feeds exactly the spec's inputs, checked against the
        # graph above), that OrtValues are owned (we feed numpy) and the WebGPU capture mode,
        # and falls back on an execution-provider failure (there is none to fall back from).
        # Those checks cost ~10 µs per call (digits' batch of 1, warm: 28 against 18 µs, 2-core Xeon).
        binding = getattr(self.session, "_sess", None)
        self._run = binding.run if self.device == "cpu" and binding is not None else None

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._run is not None:
            results = self._run(self._outputs, dict(inputs), None)
        else:
            results = self.session.run(self._outputs, dict(inputs))
        return dict(zip(self._outputs, results, strict=True))

    def close(self) -> None:
        del self.session


def _build(ctx: ArtifactContext) -> None:
    export_onnx(ctx.module(), ctx.spec, str(ctx.directory / FILENAME))


def _load(ctx: ArtifactContext) -> Runtime:
    return OnnxRuntime(str(ctx.directory / FILENAME), ctx.spec, ctx.device, ctx.threads)


@hookimpl(trylast=True)  # a default: a plugin's target of the same name is called first and wins
def register_targets(register: Callable[[Target], None]) -> None:
    register(
        Target(
            name="onnx",
            build=_build,
            load=_load,
            description="torch.onnx export, ONNX Runtime with full graph optimisation",
            platform="onnxruntime_onnx",
            tolerance=FP32,
            artifact=FILENAME,
        )
    )
