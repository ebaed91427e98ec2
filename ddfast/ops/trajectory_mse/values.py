"""The rules on values of ``trajectory_mse``, shared by the reference and the fused operators.

- A nan or inf in ``student``, ``start`` or ``target`` raises ``ValueError`` naming the argument.
- A zero denominator ``||start_b - target_b||^2`` raises ``ValueError`` naming the trajectories.
- Finite inputs do not overflow or underflow where the ratio does not: the ratio is invariant under
  scaling a trajectory's three vectors by one factor, so its sums are taken on the trajectory times
  a power of two (exact) that brings its largest |entry| near 1. The reference always scales; the
  fused operators sum unscaled and redo, scaled, only the trajectories whose sums came out of
  :func:`out_of_range`, so that finite, moderate inputs pay nothing extra.

The maxima of :func:`row_maxima` serve both the scale and the finiteness check: the maximum of |x|
over a trajectory is nan or inf exactly where that trajectory holds a nan or an inf.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import _checks, _custom_ops
from ..._backends import accumulation_dtype
from .inputs import NAMES, rows

# |exponent| of the power-of-two scale, at most what the scaled dtype holds exactly (float16 needs no
# scale: float32 sums of its squares can neither overflow nor underflow)
EXPONENT_LIMIT = {torch.float16: 0, torch.bfloat16: 126, torch.float32: 126, torch.float64: 1022}


def row_maxima(student: list[Tensor], start: list[Tensor], target: list[Tensor], trajectories: int) -> Tensor:
    """(3, B), accumulation dtype: max |x| over each trajectory of student, start and target (detached)."""
    acc = accumulation_dtype(student[0].dtype)
    maxima = []
    for tensors in (student, start, target):
        per_tensor = [row.detach().abs().amax(dim=1) for row in rows(tensors, trajectories) if row.shape[1] > 0]
        maxima.append(torch.stack(per_tensor).amax(dim=0).to(acc))
    return torch.stack(maxima)


def check_finite(maxima: Tensor) -> None:
    """Raise ``ValueError`` naming the first argument whose :func:`row_maxima` are not finite."""
    for name, per_trajectory in zip(NAMES, maxima):
        _checks.finite(name, per_trajectory)


def check_denominator(denominator: Tensor) -> None:
    """Raise ``ValueError`` when some ``||start_b - target_b||^2`` is zero (reads the values: one sync)."""
    zero = denominator == 0
    if bool(zero.any()):
        zero = zero.nonzero().flatten().tolist()
        raise ValueError(
            f"trajectory_mse: ||start - target||^2 is zero for trajectory {zero[:10]}{' ...' if len(zero) > 10 else ''} "
            "(start equals target, or their difference underflows): the normalised distance is undefined there")


def exponents(maxima: Tensor, dtype: torch.dtype) -> Tensor:
    """(B,), maxima's dtype: integers e with ``max |entry| * 2**-e`` in [0.5, 1), clamped to what ``dtype``
    scales exactly; 0 for all-zero trajectories."""
    largest = maxima.amax(dim=0)
    limit = EXPONENT_LIMIT[dtype]
    exponent = torch.where(largest > 0, torch.floor(torch.log2(largest)) + 1, 0)
    return exponent.clamp(-limit, limit)


def scaled(tensors: list[Tensor], exponent: Tensor, trajectories: int) -> list[Tensor]:
    """Each tensor with its trajectory b multiplied by ``2**-exponent[b]``, in its dtype (contiguous)."""
    scale = torch.exp2(-exponent).unsqueeze(1)
    return [(row * scale.to(x.dtype)).view(x.shape) for x, row in zip(tensors, rows(tensors, trajectories))]


def out_of_range(numerator: Tensor, denominator: Tensor, elements: int, dtype: torch.dtype) -> Tensor:
    """(B,) bool: unscaled sums of ``elements`` squares of ``dtype`` values that may be wrong or undefined:
    not finite, a zero denominator, or small enough that squares below the accumulation dtype's
    smallest normal number could matter."""
    floor = elements * torch.finfo(numerator.dtype).tiny if EXPONENT_LIMIT[dtype] else 0.0
    finite = torch.isfinite(numerator) & torch.isfinite(denominator)
    return ~finite | (numerator < floor) | (denominator <= floor)


@_custom_ops.custom_op("ddfast::trajectory_mse_check_values")
def check_values(maxima: Tensor, denominator: Tensor) -> None:
    """:func:`check_finite` then :func:`check_denominator`, as an operator: it runs on real tensors under
    ``torch.func.vmap`` (once per entry) and stays one node of a ``torch.compile`` graph."""
    check_finite(maxima)
    check_denominator(denominator)


@check_values.register_fake
def _check_values_fake(maxima, denominator):
    return None


@check_values.register_vmap
def _check_values_vmap(info, in_dims, maxima, denominator):
    for entry in range(info.batch_size):
        check_values(*(x if dim is None else x.select(dim, entry) for x, dim in zip((maxima, denominator), in_dims)))
    return None, None


torch.fx.node.has_side_effect(torch.ops.ddfast.trajectory_mse_check_values.default)
