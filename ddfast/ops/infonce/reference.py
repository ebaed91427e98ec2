"""Plain-torch InfoNCE: the oracle for every backend and the loss ddfast replaces.

It builds the full (N, M) logits matrix, so its memory grows as N x M; autograd differentiates it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def positive_mask(query_labels: torch.Tensor | None, key_labels: torch.Tensor | None, n: int, m: int, device) -> torch.Tensor:
    """(N, M) bool: key j is a positive of query i (same label, or j == i without labels)."""
    if query_labels is None:
        return torch.eye(n, m, dtype=torch.bool, device=device)
    return query_labels[:, None] == key_labels[None, :]


def infonce_rows(query, key, query_labels=None, key_labels=None, *, temperature=0.1, normalize=True):
    """Per-query loss (N,) and a (N,) bool mask of queries that have at least one positive.

    ``loss_i = logsumexp_j s_ij - mean_{j in P(i)} s_ij`` with ``s = <q, k> / temperature``; rows with
    no positive are 0. Computed in the inputs' dtype, like the loss users write by hand.
    """
    if normalize:
        query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
    logits = query @ key.T / temperature
    positives = positive_mask(query_labels, key_labels, query.shape[0], key.shape[0], query.device)
    count = positives.sum(1)
    positive_mean = (logits * positives).sum(1) / count.clamp_min(1)
    valid = count > 0
    return torch.where(valid, logits.logsumexp(1) - positive_mean, torch.zeros_like(positive_mean)), valid


def reduce_rows(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """``mean`` over the queries with a positive (0 when there are none), ``sum``, or ``none``."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / valid.sum().clamp_min(1)


def infonce(query, key, query_labels=None, key_labels=None, *, temperature=0.1, normalize=True,
            reduction="mean", symmetric=False):
    """Reference InfoNCE with the semantics of :func:`ddfast.infonce` (no input checks)."""
    rows, valid = infonce_rows(query, key, query_labels, key_labels, temperature=temperature, normalize=normalize)
    loss = reduce_rows(rows, valid, reduction)
    if not symmetric:
        return loss
    rows_t, valid_t = infonce_rows(key, query, key_labels, query_labels, temperature=temperature, normalize=normalize)
    return 0.5 * (loss + reduce_rows(rows_t, valid_t, reduction))
