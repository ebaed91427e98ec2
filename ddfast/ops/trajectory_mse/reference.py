"""The MTT loss as the public reference code computes it: the oracle for every backend.

Per trajectory b, every parameter flattened and concatenated into one vector, then
``||student_b - target_b||^2 / ||start_b - target_b||^2``, all in the inputs' dtype. A zero
denominator (start equal to target) raises ``ValueError`` here as in every backend.
"""

from __future__ import annotations

import torch

from ddfast import _checks
from ddfast.ops.trajectory_mse.inputs import as_lists, rows


def trajectory_mse(student, start, target, *, reduction: str = "mean", batched: bool | None = None) -> torch.Tensor:
    """The normalised distance per trajectory, reduced; argument forms as in :mod:`.inputs`."""
    _checks.reduction(reduction)
    return reduce(per_trajectory(*as_lists(student, start, target, batched=batched)), reduction)


def per_trajectory(student: list[torch.Tensor], start: list[torch.Tensor], target: list[torch.Tensor], trajectories: int) -> torch.Tensor:
    """(B,) distances from checked lists (see :mod:`.inputs`): flatten and concatenate, squared norms, ratio."""
    student, start, target = (torch.cat(rows(tensors, trajectories), dim=1) for tensors in (student, start, target))
    numerator = (student - target).square().sum(dim=1)
    denominator = (start - target).square().sum(dim=1)
    check_denominator(denominator)
    return numerator / denominator


def check_denominator(denominator: torch.Tensor) -> None:
    """Raise ``ValueError`` when some ``||start_b - target_b||^2`` is zero (reads the values: one sync)."""
    zero = denominator == 0
    if bool(zero.any()):
        zero = zero.nonzero().flatten().tolist()
        raise ValueError(
            f"trajectory_mse: ||start - target||^2 is zero for trajectory {zero[:10]}{' ...' if len(zero) > 10 else ''} "
            "(start equals target, or their difference underflows): the normalised distance is undefined there")


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """``mean`` / ``sum`` over trajectories, or the (B,) vector for ``none``."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss
