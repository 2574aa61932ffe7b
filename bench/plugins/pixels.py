"""Benchmark plugin: "pixels", a ResNet-50-sized input (UINT8 224x224x3, 150,528 bytes) with
next to no compute (the per-channel mean, 12 bytes out). Served beside resnet in `make bench`'s
shared-memory section, it prices what carrying an image through the gRPC socket costs the
server, which resnet's own compute (tens of ms on this box) would hide."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl


class ChannelMean(torch.nn.Module):
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image.float().mean(dim=(1, 2))


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    rng = np.random.default_rng(0)
    register(
        ModelSpec(
            name="pixels",
            build=ChannelMean,
            inputs=[TensorSpec("image", "UINT8", (-1, 224, 224, 3))],
            outputs=[TensorSpec("mean", "FP32", (-1, 3))],
            example_inputs={"image": rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)},
            target="onnx",
            batching=BatchPolicy(max_batch_size=8),
        )
    )
