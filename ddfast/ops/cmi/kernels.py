"""The glue between the CMI operators and a set of compiled kernels (C++, CUDA C++ or Triton).

Every compiled backend provides the same seven kernels (``csrc/cmi/cmi_ops.h`` documents them);
``KernelBackend`` turns them into the five functions every backend offers (``streaming.py`` has the
pure-torch ones): row softmax normalisers, class log-centroids, per-sample KL, the centroid
gradient and the feature gradient. Kernels take ``inv_t = 1 / temperature``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ... import _extension
from .segments import Segments


class KernelBackend:
    """``kernels()`` returns the namespace holding the kernels (loaded on first use); a class's
    rows are reduced in chunks of ``chunk_rows`` rows, the most one kernel program handles."""

    def __init__(self, kernels: Callable[[], object], chunk_rows: int, missing: Callable[[], str | None] = lambda: None):
        self._kernels = kernels
        self.chunk_rows = chunk_rows
        self.missing = missing

    @classmethod
    def from_extension(cls, name: str, chunk_rows: int) -> KernelBackend:
        """The kernels of extension ``name`` in ``csrc/`` (built on first use, see ``ddfast._extension``)."""
        return cls(lambda: _extension.load(name), chunk_rows, lambda: _extension.missing(name))

    @property
    def kernels(self):
        return self._kernels()

    def row_norm(self, features: torch.Tensor, temperature: float) -> torch.Tensor:
        return self.kernels.row_norm(features, 1.0 / temperature)

    def class_log_centroids(self, features: torch.Tensor, segments: Segments, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        chunks = segments.chunks(self.chunk_rows)
        norm, partial = self.kernels.chunk_norm(features, segments.order, chunks.start, chunks.end, 1.0 / temperature)
        return norm, self.kernels.combine_lse(partial, chunks.first, segments.counts)

    def row_kl(self, features: torch.Tensor, labels: torch.Tensor, norm: torch.Tensor, log_q: torch.Tensor, temperature: float) -> torch.Tensor:
        return self.kernels.row_kl(features, labels, norm, log_q, 1.0 / temperature)

    def centroid_grad(self, features: torch.Tensor, segments: Segments, norm: torch.Tensor, log_q: torch.Tensor,
                      g: torch.Tensor, temperature: float) -> torch.Tensor:
        chunks = segments.chunks(self.chunk_rows)
        partial = self.kernels.chunk_centroid_grad(features, segments.order, chunks.start, chunks.end, chunks.cls,
                                                   norm, log_q, g, 1.0 / temperature)
        return self.kernels.combine_mean(partial, chunks.first, segments.counts)

    def row_grad(self, features: torch.Tensor, labels: torch.Tensor, norm: torch.Tensor, log_q: torch.Tensor, kl: torch.Tensor,
                 g: torch.Tensor, a: torch.Tensor | None, temperature: float) -> torch.Tensor:
        return self.kernels.row_grad(features, labels, norm, log_q, kl, g, a, 1.0 / temperature)
