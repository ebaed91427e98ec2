"""The ``ddfast::trajectory_mse_forward`` / ``ddfast::trajectory_mse_backward`` operators and their autograd.

Here: ``REGISTRY``, the backends and ``auto``'s preference (each compiled backend names the function
that imports its module); the forward operator, which resolves the backend, runs its ``forward`` on
the checked lists of :mod:`.inputs`, redoes scaled the trajectories whose sums left the accumulation
dtype's range, checks values (see :mod:`.values`), divides and reduces; the backward operator, which
computes the flagged inputs' gradients through the backend's ``backward``; their fake
implementations, the forward's vmap rule and the autograd formula joining them. Both operators are
opaque to ``torch.compile``: the backend is resolved and values are read inside them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ... import _custom_ops, _transforms
from ..._backends import Registry, accumulation_dtype, cpu_extension, cuda_extension, triton_kernels
from .._reduction import reduce, row_grads
from . import cpu, cuda, streaming, values
from .inputs import element_aligned


def _triton():
    from . import triton  # imports Triton: only once a Triton kernel runs
    return triton


REGISTRY = Registry("trajectory_mse", preference={"cuda": ("cuda", "triton"), "cpu": ("cpu",)}, streaming=lambda: streaming)
REGISTRY.add(cpu_extension(cpu, "trajectory_mse_cpu"))
REGISTRY.add(triton_kernels(_triton))
REGISTRY.add(cuda_extension(cuda, "trajectory_mse_cuda"))


@_custom_ops.custom_op("ddfast::trajectory_mse_forward")
def trajectory_mse_forward(student: list[Tensor], start: list[Tensor], target: list[Tensor], trajectories: int,
                           reduction: str, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, per_trajectory, den, exponent) from checked lists (see :mod:`.inputs`).

    ``loss``: ``per_trajectory`` reduced by ``reduction``, in the inputs' dtype. ``per_trajectory``
    and ``den``: (B,) in the accumulation dtype. ``exponent``: (B,) on the CPU: trajectory b was
    summed scaled by ``2**-exponent[b]`` (see :mod:`.values`), and ``den`` is its scaled denominator.
    """
    kernels = REGISTRY.kernels(backend, student[0])
    student, start, target = (element_aligned(tensors) for tensors in (student, start, target))
    num, den = kernels.forward(student, start, target, trajectories)
    exponent = torch.zeros(trajectories, dtype=num.dtype)
    dtype = student[0].dtype
    redo = values.out_of_range(num, den, sum(x.numel() for x in student) // trajectories, dtype)
    if bool(redo.any()):
        maxima = values.row_maxima(student, start, target, trajectories)
        values.check_finite(maxima)
        exponent = torch.where(redo, values.exponents(maxima, dtype), 0)
        if bool(exponent.any()):
            scaled = (values.scaled(tensors, exponent, trajectories) for tensors in (student, start, target))
            num, den = (torch.where(redo, again, first) for again, first in zip(kernels.forward(*scaled, trajectories), (num, den)))
        values.check_denominator(den)
        exponent = exponent.cpu()
    per_trajectory = num / den
    return reduce(per_trajectory, reduction).to(dtype, copy=True), per_trajectory, den, exponent


@trajectory_mse_forward.register_fake
def _forward_fake(student, start, target, trajectories, reduction, backend):
    per_trajectory = student[0].new_empty((trajectories,), dtype=accumulation_dtype(student[0].dtype))
    loss = student[0].new_empty((trajectories,) if reduction == "none" else ())
    return loss, per_trajectory, torch.empty_like(per_trajectory), torch.empty_like(per_trajectory, device="cpu")


@trajectory_mse_forward.register_vmap
def _forward_vmap(info, in_dims, student, start, target, trajectories, reduction, backend):
    """Once per entry of the vmapped dimension, on that entry's (contiguous) tensors."""
    def entry(tensors, dims, index):
        return [x if dim is None else x.select(dim, index).contiguous() for x, dim in zip(tensors, dims)]

    outputs = [trajectory_mse_forward(*(entry(tensors, dims, index) for tensors, dims in zip((student, start, target), in_dims[:3])),
                                      trajectories, reduction, backend) for index in range(info.batch_size)]
    return tuple(torch.stack(per_entry) for per_entry in zip(*outputs)), (0, 0, 0, 0)


@_custom_ops.custom_op("ddfast::trajectory_mse_backward")
def trajectory_mse_backward(grad: Tensor, per_trajectory: Tensor, den: Tensor, exponent: Tensor, student: list[Tensor],
                            start: list[Tensor], target: list[Tensor], needs: list[bool], backend: str) -> list[Tensor]:
    """The gradients flagged in ``needs`` (3 flags per tensor: student's, start's, target's), in that order,
    given ``grad``, the (B,) gradient of ``per_trajectory``. Trajectories the forward scaled are
    differentiated scaled: the loss does not change under the scale ``s = 2**-exponent``, so its
    gradient is ``s`` times the gradient at the scaled inputs."""
    kernels = REGISTRY.kernels(backend, student[0])
    trajectories = grad.shape[0]
    tensors = [element_aligned(x) for x in (student, start, target)]
    if not bool(exponent.any()):
        return kernels.backward(grad.contiguous(), per_trajectory, den, *tensors, needs)
    exponent = exponent.to(student[0].device)
    tensors = [values.scaled(x, exponent, trajectories) for x in tensors]
    grads = kernels.backward(grad.contiguous(), per_trajectory, den, *tensors, needs)
    return values.scaled(grads, exponent, trajectories)


@trajectory_mse_backward.register_fake
def _backward_fake(grad, per_trajectory, den, exponent, student, start, target, needs, backend):
    return [torch.empty_like(x) for x, need in zip(student + start + target, needs) if need]


_transforms.refuse_double_backward("ddfast.trajectory_mse", trajectory_mse_backward)


def _setup_context(ctx, inputs, output):
    student, start, target, _, reduction, backend = inputs
    _, per_trajectory, den, exponent = output
    ctx.count, ctx.reduction, ctx.backend = len(student), reduction, backend
    ctx.save_for_backward(per_trajectory, den, exponent, *student, *start, *target)
    ctx.mark_non_differentiable(per_trajectory, den, exponent)


def _backward_formula(ctx, grad_loss, grad_per_trajectory, grad_den, grad_exponent):
    n = ctx.count
    per_trajectory, den, exponent, *tensors = ctx.saved_tensors
    student, start, target = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
    grad = row_grads(grad_loss, ctx.reduction, per_trajectory.shape[0], dtype=per_trajectory.dtype)
    needs = [bool(flag) for flags in ctx.needs_input_grad[:3] for flag in flags]
    grads = iter(trajectory_mse_backward(grad, per_trajectory, den, exponent, student, start, target, needs, ctx.backend))
    per_input = [[next(grads) if need else None for need in needs[k * n:(k + 1) * n]] for k in range(3)]
    return *per_input, None, None, None


trajectory_mse_forward.register_autograd(_backward_formula, setup_context=_setup_context)
