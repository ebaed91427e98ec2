"""trajectory_mse cases: the MTT loss of one student trajectory, swept over the parameter count P.

``layout`` "flat": (B, P) tensors; "convnet" / "resnet18": the per-parameter lists of one trajectory
of those models, as ``list(model.parameters())`` passes them. Only the student
requires a gradient, as in MTT (start and target are expert snapshots).
"""

from __future__ import annotations

import math

import torch

import ddfast
from ddfast.ops.trajectory_mse import REGISTRY, reference  # noqa: F401  (REGISTRY: read by ops.problems)

from .ops import Inputs, Work


def convnet_shapes(channels=3, classes=10, width=128, depth=3, feature=4):
    """Parameter shapes of the distillation ConvNet (conv 3x3, GroupNorm affine per layer, linear head)."""
    shapes = []
    for layer in range(depth):
        shapes += [(width, channels if layer == 0 else width, 3, 3), (width,), (width,), (width,)]
    return shapes + [(classes, width * feature * feature), (classes,)]


def resnet18_shapes():
    import torchvision

    with torch.device("meta"):
        return [tuple(p.shape) for p in torchvision.models.resnet18(num_classes=10).parameters()]

FUNCTION = ddfast.trajectory_mse
REFERENCE = reference.trajectory_mse
AXIS = "P"
MODELS = {"convnet": convnet_shapes(), "resnet18": resnet18_shapes()}
PEERS = {}
CHECKS = []


def _flat(ps: list[int], b: int = 1) -> list[dict]:
    return [{"B": b, "P": p, "layout": "flat"} for p in ps]


MODEL_SHAPES = [{"B": 1, "P": sum(math.prod(s) for s in shapes), "layout": name} for name, shapes in MODELS.items()]
PRESETS = {
    ("cpu", "tiny"): _flat([10_000, 100_000]),
    ("cpu", "default"): _flat([100_000, 1_000_000, 10_000_000]) + MODEL_SHAPES,
    ("cpu", "full"): _flat([10**5, 10**6, 10**7, 3 * 10**7, 10**8]) + MODEL_SHAPES,
    ("cuda", "tiny"): _flat([10_000, 100_000]),
    ("cuda", "default"): _flat([10**6, 10**7, 10**8]) + MODEL_SHAPES,
    ("cuda", "full"): _flat([10**6, 10**7, 10**8, 3 * 10**8, 10**9]) + MODEL_SHAPES,
}


def inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> Inputs:
    g = torch.Generator(device).manual_seed(0)
    layout = shape["layout"]
    shapes = [(shape["B"], shape["P"])] if layout == "flat" else MODELS[layout]

    def noise(scale: float) -> list[torch.Tensor]:
        return [torch.randn(s, generator=g, device=device, dtype=dtype) * scale for s in shapes]

    target = noise(0.05)
    start = [t + n for t, n in zip(target, noise(0.01))]
    student = [(t + n).requires_grad_() for t, n in zip(target, noise(0.005))]
    args = (student, start, target) if layout != "flat" else (student[0], start[0], target[0])
    return Inputs(args, grads=tuple(student))


def work(shape: dict, dtype: torch.dtype) -> Work:
    bpe = shape["B"] * shape["P"] * dtype.itemsize
    return Work(3 * bpe, 4 * bpe, "byte",
                "bytes that must move: forward 3BPe (student, start, target read once, e bytes per element); "
                "forward+backward 4BPe (the same reads, the student's gradient written)")
