"""Train the digits CNN on scikit-learn's bundled 8x8 digits and write digits.safetensors.

    .venv/bin/python plugins/digits/train.py

The held-out split's indices are saved beside the weights, so tests and the plugin's
validation use exactly the images the model never saw.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from model import WEIGHTS, DigitsCNN

SEED = 0
EPOCHS = 20


def main() -> None:
    torch.manual_seed(SEED)
    digits = load_digits()
    indices = np.arange(len(digits.images))
    train_idx, test_idx = train_test_split(indices, test_size=0.2, random_state=SEED, stratify=digits.target)
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)  # raw 0-16 values
    labels = torch.tensor(digits.target, dtype=torch.int64)
    loader = DataLoader(TensorDataset(images[train_idx], labels[train_idx]), batch_size=64, shuffle=True)

    model = DigitsCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(EPOCHS):
        model.train()
        total = 0.0
        for batch, target in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(batch), target)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        model.eval()
        with torch.no_grad():
            accuracy = (model(images[test_idx]).argmax(1) == labels[test_idx]).float().mean().item()
        print(f"epoch {epoch + 1:2d}: loss {total / len(train_idx):.4f}, held-out accuracy {accuracy:.4f}")

    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    test_idx = np.sort(test_idx)
    tensors["heldout.indices"] = torch.tensor(test_idx, dtype=torch.int64)
    tensors["heldout.images"] = torch.tensor(digits.images[test_idx], dtype=torch.uint8)
    tensors["heldout.labels"] = labels[test_idx].contiguous()
    save_file(tensors, str(WEIGHTS))
    print(f"wrote {WEIGHTS} ({WEIGHTS.stat().st_size // 1024} KB), held-out accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
