"""Networks of the distillation loops: the ConvNet of the reference code and an instance-norm ResNet-18.

Every model has ``embed(x) -> (N, F)`` (the flattened features before the classifier, what DM
matches and CMI measures) and ``forward(x) -> (N, classes)`` logits; the ConvNet also has
``block_features(x)``, each block's feature map (what MIM4DD contrasts layer by layer). ``ModelSpec`` names a model
with its settings so that configs, checkpoints and caches can record and rebuild it. A ConvNet whose
depth is not set takes the reference's depth for the image size (``convnet_depth``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

NORMS = ("instancenorm", "batchnorm", "none")
ARCHS = ("convnet", "resnet18")


def norm_layer(norm: str, channels: int) -> nn.Module:
    """Instance norm is GroupNorm with one channel per group (affine), as in the reference code."""
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


class ConvNet(nn.Module):
    """``depth`` x [Conv 3x3 -> norm -> ReLU -> AvgPool 2x2], then Linear(width * s * s, classes).

    The first conv pads by 3 on 28x28 input (MNIST-like), so features are 128 x 4 x 4 there as on 32x32.
    """

    def __init__(self, channels: int, num_classes: int, image_size: int, *, width: int = 128, depth: int = 3, norm: str = "instancenorm"):
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be >= 1, got width={width}, depth={depth}")
        layers: list[nn.Module] = []
        size = image_size + (4 if image_size == 28 else 0)
        for d in range(depth):
            padding = 3 if d == 0 and image_size == 28 else 1
            layers += [nn.Conv2d(channels if d == 0 else width, width, 3, padding=padding), norm_layer(norm, width), nn.ReLU(inplace=True),
                       nn.AvgPool2d(2)]
            size //= 2
        if size < 1:
            raise ValueError(f"depth {depth} pools {image_size}x{image_size} images below one pixel")
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.classifier = nn.Linear(width * size * size, num_classes)
        self.depth = depth

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def block_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of each Conv-norm-ReLU-pool block: ``depth`` tensors (N, width, s_l, s_l)."""
        outputs = []
        for d in range(self.depth):
            for layer in self.features[4 * d : 4 * d + 4]:
                x = layer(x)
            outputs.append(x)
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int, stride: int, norm: str):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False), norm_layer(norm, outputs), nn.ReLU(inplace=True),
            nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False), norm_layer(norm, outputs),
        )
        self.shortcut = nn.Identity()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), norm_layer(norm, outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images (3x3 stem, no max-pool), instance norm by default; 512 features."""

    def __init__(self, channels: int, num_classes: int, *, norm: str = "instancenorm"):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, 64, 3, 1, 1, bias=False), norm_layer(norm, 64), nn.ReLU(inplace=True)]
        inputs = 64
        for outputs, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(inputs, outputs, stride, norm), BasicBlock(outputs, outputs, 1, norm)]
            inputs = outputs
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(512, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def convnet_depth(image_size: int) -> int:
    """The reference's ConvNet depth for ``image_size``: the fewest blocks (at least 3) that pool it to 4 x 4
    or less: 3 up to 32 x 32 (ConvNet), 4 at 64 x 64 (ConvNetD4), 5 at 128 x 128 (ConvNetD5)."""
    depth = 3
    while image_size > 4 << depth:
        depth += 1
    return depth


@dataclass(frozen=True)
class ModelSpec:
    """A model by name and settings; ``build`` makes a fresh, randomly initialised one."""

    arch: str = "convnet"
    width: int = 128  # ConvNet only
    depth: int | None = None  # ConvNet only; None: convnet_depth of the image size
    norm: str = "instancenorm"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")

    def build(self, channels: int, num_classes: int, image_size: int) -> nn.Module:
        if self.arch == "convnet":
            depth = convnet_depth(image_size) if self.depth is None else self.depth
            return ConvNet(channels, num_classes, image_size, width=self.width, depth=depth, norm=self.norm)
        return ResNet18(channels, num_classes, norm=self.norm)
