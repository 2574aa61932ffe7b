"""The digits CNN: 8x8 grey images with raw pixel values 0-16 in, 10 logits out."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("digits.safetensors")


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # Clients send sklearn's raw pixel values (0-16); normalising here keeps that contract.
        return self.classifier(self.features(image / 16.0))


def load_tensors() -> dict[str, torch.Tensor]:
    """Weights and the held-out split, from safetensors: no unpickling, ever."""
    from safetensors.torch import load_file

    return load_file(str(WEIGHTS))


def load_model() -> DigitsCNN:
    tensors = load_tensors()
    model = DigitsCNN()
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    return model.eval()
