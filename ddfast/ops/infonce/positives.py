"""The positive term of InfoNCE, from class aggregates: O((N + M) D), no N x M work.

With labels, ``mean_{j in P(i)} <q_i, k_j> = <q_i, S_{y_i}> / n_{y_i}`` where ``S_c`` sums the
(normalised) keys of class c, and the key gradient of the term is a class sum of query gradients.
Without labels, query i's positive is key i (queries beyond the keys have none).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

CHUNK_ROWS = 8192  # rows of the key side materialised at once in the accumulation dtype


class Positives(NamedTuple):
    """Query / key class indices in [0, num_classes) (``None`` without labels) and counts (N,)."""

    query_class: torch.Tensor | None
    key_class: torch.Tensor | None
    num_classes: int
    count: torch.Tensor


def build(query_labels: torch.Tensor | None, key_labels: torch.Tensor | None, n: int, m: int,
          device: torch.device, dtype: torch.dtype) -> Positives:
    """Class indices and per-query positive counts (``dtype``) for either positive mode.

    Labels of any integer dtype (and any layout) are compared as int64 values: every value is a class.
    """
    if query_labels is None:
        count = (torch.arange(n, device=device) < m).to(dtype)
        return Positives(None, None, 0, count)
    classes, index = torch.unique(torch.cat([query_labels.long(), key_labels.long()]), return_inverse=True)
    query_class, key_class = index[:n], index[n:]
    per_class = torch.bincount(key_class, minlength=classes.numel()).to(dtype)
    return Positives(query_class, key_class, classes.numel(), per_class[query_class])


def key_rows(key: torch.Tensor, inv_norm: torch.Tensor | None, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Normalised keys ``start:stop`` in ``dtype`` (the only place key rows are copied)."""
    rows = key[start:stop].to(dtype)
    return rows if inv_norm is None else rows * inv_norm[start:stop, None]


def key_class_sums(pos: Positives, key: torch.Tensor, key_inv_norm: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """(C, D) sum of the normalised keys of each class, in ``dtype``, built in bounded chunks."""
    sums = torch.zeros(pos.num_classes, key.shape[1], dtype=dtype, device=key.device)
    for start in range(0, key.shape[0], CHUNK_ROWS):
        stop = start + CHUNK_ROWS
        sums.index_add_(0, pos.key_class[start:stop], key_rows(key, key_inv_norm, start, stop, dtype))
    return sums


def mean_logit(pos: Positives, query: torch.Tensor, key: torch.Tensor, key_inv_norm: torch.Tensor | None,
               scale: float) -> torch.Tensor:
    """(N,) ``scale * mean_{j in P(i)} <q_i, k_j>``, 0 for queries without positives.

    ``query`` (N, D) normalised, in the accumulation dtype; ``key`` (M, D) raw, any float dtype.
    """
    return logit_sums(pos, query, key, key_inv_norm, scale) / pos.count.clamp_min(1)


def logit_sums(pos: Positives, query: torch.Tensor, key: torch.Tensor, key_inv_norm: torch.Tensor | None,
               scale: float) -> torch.Tensor:
    """(N,) ``scale * sum_{j in P(i)} <q_i, k_j>`` (inputs as :func:`mean_logit`): the positives' part
    of each query's statistics that a shard of the keys contributes."""
    acc = query.dtype
    if pos.query_class is None:
        n = min(query.shape[0], key.shape[0])
        dots = (query[:n] * key_rows(key, key_inv_norm, 0, n, acc)).sum(1)
        return torch.cat([dots * scale, query.new_zeros(query.shape[0] - n)])
    sums = key_class_sums(pos, key, key_inv_norm, acc)
    return scale * (query * sums[pos.query_class]).sum(1)


def subtract_grads(pos: Positives, weight: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                   key_inv_norm: torch.Tensor | None, scale: float, grad_query: torch.Tensor | None,
                   grad_key: torch.Tensor | None) -> None:
    """Subtract the positive term's gradient, in place, from the normalised-input gradients.

    ``weight`` (N,): upstream gradient per query (0 for queries without positives);
    ``grad_query`` (N, D) and ``grad_key`` (M, D) are gradients with respect to the normalised rows
    (``None``: not needed).
    """
    w = scale * weight / pos.count.clamp_min(1)
    if pos.query_class is None:
        n = min(query.shape[0], key.shape[0])
        if grad_query is not None:
            grad_query[:n] -= w[:n, None] * key_rows(key, key_inv_norm, 0, n, query.dtype)
        if grad_key is not None:
            grad_key[:n] -= w[:n, None] * query[:n]
        return
    if grad_query is not None:
        grad_query -= w[:, None] * key_class_sums(pos, key, key_inv_norm, query.dtype)[pos.query_class]
    if grad_key is not None:
        query_sums = query.new_zeros(pos.num_classes, query.shape[1]).index_add_(0, pos.query_class, w[:, None] * query)
        for start in range(0, key.shape[0], CHUNK_ROWS):
            grad_key[start:start + CHUNK_ROWS] -= query_sums[pos.key_class[start:start + CHUNK_ROWS]]
