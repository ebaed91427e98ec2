"""cmi cases: the CMI regulariser on N feature rows of width K (10 classes), swept over N.

Features as the authors use them: K = 512 penultimate ResNet-18 features, no temperature, the
batch's own class centroids; the features require a gradient. Besides ddfast's backends, the
authors' formulation (a per-class loop, then ``F.kl_div``) runs as the code users would otherwise run.
"""

from __future__ import annotations

import torch

import ddfast
from ddfast.ops.cmi import REGISTRY, reference  # noqa: F401  (REGISTRY: read by ops.problems)

from .ops import Inputs, Peer, Work

FUNCTION = ddfast.cmi_loss
REFERENCE = reference.cmi_reference
AXIS = "N"
CLASSES = 10
PEERS = {"authors": Peer(lambda: reference.cmi_authors)}
CHECKS = []


def _sweep(ns: list[int], k: int = 512) -> list[dict]:
    return [{"N": n, "K": k} for n in ns]


PRESETS = {
    ("cpu", "tiny"): _sweep([256, 1024], k=64),
    ("cpu", "default"): _sweep([1000, 10_000, 50_000]) + _sweep([50_000], k=1000),
    ("cpu", "full"): _sweep([1000, 5000, 10_000, 50_000, 100_000, 200_000]) + _sweep([50_000, 200_000], k=1000),
    ("cuda", "tiny"): _sweep([256, 1024], k=64),
    ("cuda", "default"): _sweep([10_000, 50_000, 200_000, 1_000_000]) + _sweep([50_000], k=1000),
    ("cuda", "full"): _sweep([10_000, 50_000, 200_000, 1_000_000, 4_000_000]) + _sweep([50_000, 1_000_000], k=1000),
}


def inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> Inputs:
    g = torch.Generator(device).manual_seed(0)
    features = torch.randn(shape["N"], shape["K"], generator=g, device=device, dtype=dtype).mul_(3.0).requires_grad_()
    labels = torch.randint(0, CLASSES, (shape["N"],), generator=g, device=device)
    return Inputs((features, labels, CLASSES), grads=(features,))


def work(shape: dict, dtype: torch.dtype) -> Work:
    nke, labels = shape["N"] * shape["K"] * dtype.itemsize, shape["N"] * 8
    return Work(nke + labels, 2 * nke + labels, "byte",
                "bytes that must move: forward NKe + 8N (features read once, e bytes per element, int64 labels); "
                "forward+backward 2NKe + 8N (the same reads, the features' gradient written)")
