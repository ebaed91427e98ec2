"""``trajectory_mse`` with the parameters sharded over the ranks of a process group, exact.

Each rank holds some of the parameter tensors (or slices of them) of the same B trajectories. The
backend sums each rank's (B,) numerator and denominator; one all-reduce of 2 B values gives the
global ones. Trajectories whose sums leave the accumulation dtype's range are summed again scaled,
as in one process, by a power of two taken from the all-reduced maxima (the same on every rank).
The backward is local: each rank's gradients need only the global ratio and denominator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..._backends import accumulation_dtype
from .. import _distributed
from .._reduction import reduce, row_grads
from . import op, values

NAME = "ddfast.trajectory_mse"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FIELDS = ("the number of trajectories B", "the dtype", "reduction", "elements")  # the first 3 must agree across ranks


@dataclass(frozen=True)
class Plan:
    group: object
    trajectories: int
    elements: int  # per trajectory, over all ranks
    reduction: str
    backend: str


def agree(student: list[torch.Tensor], trajectories: int, reduction: str, backend: str, group, failure: BaseException | None) -> Plan:
    """Gather every rank's B, dtype, reduction and element count; ``ValueError`` on every rank where they disagree."""
    fields = dict.fromkeys(FIELDS, 0)
    if failure is None:
        fields.update(zip(FIELDS, (trajectories, _DTYPES.index(student[0].dtype), ("mean", "sum", "none").index(reduction),
                                   sum(x.numel() for x in student) // trajectories)))
    table = _distributed.agree(group, NAME, fields, FIELDS[:3], failure,
                               like=student[0] if isinstance(student, list) and student else student)
    return Plan(group, trajectories, sum(table["elements"]), reduction, backend)


class ShardedTrajectoryMSE(torch.autograd.Function):
    """``apply(plan, *student, *start, *target)``: the loss of all ranks' parameters; in backward, the
    gradients of this rank's tensors."""

    @staticmethod
    def forward(ctx, plan: Plan, *tensors: torch.Tensor) -> torch.Tensor:
        n = len(tensors) // 3
        student, start, target = (op.element_aligned(list(tensors[k * n:(k + 1) * n])) for k in range(3))
        b, dtype, failure = plan.trajectories, student[0].dtype, None
        try:
            kernels = op.REGISTRY.kernels(plan.backend, student[0])
            local = torch.stack(kernels.forward(student, start, target, b))
        except Exception as error:  # every rank raises: see _distributed.all_reduce
            failure, local = error, student[0].new_zeros((2, b), dtype=accumulation_dtype(dtype))
        num, den = _distributed.all_reduce(local, "sum", plan.group, guard=NAME, failure=failure)
        exponent = torch.zeros(b, dtype=num.dtype)
        redo = values.out_of_range(num, den, plan.elements, dtype)
        if bool(redo.any()):  # the same on every rank: the sums are global
            maxima = values.row_maxima(student, start, target, b).nan_to_num(nan=float("inf"))
            maxima = _distributed.all_reduce(maxima, "max", plan.group)
            values.check_finite(maxima)
            exponent = torch.where(redo, values.exponents(maxima, dtype), 0)
            if bool(exponent.any()):
                scaled = (values.scaled(x, exponent, b) for x in (student, start, target))
                again = _distributed.all_reduce(torch.stack(kernels.forward(*scaled, b)), "sum", plan.group)
                num, den = (torch.where(redo, second, first) for second, first in zip(again, (num, den)))
            values.check_denominator(den)
            exponent = exponent.cpu()
        per_trajectory = num / den
        ctx.save_for_backward(per_trajectory, den, exponent, *student, *start, *target)
        ctx.plan, ctx.count = plan, n
        return reduce(per_trajectory, plan.reduction).to(dtype, copy=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        per_trajectory, den, exponent, *tensors = ctx.saved_tensors
        n, plan = ctx.count, ctx.plan
        needs = list(ctx.needs_input_grad[1:])
        grad = row_grads(grad, plan.reduction, plan.trajectories, dtype=per_trajectory.dtype)
        grads = iter(op.trajectory_mse_backward(grad, per_trajectory, den, exponent, list(tensors[:n]), list(tensors[n:2 * n]),
                                                list(tensors[2 * n:]), needs, plan.backend))
        return None, *(next(grads) if need else None for need in needs)
