"""Test plugin: a third-party target ("numpy", models written as plain numpy functions) and
identity-style models that round-trip every V2 datatype."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import ml_dtypes
import numpy as np

from hub import ArtifactContext, BatchPolicy, ModelSpec, Runtime, Target, TensorSpec, hookimpl

DATATYPES = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BF16", "BYTES",
]  # fmt: skip


class NumpyRuntime:
    device = "cpu"

    def __init__(self, function: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]) -> None:
        self.function = function

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.function(inputs)

    def close(self) -> None:
        pass


def _build(ctx: ArtifactContext) -> None:
    ctx.module()


def _load(ctx: ArtifactContext) -> Runtime:
    return NumpyRuntime(ctx.module())


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    """Deterministic values that every datatype represents exactly."""
    count = int(np.prod(shape))
    values = np.arange(count).reshape(shape)
    if datatype == "BYTES":
        flat = np.array([f"s{i}-é".encode() for i in range(count)], dtype=np.object_)
        return flat.reshape(shape)
    if datatype == "BOOL":
        return values % 2 == 0
    if datatype == "BF16":
        return values.astype(ml_dtypes.bfloat16)
    dtype = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}.get(datatype)
    if dtype is not None:
        return (values * 0.5 - 1).astype(dtype)
    return (values + (0 if datatype.startswith("U") else -2)).astype(datatype.lower())


@hookimpl
def register_targets(register: Callable[[Target], None]) -> None:
    register(Target(name="numpy", build=_build, load=_load, check_parity=False, description="plain numpy function"))


def _identity() -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    return lambda inputs: {"OUTPUT0": inputs["INPUT0"]}


def _addsub() -> Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    return lambda i: {"SUM": i["INPUT0"] + i["INPUT1"], "DIFF": i["INPUT0"] - i["INPUT1"]}


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    for datatype in DATATYPES:
        register(
            ModelSpec(
                name=f"identity_{datatype.lower()}",
                build=_identity,
                inputs=[TensorSpec("INPUT0", datatype, (-1, -1))],
                outputs=[TensorSpec("OUTPUT0", datatype, (-1, -1))],
                example_inputs={"INPUT0": sample(datatype)},
                target="numpy",
                batching=BatchPolicy(max_batch_size=8),
            )
        )
    register(
        ModelSpec(
            name="addsub",
            build=_addsub,
            inputs=[TensorSpec("INPUT0", "FP32", (-1, 4)), TensorSpec("INPUT1", "FP32", (-1, 4))],
            outputs=[
                TensorSpec("SUM", "FP32", (-1, 4), labels=("a", "b", "c", "d")),
                TensorSpec("DIFF", "FP32", (-1, 4)),
            ],
            example_inputs={"INPUT0": np.ones((1, 4), np.float32), "INPUT1": np.ones((1, 4), np.float32)},
            target="numpy",
            batching=BatchPolicy(max_batch_size=16),
        )
    )
    register(
        ModelSpec(
            name="nobatch",
            build=_identity,
            inputs=[TensorSpec("INPUT0", "INT32", (2, 3))],
            outputs=[TensorSpec("OUTPUT0", "INT32", (2, 3))],
            example_inputs={"INPUT0": np.zeros((2, 3), np.int32)},
            target="numpy",
        )
    )
