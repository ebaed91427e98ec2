"""Backend ``cpu``: the compiled C++ kernel of ``csrc/infonce/infonce_cpu.cpp``.

The protocol of ``streaming.py``; blocks of logits come from BLAS, then one fused vectorised pass
per row (parallel over query rows) consumes them while they are in cache.
"""

from __future__ import annotations

import torch

from ... import _extension


def _ops():
    return _extension.load("infonce_cpu")


def lse(query: torch.Tensor, key: torch.Tensor, key_inv_norm: torch.Tensor | None, scale: float) -> torch.Tensor:
    return _ops().lse(query.contiguous(), key, key_inv_norm, scale)


def grads(query: torch.Tensor, key: torch.Tensor, key_inv_norm: torch.Tensor | None, scale: float, lse: torch.Tensor,
          weight: torch.Tensor, need_query: bool, need_key: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    grad_query, grad_key = _ops().grads(query.contiguous(), key, key_inv_norm, scale, lse.contiguous(),
                                        weight.contiguous(), need_query, need_key)
    return (grad_query if need_query else None), (grad_key if need_key else None)
