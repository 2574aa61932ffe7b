"""Benchmark plugin: the peer kit's reference models (../shared/bench/refmodels.py), served under
the names and tensor names every peer uses, so `make bench` compares like with like.

REFMODELS_DIR points at the kit (default: ../shared/bench beside this checkout).
MODELHUB_BENCH_TARGET picks the target (default onnx; "torch" serves eager, as the peers do).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np

from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

KIT = Path(os.environ.get("REFMODELS_DIR", Path(__file__).resolve().parents[3] / "shared" / "bench"))


def _kit() -> ModuleType:
    spec = importlib.util.spec_from_file_location("peer_refmodels", KIT / "refmodels.py")
    if spec is None or spec.loader is None:
        raise ImportError(f"no refmodels.py in {KIT}; set REFMODELS_DIR")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    kit = _kit()
    target = os.environ.get("MODELHUB_BENCH_TARGET", "onnx")
    rng = np.random.default_rng(0)
    for name, (in_shape, out_shape) in kit.SHAPES.items():
        register(
            ModelSpec(
                name=name,
                build=lambda name=name: kit.build(name),
                inputs=[TensorSpec(kit.INPUT_NAME, "FP32", (-1, *in_shape))],
                outputs=[TensorSpec(kit.OUTPUT_NAME, "FP32", (-1, *out_shape))],
                example_inputs={kit.INPUT_NAME: rng.standard_normal((4, *in_shape)).astype(np.float32)},
                target=target,
                weights=[KIT / "refmodels.py"],
                batching=BatchPolicy(max_batch_size=64),
            )
        )
