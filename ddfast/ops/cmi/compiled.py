"""The backend protocol (``streaming.py``) over the seven compiled kernels of ``csrc/cmi/cmi_ops.h``.

The backends ``cpu`` and ``cuda`` (C++ extensions) and ``triton`` provide the same seven kernels;
``protocol`` turns them into the five protocol functions: row softmax normalisers, class
log-centroids, per-sample KL, the centroid gradient and the feature gradient. The kernels take
``inv_t = 1 / temperature`` and reduce each class's rows in chunks (``segments.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .segments import Segments


def protocol(kernels: Callable[[], object], chunk_rows: int) -> tuple[Callable, ...]:
    """``(row_norm, class_log_centroids, row_kl, centroid_grad, row_grad)`` over the seven kernels that
    ``kernels()`` returns (loaded on first use); a class's rows are reduced in chunks of ``chunk_rows``
    rows, the most one kernel program handles."""

    def row_norm(features: torch.Tensor, temperature: float) -> torch.Tensor:
        return kernels().row_norm(features, 1.0 / temperature)

    def class_log_centroids(features: torch.Tensor, segments: Segments, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        chunks = segments.chunks(chunk_rows)
        norm, partial = kernels().chunk_norm(features, segments.order, chunks.start, chunks.end, 1.0 / temperature)
        return norm, kernels().combine_lse(partial, chunks.first, segments.counts)

    def row_kl(features: torch.Tensor, labels: torch.Tensor, norm: torch.Tensor, log_q: torch.Tensor, temperature: float) -> torch.Tensor:
        return kernels().row_kl(features, labels, norm, log_q, 1.0 / temperature)

    def centroid_grad(features: torch.Tensor, segments: Segments, norm: torch.Tensor, log_q: torch.Tensor,
                      g: torch.Tensor, temperature: float) -> torch.Tensor:
        chunks = segments.chunks(chunk_rows)
        partial = kernels().chunk_centroid_grad(features, segments.order, chunks.start, chunks.end, chunks.cls,
                                                norm, log_q, g, 1.0 / temperature)
        return kernels().combine_mean(partial, chunks.first, segments.counts)

    def row_grad(features: torch.Tensor, labels: torch.Tensor, norm: torch.Tensor, log_q: torch.Tensor, kl: torch.Tensor,
                 g: torch.Tensor, a: torch.Tensor | None, temperature: float) -> torch.Tensor:
        return kernels().row_grad(features, labels, norm, log_q, kl, g, a, 1.0 / temperature)

    return row_norm, class_log_centroids, row_kl, centroid_grad, row_grad
