"""The MTT loss as the public reference code computes it: the oracle for every backend.

Per trajectory b, every parameter flattened and concatenated into one vector, then
``||student_b - target_b||^2 / ||start_b - target_b||^2``, computed in the accumulation dtype
(float32, float64 for float64 inputs) on the trajectory scaled by a power of two, as every backend
does (see :mod:`.values`); the loss comes back in the inputs' dtype. Non-finite inputs and a zero
denominator raise ``ValueError`` here as in every backend. Plain torch: every autograd and
``torch.func`` transform applies.
"""

from __future__ import annotations

import torch

from ... import _checks
from ..._backends import accumulation_dtype
from .._reduction import reduce
from . import values
from .inputs import as_lists, rows


def trajectory_mse(student, start, target, *, reduction: str = "mean", batched: bool | None = None) -> torch.Tensor:
    """The normalised distance per trajectory, reduced; argument forms as in :mod:`.inputs`."""
    _checks.reduction(reduction)
    student, start, target, trajectories = as_lists(student, start, target, batched=batched)
    return reduce(per_trajectory(student, start, target, trajectories), reduction).to(student[0].dtype)


def per_trajectory(student: list[torch.Tensor], start: list[torch.Tensor], target: list[torch.Tensor], trajectories: int) -> torch.Tensor:
    """(B,) distances in the accumulation dtype from checked lists (see :mod:`.inputs`): flatten and
    concatenate, scale, squared norms, ratio."""
    acc = accumulation_dtype(student[0].dtype)
    maxima = values.row_maxima(student, start, target, trajectories)
    scale = torch.exp2(-values.exponents(maxima, acc)).unsqueeze(1)
    student, start, target = (torch.cat(rows(tensors, trajectories), dim=1).to(acc) * scale for tensors in (student, start, target))
    numerator = (student - target).square().sum(dim=1)
    denominator = (start - target).square().sum(dim=1)
    values.check_values(maxima, denominator.detach())
    return numerator / denominator

