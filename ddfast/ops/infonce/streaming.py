"""Backend ``torch``: the InfoNCE softmax statistics streamed over tiles in pure torch.

Runs on any device. Memory beyond inputs and outputs: one (query chunk x key tile) block of logits.
The protocol every backend module (``streaming.py``, ``cpu.py``, ``triton.py``) defines, with these
names and signatures:

- ``lse(query, key, key_inv_norm, scale) -> (N,)``: ``logsumexp_j scale * rk_j * <q_i, k_j>``
- ``grads(query, key, key_inv_norm, scale, lse, weight, need_query, need_key) -> (dq, dk)``:
  ``dq_i = scale * sum_j w_ij rk_j k_j`` and ``dk_j = scale * sum_i w_ij q_i`` with
  ``w_ij = weight_i * exp(s_ij - lse_i)``, i.e. the softmax part of the gradient with respect to the
  normalised rows; ``None`` for the ones not needed.

``query`` (N, D) is already normalised and in the accumulation dtype (float32, float64 for float64
inputs); ``key`` (M, D) is raw, in the input dtype, normalised on the fly by ``key_inv_norm`` (M,)
(``None``: no normalisation). Results are in the accumulation dtype.
"""

from __future__ import annotations

import torch

QUERY_CHUNK = 1024
KEY_TILE = 2048


def _tiles(n: int, size: int):
    return ((start, min(start + size, n)) for start in range(0, n, size))


def _logits(query, key, key_inv_norm, scale, k0, k1):
    """(chunk, tile) logits and the tile's keys (accumulation dtype)."""
    keys = key[k0:k1].to(query.dtype)
    logits = query @ keys.T
    column_scale = scale if key_inv_norm is None else key_inv_norm[k0:k1] * scale
    return logits.mul_(column_scale), keys


def lse(query: torch.Tensor, key: torch.Tensor, key_inv_norm: torch.Tensor | None, scale: float) -> torch.Tensor:
    out = torch.empty(query.shape[0], dtype=query.dtype, device=query.device)
    for q0, q1 in _tiles(query.shape[0], QUERY_CHUNK):
        running = torch.full((q1 - q0,), float("-inf"), dtype=query.dtype, device=query.device)
        for k0, k1 in _tiles(key.shape[0], KEY_TILE):
            logits, _ = _logits(query[q0:q1], key, key_inv_norm, scale, k0, k1)
            running = torch.logaddexp(running, logits.logsumexp(1))
        out[q0:q1] = running
    return out


def grads(query: torch.Tensor, key: torch.Tensor, key_inv_norm: torch.Tensor | None, scale: float, lse: torch.Tensor,
          weight: torch.Tensor, need_query: bool, need_key: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    grad_query = torch.zeros_like(query) if need_query else None
    grad_key = torch.zeros(key.shape, dtype=query.dtype, device=key.device) if need_key else None
    for q0, q1 in _tiles(query.shape[0], QUERY_CHUNK):
        for k0, k1 in _tiles(key.shape[0], KEY_TILE):
            logits, keys = _logits(query[q0:q1], key, key_inv_norm, scale, k0, k1)
            w = logits.sub_(lse[q0:q1, None]).exp_().mul_(weight[q0:q1, None] * scale)
            if need_key:
                grad_key[k0:k1].addmm_(w.T, query[q0:q1])
            if need_query:
                if key_inv_norm is not None:
                    w.mul_(key_inv_norm[k0:k1])
                grad_query[q0:q1].addmm_(w, keys)
    return grad_query, grad_key
