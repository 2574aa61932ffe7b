"""The digits plugin: a small CNN for scikit-learn's 8x8 handwritten digits.

Served contract (clients rely on it):
- input `image`, FP32 [-1, 1, 8, 8]: raw pixel values 0-16, exactly as
  `sklearn.datasets.load_digits().images` gives them (the model normalises);
- output `logits`, FP32 [-1, 10].

Weights come from `train.py` (committed as digits.safetensors, with the held-out split).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hub import BatchPolicy, ModelSpec, TensorSpec, hookimpl

from .model import load_model, load_tensors


def heldout() -> tuple[np.ndarray, np.ndarray]:
    """The held-out images as FP32 [n, 1, 8, 8] (pixel values 0-16) and their labels."""
    tensors = load_tensors()
    images = tensors["heldout.images"].numpy().astype(np.float32)[:, None, :, :]
    return images, tensors["heldout.labels"].numpy()


def validation_data() -> tuple[dict[str, np.ndarray], np.ndarray]:
    images, labels = heldout()
    return {"image": images}, labels


def example_inputs() -> dict[str, np.ndarray]:
    images, _ = heldout()
    return {"image": images[:16]}


@hookimpl
def register_models(register: Callable[[ModelSpec], None]) -> None:
    register(
        ModelSpec(
            name="digits",
            version=1,
            description="8x8 handwritten digits (scikit-learn), small CNN, 97% held-out accuracy",
            build=load_model,
            inputs=[TensorSpec("image", "FP32", (-1, 1, 8, 8))],
            outputs=[TensorSpec("logits", "FP32", (-1, 10))],
            example_inputs=example_inputs,
            validation_data=validation_data,
            target="onnx",
            # No queue delay: a request never waits while an instance is idle, and batches form on
            # their own while one is busy. Deployments that want fuller batches set a delay.
            batching=BatchPolicy(max_batch_size=64, preferred_batch_sizes=(16, 32, 64)),
        )
    )
