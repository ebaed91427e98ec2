"""The reduction every operator applies to its per-row losses, and the per-row gradient it implies.

``reduction`` is ``"none"`` (the rows themselves), ``"sum"``, or ``"mean"``: the sum over ``count``
rows (all of them by default; InfoNCE counts only the queries that have a positive), 0 when there
are none. Rows are in the accumulation dtype (float32, float64 for float64 inputs).
"""

from __future__ import annotations

import torch


def reduce(rows: torch.Tensor, reduction: str, count: int | torch.Tensor | None = None) -> torch.Tensor:
    """(R,) ``rows`` -> (R,) for ``none``, else a 0-dim tensor: their sum, or their sum / max(count, 1)."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    count = rows.shape[0] if count is None else count
    return total / (count.clamp_min(1) if isinstance(count, torch.Tensor) else max(count, 1))


def row_grads(grad: torch.Tensor, reduction: str, rows: int, count: int | torch.Tensor | None = None,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    """(R,) contiguous gradient of each row's loss, given ``grad`` of ``reduce(rows, reduction, count)``."""
    grad = grad.to(dtype or grad.dtype)
    if reduction == "none":
        return grad.contiguous()
    if reduction == "mean":
        count = rows if count is None else count
        grad = grad / (count.clamp_min(1) if isinstance(count, torch.Tensor) else max(count, 1))
    return grad.reshape(()).expand(rows).contiguous()
