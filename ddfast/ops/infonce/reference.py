"""Plain-torch InfoNCE: the oracle for every backend and the loss ddfast replaces.

It builds the full (N, M) logits matrix, so its memory grows as N x M; autograd differentiates it
(every ``torch.func`` transform included). It checks values as the fused operators do: non-finite
features, the temperature's value, and logits that overflow the inputs' dtype raise ``ValueError``.
"""

from __future__ import annotations

import torch

from ... import _checks
from .._reduction import reduce
from .op import check_logits
from .rows import EPS, power_of_two


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """``F.normalize(x, dim=-1)`` (``x / max(||x||, 1e-12)``) without overflow: each row is divided by
    a power of two near its largest magnitude (exact, treated as a constant) before it is squared, and
    the clamp is applied in float32 or wider. (N, D) in, (N, D) in ``x``'s dtype out."""
    wide = torch.promote_types(x.dtype, torch.float32)
    scale = power_of_two(x.detach().abs().amax(-1, keepdim=True).to(wide))
    rows = x.to(wide) / scale
    return (rows / torch.linalg.vector_norm(rows, dim=-1, keepdim=True).clamp_min(EPS / scale)).to(x.dtype)


def positive_mask(query_labels: torch.Tensor | None, key_labels: torch.Tensor | None, n: int, m: int, device) -> torch.Tensor:
    """(N, M) bool: key j is a positive of query i (same label, or j == i without labels)."""
    if query_labels is None:
        return torch.eye(n, m, dtype=torch.bool, device=device)
    return query_labels.long()[:, None] == key_labels.long()[None, :]


def infonce_rows(query, key, query_labels=None, key_labels=None, *, temperature=0.1, normalize=True):
    """Per-query loss (N,) and a (N,) bool mask of queries that have at least one positive.

    ``loss_i = logsumexp_j s_ij - mean_{j in P(i)} s_ij`` with ``s = <q, k> / temperature``; rows with
    no positive are 0. Computed in the inputs' dtype, like the loss users write by hand (the
    normalisation in float32 or wider). ``temperature``: a number or a one-element tensor on the CPU or
    the inputs' device.
    """
    _checks.finite("query", query)
    _checks.finite("key", key)
    _checks.positive_finite("temperature", temperature)
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.reshape(()).to(query.device)
    if normalize:
        query, key = normalize_rows(query), normalize_rows(key)
    logits = query @ key.T / temperature
    positives = positive_mask(query_labels, key_labels, query.shape[0], key.shape[0], query.device)
    count = positives.sum(1)
    positive_mean = (logits * positives).sum(1) / count.clamp_min(1)
    valid = count > 0
    lse = logits.logsumexp(1)
    rows = torch.where(valid, lse - positive_mean, torch.zeros_like(positive_mean))
    check_logits(lse, rows, logits.dtype)
    return rows, valid


def infonce(query, key, query_labels=None, key_labels=None, *, temperature=0.1, normalize=True,
            reduction="mean", symmetric=False):
    """Reference InfoNCE with the semantics of :func:`ddfast.infonce` (value checks only: the metadata
    checks are the public function's)."""
    rows, valid = infonce_rows(query, key, query_labels, key_labels, temperature=temperature, normalize=normalize)
    loss = reduce(rows, reduction, valid.sum())
    if not symmetric:
        return loss
    rows_t, valid_t = infonce_rows(key, query, key_labels, query_labels, temperature=temperature, normalize=normalize)
    return 0.5 * (loss + reduce(rows_t, reduction, valid_t.sum()))
