"""Test plugin: models whose spec postprocesses the batched forward's outputs per request (in
each frontend process with --workers N): scores in, a BYTES label and the INT64 argmax out."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Mapping

import numpy as np
import torch

from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

LABELS = ("cat", "dog", "bird")
#: A score below this makes `_label` fail as a bug would (not ValueError).
CRASH_BELOW = -1000.0
#: Scores above this make `_label_with_a_bug` return a wrong shape, below -BUG_ABOVE a wrong name.
BUG_ABOVE = 100.0
#: The threads the latest calls of `_label` ran in (a test checks none is the event loop's).
THREADS: collections.deque[str] = collections.deque(maxlen=64)


class Scores(torch.nn.Module):
    """Logits: twice the input (so a test knows the argmax of any row it sends)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


def _label(outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    THREADS.append(threading.current_thread().name)
    logits = outputs["logits"]
    if np.isnan(logits).any():
        raise ValueError("cannot label a row whose scores are NaN")
    if (logits < CRASH_BELOW * 2).any():
        raise RuntimeError("secret detail of the crash")
    index = logits.argmax(1).astype(np.int64)
    # str elements in an object array: the hub sends them as UTF-8 BYTES.
    return {"label": np.array([LABELS[i] for i in index], dtype=object), "index": index}


def _label_with_a_bug(outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Right on the example inputs; wrong for scores the examples never reach."""
    served = _label(outputs)
    logits = outputs["logits"]
    if (logits > BUG_ABOVE * 2).any():
        served["index"] = served["index"].reshape(-1, 1)
    if (logits < -BUG_ABOVE * 2).any():
        served["argmax"] = served.pop("index")
    return served


def _label_named_index(outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _label({"logits": outputs["index"]})


def spec(
    name: str,
    postprocess: Callable[[dict[str, np.ndarray]], Mapping[str, np.ndarray]],
    target: str,
    model_output: str = "logits",
) -> ModelSpec:
    return ModelSpec(
        name=name,
        build=lambda: Scores().eval(),
        inputs=[TensorSpec("x", "FP32", (-1, len(LABELS)))],
        model_outputs=[TensorSpec(model_output, "FP32", (-1, len(LABELS)))],
        postprocess=postprocess,
        outputs=[TensorSpec("label", "BYTES", (-1,)), TensorSpec("index", "INT64", (-1,))],
        example_inputs={"x": np.array([[0.1, 0.9, 0.0], [1.0, 0.0, 0.5]], np.float32)},
        target=target,
        batching=BatchPolicy(max_batch_size=8, max_queue_delay=0.1),
    )


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    # onnx: the export names its outputs after model_outputs, and parity is checked on logits.
    register(spec("labeller", _label, "onnx"))
    register(spec("labeller_buggy", _label_with_a_bug, "torch"))
    # The model's output and a served one share a name (and not a datatype or a size): only the
    # served one may reach a client's shared memory.
    register(spec("labeller_same_name", _label_named_index, "torch", model_output="index"))
