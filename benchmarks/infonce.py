"""infonce cases: N synthetic-sample queries against M real-sample keys, swept over M (the negatives).

Supervised contrastive form as in MIM4DD: 10 classes, cosine similarity, temperature 0.1, mean
reduction; query and key both require gradients.
"""

from __future__ import annotations

import torch

import ddfast
from ddfast.ops.infonce import REGISTRY, reference  # noqa: F401  (REGISTRY: read by ops.problems)

from .ops import Check, Inputs, Peer, Work

FUNCTION = ddfast.infonce
REFERENCE = reference.infonce
AXIS = "M"
CLASSES = 10
TEMPERATURE = 0.1


def _sweep(n: int, d: int, ms: list[int]) -> list[dict]:
    return [{"N": n, "M": m, "D": d} for m in ms]


PRESETS = {
    ("cpu", "tiny"): _sweep(64, 32, [256, 1024]),
    ("cpu", "default"): _sweep(1000, 256, [1000, 10_000, 50_000]),
    ("cpu", "full"): _sweep(1000, 256, [1000, 2000, 5000, 10_000, 20_000, 50_000, 100_000, 200_000]),
    ("cuda", "tiny"): _sweep(64, 32, [256, 1024]),
    ("cuda", "default"): _sweep(1000, 512, [1000, 10_000, 50_000, 200_000, 1_000_000]),
    ("cuda", "full"): _sweep(1000, 512, [1000, 10_000, 50_000, 200_000, 1_000_000, 2_000_000, 4_000_000]),
}

CHECKS = [
    Check("infonce forward+backward, N=1000 M=50000 D=256 float32: the cpu backend against the reference",
          device="cpu", dtype="float32", shape={"N": 1000, "M": 50_000, "D": 256}, ours="cpu", baseline="reference",
          max_memory_ratio=0.2, max_time_ratio=1.0),
]


def inputs(shape: dict, dtype: torch.dtype, device: torch.device) -> Inputs:
    n, m, d = shape["N"], shape["M"], shape["D"]
    g = torch.Generator(device).manual_seed(0)
    query = torch.randn(n, d, generator=g, device=device, dtype=dtype, requires_grad=True)
    key = torch.randn(m, d, generator=g, device=device, dtype=dtype, requires_grad=True)
    query_labels = torch.arange(n, device=device) % CLASSES
    key_labels = torch.randint(0, CLASSES, (m,), generator=g, device=device)
    return Inputs((query, key, query_labels, key_labels), {"temperature": TEMPERATURE}, grads=(query, key))


def work(shape: dict, dtype: torch.dtype) -> Work:
    nmd = shape["N"] * shape["M"] * shape["D"]
    return Work(2 * nmd, 8 * nmd, "flop",
                "forward 2NMD (the logits); forward+backward 8NMD (logits, logits recomputed, dq, dk), "
                "DESIGN.md's count, the same for every implementation")


def _supcon():
    """pytorch-metric-learning's SupConLoss against reference embeddings: the same loss (cosine, mean)."""
    from pytorch_metric_learning.losses import SupConLoss

    def supcon(query, key, query_labels, key_labels, *, temperature):
        return SupConLoss(temperature=temperature)(query, query_labels, ref_emb=key, ref_labels=key_labels)

    return supcon


PEERS = {"pml-supcon": Peer(_supcon, "pytorch_metric_learning", "pytorch-metric-learning")}
