"""numpy <-> torch conversions and batch helpers that the built-in runtimes share (and a plugin's may use)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
import torch

from hub.errors import BuildError

#: The half-precision targets' suffixes, as torch dtype names.
HALF_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def to_tensor(array: np.ndarray, device: str) -> torch.Tensor:
    """numpy -> torch without a Python-level copy where torch can share the buffer. A tensor
    already on the device (an input in CUDA shared memory) is used as it is."""
    if isinstance(array, torch.Tensor):
        return array.to(device, non_blocking=True)
    if array.dtype == np.object_:
        raise BuildError("BYTES tensors cannot be passed to a torch module; preprocess them first")
    if not array.flags.writeable:  # frombuffer views of request bytes: torch wants writable memory
        array = array.copy()
    if array.dtype == ml_dtypes.bfloat16:
        tensor = torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.to(device, non_blocking=True) if device != "cpu" else tensor


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """torch -> numpy on the CPU, keeping the dtype (bfloat16 as ml_dtypes.bfloat16)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def as_outputs(result: Any, names: Sequence[str], model: str = "") -> dict[str, torch.Tensor]:
    """A module's result (one tensor, a tuple or a mapping) as {output name: tensor}, in the
    spec's order. BuildError, naming what the module returned and what the spec declares, when
    they do not match (`model` names the model in the message)."""
    where = f"model '{model}'" if model else "model"
    if isinstance(result, torch.Tensor):
        result = (result,)
    if isinstance(result, Mapping):
        missing = [name for name in names if name not in result]
        if missing:
            raise BuildError(
                f"{where}: forward returned outputs {sorted(map(str, result))}, the spec declares {list(names)} "
                f"(missing {missing}); rename the returned keys or the spec's outputs to match"
            )
        return {name: result[name] for name in names}
    if not isinstance(result, (tuple, list)):  # a numpy array has a len too: its rows, not its outputs
        raise BuildError(
            f"{where}: forward returned a {type(result).__module__}.{type(result).__name__}; return a torch.Tensor, "
            f"a tuple of them in the order of the spec's outputs {list(names)}, or a dict keyed by those names"
        )
    if len(result) != len(names):
        raise BuildError(
            f"{where}: forward returned {len(result)} outputs, the spec declares {len(names)}: {list(names)}"
        )
    strays = [
        f"{name} ({type(value).__name__})"
        for name, value in zip(names, result, strict=True)
        if not isinstance(value, torch.Tensor)
    ]
    if strays:
        raise BuildError(f"{where}: forward returned outputs that are not torch tensors: {', '.join(strays)}")
    return dict(zip(names, result, strict=True))


def check_no_bytes(spec: Any) -> None:
    """BuildError naming the tensor when a torch module would have to take or return BYTES:
    text goes through the spec's `preprocess`, and class names through `TensorSpec.labels`."""
    for tensor in spec.forward_inputs:
        if tensor.datatype == "BYTES":
            raise BuildError(
                f"model '{spec.name}': input '{tensor.name}' is BYTES, which a torch module cannot take; give the "
                f"spec a preprocess that turns it into numeric model_inputs (plugins/embeddings tokenises text so)"
            )
    for tensor in spec.forward_outputs:
        if tensor.datatype == "BYTES" and spec.postprocess is not None:
            raise BuildError(
                f"model '{spec.name}': model output '{tensor.name}' is BYTES, which a torch module cannot return; "
                f"return numbers (scores, class indices) and let postprocess turn them into text"
            )
        if tensor.datatype == "BYTES":
            raise BuildError(
                f"model '{spec.name}': output '{tensor.name}' is BYTES, which a torch module cannot return; return "
                f"scores or class indices, and name the classes with TensorSpec(..., labels=[...]) for clients that "
                f"ask for the classification extension"
            )


def check_argument_order(module: Any, spec: Any) -> None:
    """BuildError when `module`'s forward names its parameters after the spec's inputs but in
    another order: the hub passes the inputs positionally, in the order of the spec, so
    forward(input_ids, attention_mask) with inputs [attention_mask, input_ids] would compute on
    swapped tensors without an error (and eager, the parity reference, swaps them too)."""
    forward = getattr(module, "forward", module)
    try:
        parameters = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [t.name for t in spec.forward_inputs]
    params = [p.name for p in parameters if p.kind in positional]
    if not set(names) <= set(params) or len(names) < 2:
        return
    order = [name for name in params if name in names]
    if order != names:
        what = "model_inputs" if spec.preprocess is not None else "inputs"
        raise BuildError(
            f"model '{spec.name}': forward takes ({', '.join(params)}) but the spec's {what} are "
            f"{names}: the hub passes them positionally in the spec's order, so they would arrive swapped; "
            f"declare the {what} in forward's order"
        )


def tile(examples: Mapping[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """The examples repeated (or cut) to `rows` rows along the batch dimension; 0 leaves them as they are."""
    if rows == 0:
        return dict(examples)
    return {k: np.resize(v, (rows, *v.shape[1:])) for k, v in examples.items()}
