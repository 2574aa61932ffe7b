"""ONNX graph rewrites that onnx-int8 applies before quantising, with the spec option
`int8_fold_scales`: exact in real arithmetic, each removes an op that int8 serves slowly.

`fold_scales_into_conv`: a Mul (or Div) by a per-channel constant whose only consumers are
Convs takes its place in their weights: conv(W, pad0(y * s)) = conv(W * s, pad0(y)), since zero
padding commutes with a per-channel scale. The case it is for: an image model's input
normalisation, (x - mean) * inv_std, before its first convolution. Quantised, that Mul becomes
a QLinearMul that ORT runs after its NHWC rewrite, broadcasting a 3-element scale over the
innermost axis, element by element: 7 ms of resnet's ~105 ms at batch 1 (ORT's profiler,
docs/benchmarks.md), where the folded graph spends nothing. The mean (a Sub) does not fold:
zero padding does not commute with a shift.

Why it is an option and not the default: exact in fp32, it changes where int8 rounds. On
resnet it made int8 1.18x faster at batch 1, but kept eager's top-1 on 90 of 96 images outside
the validation set where the unfolded graph kept 94 (both 16/16 on the validation images; the
logits' RMS error 0.203 against 0.198).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger("modelhub.onnx")


def fold_scales_into_conv(model: object) -> int:
    """Fold, in place, every Mul/Div by a constant per-input-channel (or scalar) scale whose
    output only Convs read (as their input, group 1, each with a weight initializer of its own)
    into those Convs' weights. Returns how many were folded."""
    import onnx
    from onnx import numpy_helper

    assert isinstance(model, onnx.ModelProto)
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in graph.output}
    folded: list[onnx.NodeProto] = []
    for node in list(graph.node):
        if node.op_type not in ("Mul", "Div") or len(node.input) != 2:
            continue
        # Div only by a constant divisor; Mul by a constant on either side.
        sides = [1] if node.op_type == "Div" else [1, 0]
        side = next((s for s in sides if node.input[s] in initializers and node.input[1 - s] not in initializers), None)
        if side is None:
            continue
        scale = numpy_helper.to_array(initializers[node.input[side]]).astype(np.float64)
        convs = readers[node.output[0]]
        if node.output[0] in outputs or not convs or not all(_foldable(c, node.output[0], readers) for c in convs):
            continue
        weights = [numpy_helper.to_array(initializers[c.input[1]]) for c in convs]
        channels = weights[0].shape[1]
        per_channel = _per_channel(scale, channels, weights[0].ndim)
        if per_channel is None or any(w.shape[1] != channels or w.dtype != np.float32 for w in weights):
            continue
        if node.op_type == "Div":
            per_channel = 1.0 / per_channel
        shape = (1, channels) + (1,) * (weights[0].ndim - 2)
        for conv, weight in zip(convs, weights, strict=True):
            scaled = (weight.astype(np.float64) * per_channel.reshape(shape)).astype(np.float32)
            initializers[conv.input[1]].CopyFrom(numpy_helper.from_array(scaled, conv.input[1]))
            conv.input[0] = node.input[1 - side]
        graph.node.remove(node)
        folded.append(node)
    still_read = {name for node in graph.node for name in node.input}
    for node in folded:
        constant = next(name for name in node.input if name in initializers)
        if constant not in still_read and constant not in outputs:
            graph.initializer.remove(initializers[constant])
    if folded:
        log.info("folded %d constant scale(s) into Conv weights: %s", len(folded), [n.name for n in folded])
    return len(folded)


def _foldable(conv: Any, tensor: str, readers: Mapping[str, Sequence[Any]]) -> bool:
    """A plain Conv reading `tensor` as its data input only, whose weight nothing else reads."""
    import onnx

    assert isinstance(conv, onnx.NodeProto)
    if conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or len(conv.input) < 2:
        return False
    group = next((onnx.helper.get_attribute_value(a) for a in conv.attribute if a.name == "group"), 1)
    return group == 1 and conv.input[0] == tensor and tensor not in conv.input[1:] and len(readers[conv.input[1]]) == 1


def _per_channel(scale: np.ndarray, channels: int, ndim: int) -> np.ndarray | None:
    """`scale` as one factor per channel of an NC... tensor of `ndim` dims, or None when it
    scales anything but whole channels (a spatial or batch pattern)."""
    if scale.size == 1:
        return np.full(channels, float(scale.reshape(-1)[0]))
    if scale.ndim > ndim:
        return None
    full = (1,) * (ndim - scale.ndim) + scale.shape  # numpy broadcasting aligns on the right
    if full[1] != channels or any(d != 1 for i, d in enumerate(full) if i != 1):
        return None
    return scale.reshape(channels)
