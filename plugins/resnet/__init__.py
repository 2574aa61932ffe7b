"""The resnet plugin: a ResNet-50 image classifier, the GPU throughput workload.

Served contract (clients rely on it):
- input `image`, UINT8 [-1, 224, 224, 3]: HWC, RGB, 0-255, so clients send compact bytes; the
  model graph casts, permutes to NCHW and normalises with the ImageNet mean and std;
- output `logits`, FP32 [-1, 1000].

The weights are random from a fixed seed, made numerically sane (see model.py): the figures it
gives are ResNet-50-class compute, not ImageNet accuracy. There are no labels.

Target: "torch-compile" (Inductor, one compile with a dynamic batch dim, a CUDA graph per batch
bucket) when torch sees a GPU, else "onnx" (ONNX Runtime). It is chosen when the plugin
registers, from torch.cuda.is_available(), not from `--device`: a server on a GPU machine started
with `--device cpu` should name a target. A deployment config (`--config`) overrides it per model:

    [models.resnet]
    target = "onnx-int8"

The built-in onnx-int8 is static QDQ int8, Conv included, calibrated on the 16 validation images
(the default calibration data); onnx-int8-dynamic quantises only the final Linear. Every target
is checked against eager on those 16 images with the target's default tolerance (onnx-int8:
top-1 agreement >= 0.95; fp16/bf16: >= 0.99), and for batch invariance: each of the first,
brightest and darkest image alone against inside a batch of 128 and a pair.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

from .model import build_model, example_images, validation_images


def example_inputs() -> dict[str, np.ndarray]:
    return {"image": example_images(4)}


def validation_data() -> tuple[dict[str, np.ndarray], None]:
    return {"image": validation_images(16)}, None


def default_target() -> str:
    import torch

    return "torch-compile" if torch.cuda.is_available() else "onnx"


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    register(
        ModelSpec(
            name="resnet",
            version=1,
            description="ResNet-50 (random fixed-seed weights), 224x224 RGB uint8 images, 1000 logits",
            build=build_model,
            inputs=[TensorSpec("image", "UINT8", (-1, 224, 224, 3))],
            outputs=[TensorSpec("logits", "FP32", (-1, 1000))],
            example_inputs=example_inputs,
            validation_data=validation_data,
            target=default_target(),
            # The throughput workload: batches of up to 128 images, a short wait (2 ms) for a
            # batch to fill while the GPU is busy anyway.
            batching=BatchPolicy(max_batch_size=128, max_queue_delay=0.002, preferred_batch_sizes=(16, 32, 64, 128)),
        )
    )
