"""Backend ``torch``: the CMI in log space with plain torch ops, streamed over blocks of rows.

Runs on any device and needs O(C K) memory beyond the inputs plus a few blocks of ``ELEMENTS``
values, so N can grow without bound. Per-class sums use ``index_add_`` (deterministic on the CPU; on
CUDA only under ``torch.use_deterministic_algorithms``).

The backend protocol: every backend module (``streaming``, ``cpu``, ``triton``, ``cuda``) defines these
functions with these signatures; ``op.py`` calls nothing else, and only with contiguous inputs.

- ``row_norm(features, temperature) -> norm``
- ``class_log_centroids(features, segments, temperature) -> (norm, log_q)``
- ``row_kl(features, labels, norm, log_q, temperature) -> kl``
- ``centroid_grad(features, segments, norm, log_q, g, temperature) -> a``
- ``row_grad(features, labels, norm, log_q, kl, g, a, temperature) -> grad``

Shapes: features (N, K) float32 / float64 / bfloat16 / float16, labels (N,) int64, ``segments`` the
labels' ``segments.Segments``, temperature a python float; in the accumulation dtype (float32, float64
for float64 features): kl / g (N,), log_q / a (C, K) (``a`` None: no centroid term), and the softmax
normalisers norm (N, 2): each row's max of the features and log sum exp((f - max) / T), so that
log P = (f - max) / T - log-sum is exact at the row's largest entry and keeps full precision near it
(the differences f - max are exact there); grad (N, K) in the features' dtype.
"""

from __future__ import annotations

import torch

from ..._backends import accumulation_dtype
from .segments import Segments

ELEMENTS = 1 << 22


def _blocks(features: torch.Tensor, width: int = 0):
    """Slices of rows holding about ``ELEMENTS`` values of width max(K, ``width``)."""
    n, k = features.shape
    step = max(1, ELEMENTS // max(k, width, 1))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _rows(features: torch.Tensor, rows: slice) -> torch.Tensor:
    return features[rows].to(accumulation_dtype(features.dtype))


def _normaliser(f: torch.Tensor, temperature: float) -> torch.Tensor:
    """(rows, 2): each row's max and log sum exp((f - max) / T); the log-sum is nan for a row holding
    a nan or an inf."""
    bottom, top = torch.aminmax(f, dim=1, keepdim=True)
    log_sum = ((f - top) / temperature).exp().sum(dim=1, keepdim=True).log()
    finite = torch.isfinite(bottom) & torch.isfinite(top)
    return torch.cat([top, torch.where(finite, log_sum, float("nan"))], dim=1)


def _log_p(features: torch.Tensor, norm: torch.Tensor, rows: slice, temperature: float) -> torch.Tensor:
    """(rows, K) log-softmax, recomputed from the saved normalisers."""
    return (_rows(features, rows) - norm[rows, :1]) / temperature - norm[rows, 1:]


def row_norm(features: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N, 2) softmax normalisers of the rows of ``features / temperature``."""
    norm = features.new_empty((features.shape[0], 2), dtype=accumulation_dtype(features.dtype))
    for rows in _blocks(features):
        norm[rows] = _normaliser(_rows(features, rows), temperature)
    return norm


def class_log_centroids(features: torch.Tensor, segments: Segments, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax normalisers (N, 2) and log Q (C, K): the log of each class's mean softmax (-inf if absent).

    An online logsumexp per (class, column) over the blocks of rows: one pass over ``features``.
    """
    n, k = features.shape
    acc = accumulation_dtype(features.dtype)
    norm = features.new_empty((n, 2), dtype=acc)
    col_max = features.new_full((segments.num_classes, k), float("-inf"), dtype=acc)
    col_sum = features.new_zeros((segments.num_classes, k), dtype=acc)
    for rows in _blocks(features):
        norm[rows] = _normaliser(_rows(features, rows), temperature)
        x = _log_p(features, norm, rows, temperature)
        y = segments.labels[rows]
        new_max = col_max.scatter_reduce(0, y[:, None].expand_as(x), x, "amax")
        shift = new_max.clamp_min(torch.finfo(acc).min)  # finite, so that -inf - shift = -inf, never nan
        col_sum = (col_sum * torch.exp(col_max - shift)).index_add_(0, y, torch.exp(x - shift[y]))
        col_max = new_max
    counts = segments.counts[:, None]
    log_q = torch.where(counts > 0, col_max + col_sum.log() - counts.to(acc).log(), float("-inf"))
    return norm, log_q


def row_kl(features: torch.Tensor, labels: torch.Tensor, norm: torch.Tensor, log_q: torch.Tensor, temperature: float) -> torch.Tensor:
    """(N,) KL(P_i || Q_{y_i}), with 0 log 0 = 0 where P_ik underflows."""
    kl = norm.new_empty(features.shape[0])
    for rows in _blocks(features):
        x = _log_p(features, norm, rows, temperature)
        p = x.exp()
        kl[rows] = torch.where(p > 0, p * (x - log_q[labels[rows]]), 0).sum(dim=1)
    return kl


def centroid_grad(features: torch.Tensor, segments: Segments, norm: torch.Tensor, log_q: torch.Tensor,
                  g: torch.Tensor, temperature: float) -> torch.Tensor:
    """(C, K) A_ck = (1/n_c) sum_{i in c} g_i P_ik / Q_ck: the gradient through the batch centroids
    (a term is 0 where log P_ik is -inf: its products with P in ``row_grad`` vanish)."""
    a = torch.zeros_like(log_q)
    for rows in _blocks(features):
        y = segments.labels[rows]
        x = _log_p(features, norm, rows, temperature)
        a.index_add_(0, y, g[rows, None] * torch.where(x > float("-inf"), torch.exp(x - log_q[y]), 0))
    return a / segments.counts.clamp_min(1)[:, None]


def row_grad(features: torch.Tensor, labels: torch.Tensor, norm: torch.Tensor, log_q: torch.Tensor, kl: torch.Tensor,
             g: torch.Tensor, a: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """(N, K) d(sum_i g_i KL_i)/d features, in the features' dtype.

    dz_jk = P_jk (g_j (log P_jk - log Q_ck - KL_j) - A_ck + sum_l P_jl A_cl), then / T.
    """
    out = torch.empty_like(features)
    for rows in _blocks(features):
        x = _log_p(features, norm, rows, temperature)
        p = x.exp()
        y = labels[rows]
        d = g[rows, None] * (x - log_q[y] - kl[rows, None])
        if a is not None:
            a_rows = a[y]
            d = d - a_rows + (p * a_rows).sum(dim=1, keepdim=True)
        out[rows] = (torch.where(p > 0, p * d, 0) / temperature).to(features.dtype)
    return out
