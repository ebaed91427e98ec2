"""Backend "torch": the fused pass in plain torch, a block of columns at a time, on any device.

The backend protocol, which every backend module (``streaming``, ``cpu``, ``triton``, ``cuda``)
defines with these names and signatures. Inputs: three lists of contiguous tensors of one dtype,
tensor i seen as a (B, n_i) matrix (see :mod:`.inputs`).

- ``forward(student, start, target, trajectories) -> (num, den)``: the (B,) sums
  ``||student_b - target_b||^2`` and ``||start_b - target_b||^2``, in the accumulation dtype
  (float32, or float64 for float64 inputs); the operator checks them and divides.
- ``backward(grad, loss, den, student, start, target, needs) -> list``: given ``grad``, the (B,)
  gradient of ``loss = num / den`` (both in the accumulation dtype), and ``needs``, 3n flags
  (student's tensors, then start's, then target's), the flagged gradients in that order, shaped
  like the inputs, in their dtype. With ``a = 2 grad / den`` and ``c = a * loss``:
  ``d student = a (student - target)``, ``d start = -c (start - target)``,
  ``d target = -(d student + d start)``.

Here temporaries hold at most ``B * COLUMNS`` elements; every block's sums are float32 (torch's
pairwise reductions) and the blocks' partials are added pairwise too, so the error does not grow
with P.
"""

from __future__ import annotations

import torch

from ..._backends import accumulation_dtype
from .inputs import rows

COLUMNS = 1 << 16


def forward(student: list[torch.Tensor], start: list[torch.Tensor], target: list[torch.Tensor],
            trajectories: int) -> tuple[torch.Tensor, torch.Tensor]:
    acc = accumulation_dtype(student[0].dtype)
    numerators, denominators = [], []
    for s, st, t in zip(*(rows(x, trajectories) for x in (student, start, target))):
        for cols in _blocks(s.shape[1]):
            t_block = t[:, cols].to(acc)
            numerators.append((s[:, cols].to(acc) - t_block).square().sum(dim=1))
            denominators.append((st[:, cols].to(acc) - t_block).square().sum(dim=1))
    return torch.stack(numerators).sum(dim=0), torch.stack(denominators).sum(dim=0)


def backward(grad: torch.Tensor, loss: torch.Tensor, den: torch.Tensor, student: list[torch.Tensor], start: list[torch.Tensor],
             target: list[torch.Tensor], needs: list[bool]) -> list[torch.Tensor]:
    acc = accumulation_dtype(student[0].dtype)
    a = (2 * grad / den).unsqueeze(1)
    c = a * loss.unsqueeze(1)
    n, trajectories = len(student), grad.shape[0]
    grads = [torch.empty_like(x) if need else None for x, need in zip(student + start + target, needs)]
    views = [None if g is None else g.view(trajectories, -1) for g in grads]
    for i, (s, st, t) in enumerate(zip(*(rows(x, trajectories) for x in (student, start, target)))):
        d_student, d_start, d_target = views[i], views[n + i], views[2 * n + i]
        if d_student is None and d_start is None and d_target is None:
            continue
        for cols in _blocks(s.shape[1]):
            t_block = t[:, cols].to(acc)
            ds = a * (s[:, cols].to(acc) - t_block)
            dst = c * (t_block - st[:, cols].to(acc)) if d_start is not None or d_target is not None else None
            if d_student is not None:
                d_student[:, cols] = ds
            if d_start is not None:
                d_start[:, cols] = dst
            if d_target is not None:
                d_target[:, cols] = -(ds + dst)
    return [g for g in grads if g is not None]


def _blocks(columns: int) -> list[slice]:
    return [slice(j, min(j + COLUMNS, columns)) for j in range(0, columns, COLUMNS)]
