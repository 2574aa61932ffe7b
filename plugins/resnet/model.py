"""ResNet-50 in plain torch (no torchvision), with deterministic random weights.

The architecture is torchvision's resnet50 (v1.5: the stride sits on the 3x3 convolution of a
Bottleneck), blocks [3, 4, 6, 3], 1000 classes, 25.6M parameters, ~4.1 GMACs per image. There
are no trained weights: `build_model()` draws them from a fixed seed and then makes the untrained
network numerically sane, because the quantised and half-precision targets are checked by top-1
agreement with eager, which means nothing when every image has the same argmax, or when the
top two logits are so close that rounding decides between them:

1. Kaiming-normal convolutions and BatchNorm weight 1 / bias 0 (torchvision's init), except the
   last BatchNorm of each residual branch, whose weight starts at RESIDUAL_GAIN = 0.1 (a damped
   form of torchvision's `zero_init_residual`). An untrained ResNet with BatchNorm amplifies any
   perturbation block after block: emulated TF32 rounding grew to 7% of the pooled features'
   spread across images with gain 1, and stays near 0.1% with 0.1.
2. BatchNorm running statistics from one forward pass in train mode over 16 fixed-seed synthetic
   images (momentum 1: the running statistics are exactly that batch's), so every BN layer sees
   unit-scale activations in eval mode, as after training.
3. A nearest-class-mean head: the Linear layer standardises the pooled features with the
   calibration batch's mean and spread (pooled features of an untrained net share a large common
   component that would otherwise pick the same class for every image), and its first 16 rows
   are the unit-norm standardised features of the 16 calibration images ("prototype" classes);
   the other 984 rows are random unit directions, which rarely win. Images then get the class of
   the prototype they resemble most, with top-1 margins that rounding does not flip: on 32 other
   images, onnx-int8, fp16 and emulated TF32 all agree with eager on every top-1.

Images are synthetic and fixed-seed: smooth colour fields plus a few oriented gratings, so that
their features differ (uniform noise would average out under global pooling).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

SEED = 50
NUM_CLASSES = 1000
SIZE = 224
MEAN = (0.485, 0.456, 0.406)  # ImageNet, RGB
STD = (0.229, 0.224, 0.225)
CALIBRATION_IMAGES = 16  # also the number of prototype classes
# The last BN of each residual branch starts at this gain (torchvision's zero_init_residual, damped
# rather than zero): see the module docstring.
RESIDUAL_GAIN = 0.1


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """UINT8 images [n, 224, 224, 3] (HWC, RGB, 0-255) in, FP32 logits [n, 1000] out."""

    def __init__(self, layers: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        # Buffers, so that .to(dtype) (the fp16/bf16 targets) converts them with the weights and
        # the uint8 input is cast to whatever dtype the network computes in.
        self.register_buffer("mean", torch.tensor(MEAN).mul(255.0).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("inv_std", (1.0 / torch.tensor(STD).mul(255.0)).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        stages = []
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if index == 0 else 2
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC -> normalised float NCHW, in the dtype of the network's buffers."""
        x = image.permute(0, 3, 1, 2).to(self.mean.dtype)
        return (x - self.mean) * self.inv_std

    def features(self, image: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.preprocess(image)))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(image))


def synthetic_images(count: int, seed: int) -> np.ndarray:
    """`count` fixed-seed uint8 images [count, 224, 224, 3]: a smooth colour field (bilinearly
    upsampled 4x4..16x16 noise) and one to three oriented colour gratings each."""
    rng = np.random.default_rng(seed)
    grid = np.linspace(0.0, 1.0, SIZE, dtype=np.float32)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")
    out = np.empty((count, SIZE, SIZE, 3), np.uint8)
    for i in range(count):
        cells = int(rng.integers(4, 17))
        coarse = rng.uniform(0.0, 1.0, (cells, cells, 3)).astype(np.float32)
        positions = np.linspace(0, cells - 1, SIZE, dtype=np.float32)
        low = np.floor(positions).astype(int)
        high = np.minimum(low + 1, cells - 1)
        frac = (positions - low)[:, None]
        rows = coarse[low] * (1 - frac[:, :, None]) + coarse[high] * frac[:, :, None]  # [224, cells, 3]
        image = rows[:, low] * (1 - frac.T[:, :, None]) + rows[:, high] * frac.T[:, :, None]  # [224, 224, 3]
        image = image * rng.uniform(0.3, 1.0) + rng.uniform(0.0, 0.3)
        for _ in range(int(rng.integers(1, 4))):
            angle = rng.uniform(0, np.pi)
            frequency = rng.uniform(2.0, 40.0)
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin(2 * np.pi * frequency * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
            colour = rng.uniform(-0.35, 0.35, 3).astype(np.float32)
            image = image + wave[:, :, None] * colour
        out[i] = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    return out


def build_model() -> ResNet50:
    """The eager model in eval mode, with the same weights on every call (see the module docstring)."""
    rng_state = torch.random.get_rng_state()
    torch.manual_seed(SEED)
    try:
        model = ResNet50()
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
                module.momentum = 1.0  # the running stats become exactly the calibration batch's
        for module in model.modules():
            if isinstance(module, Bottleneck):
                nn.init.constant_(module.bn3.weight, RESIDUAL_GAIN)
        nn.init.normal_(model.fc.weight)
    finally:
        torch.random.set_rng_state(rng_state)  # the caller's random stream is left as it was
    images = torch.from_numpy(synthetic_images(CALIBRATION_IMAGES, SEED + 1))
    with torch.no_grad():
        model.train()
        features = model.features(images)  # sets every BN layer's running statistics
        model.eval()
        center = features.mean(0)
        scale = features.std(0).clamp_min(1e-6)
        prototypes = (features - center) / scale
        rows = model.fc.weight / model.fc.weight.norm(dim=1, keepdim=True)
        rows[: len(prototypes)] = prototypes / prototypes.norm(dim=1, keepdim=True)
        # logits = rows @ ((f - center) / scale): folded into the Linear's weight and bias.
        weight = rows / scale
        model.fc.weight.copy_(weight)
        model.fc.bias.copy_(-weight @ center)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = 0.1
    return model.eval()


def example_images(count: int = 4) -> np.ndarray:
    return synthetic_images(count, SEED + 10)


def validation_images(count: int = 32) -> np.ndarray:
    return synthetic_images(count, SEED + 20)
