"""``trajectory_mse``: the MTT trajectory-matching loss, batched over trajectories and parameter lists.

For each trajectory b: ``||student_b - target_b||^2 / ||start_b - target_b||^2``, the norms over all of
its parameters. One fused pass reads each input once and accumulates in float32 (float64 for
float64 inputs) with partial sums of bounded length, so the error does not grow with P. Non-finite
inputs and a zero denominator raise ``ValueError``; finite inputs whose squares would overflow or
underflow are summed scaled (see :mod:`.values`). The argument forms are described in :mod:`.inputs`.

Backends: ``reference`` (plain torch, autograd), ``torch`` (streaming, any device), ``cpu``
(C++), ``triton`` (GPU, or CPU under ``TRITON_INTERPRET=1``), ``cuda`` (CUDA C++, one launch over
all parameter tensors). All but ``reference`` run as the operators
``torch.ops.ddfast.trajectory_mse_forward`` / ``_backward``, opaque to ``torch.compile``; they
resolve ``backend`` themselves.
"""

from __future__ import annotations

import importlib

import torch
from torch import Tensor, nn

from ddfast import _checks, _transforms
from ddfast._backends import Backend, Registry, accumulation_dtype, triton_missing, triton_runs_on
from ddfast.ops.trajectory_mse import cpu, cuda, reference, values
from ddfast.ops.trajectory_mse.inputs import as_lists, element_aligned

__all__ = ["trajectory_mse", "TrajectoryMSE", "REGISTRY"]

REGISTRY = Registry("trajectory_mse", preference={"cuda": ("cuda", "triton"), "cpu": ("cpu",)})
REGISTRY.add(Backend("reference", runs_on=lambda device_type: True))
REGISTRY.add(Backend("torch", runs_on=lambda device_type: True))
REGISTRY.add(Backend("cpu", runs_on=lambda device_type: device_type == "cpu", missing=cpu.missing))
REGISTRY.add(Backend("triton", runs_on=triton_runs_on, missing=triton_missing))
REGISTRY.add(Backend("cuda", runs_on=lambda device_type: device_type == "cuda", missing=cuda.missing))

# the module implementing each operator backend (imported on first use: triton is slow to import)
_MODULES = {"torch": "streaming", "cpu": "cpu", "triton": "triton", "cuda": "cuda"}


def trajectory_mse(student, start, target, *, reduction: str = "mean", batched: bool | None = None,
                   backend: str = "auto") -> Tensor:
    """Normalised distance of each student trajectory to its target.

    Args:
        student, start, target: each a (B, P) tensor, a (P,) tensor (one trajectory), or a list of the
            per-parameter tensors of one trajectory (any shapes). ``batched=True`` reads a list as
            per-parameter tensors of shape (B, *param_shape) for B trajectories; ``batched=False``
            reads any tensor or list as one trajectory. float32 / float64 / bfloat16 / float16, one
            dtype and device for all; the three match tensor by tensor. Any strides.
        reduction: ``"mean"`` or ``"sum"`` over the B trajectories, or ``"none"`` for a (B,) tensor.
        backend: ``"auto"`` or one of ``REGISTRY.names()``.

    Returns:
        The loss in the inputs' dtype. Gradients flow to every input that requires one.

    Raises:
        ValueError: where an input holds a nan or an inf (naming it), or ``start`` equals ``target``
            for some trajectory (zero denominator). The checks read (B,) sums: one device
            synchronisation per forward on a GPU.
        NotImplementedError: for forward-mode AD, ``torch.func.grad`` / ``vjp`` / ``jacrev`` and double
            backward, except with ``backend="reference"`` (plain torch, every transform).
    """
    _checks.reduction(reduction)
    if backend != "reference":
        _transforms.refuse_unsupported("ddfast.trajectory_mse", student, start, target)
    student, start, target, trajectories = as_lists(student, start, target, batched=batched)
    if backend == "reference":
        loss = reference.per_trajectory(student, start, target, trajectories)
    else:
        loss, _, _ = torch.ops.ddfast.trajectory_mse_forward(student, start, target, trajectories, backend)
    return reference.reduce(loss, reduction).to(student[0].dtype)


class TrajectoryMSE(nn.Module):
    """``nn.Module`` twin of :func:`trajectory_mse`: ``TrajectoryMSE(reduction=...)(student, start, target)``."""

    def __init__(self, *, reduction: str = "mean", batched: bool | None = None, backend: str = "auto"):
        super().__init__()
        self.reduction = _checks.reduction(reduction)
        self.batched = batched
        self.backend = backend

    def forward(self, student, start, target) -> Tensor:
        return trajectory_mse(student, start, target, reduction=self.reduction, batched=self.batched, backend=self.backend)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, batched={self.batched}, backend={self.backend!r}"


def _kernels(backend: str, like: Tensor):
    """What serves ``forward`` / ``backward`` for ``backend`` (``auto`` resolved) and inputs ``like`` this
    one: our module, or a compiled extension's operators. Called inside the operators, so that probing
    backends (building an extension) stays out of what ``torch.compile`` traces."""
    name = REGISTRY.resolve(backend, like.device, like.dtype)
    if name == "reference":
        raise ValueError("backend='reference' is plain torch and does not run through the fused operator")
    module = importlib.import_module(f"{__name__}.{_MODULES[name]}")
    return module.operators() if hasattr(module, "operators") else module


@torch.library.custom_op("ddfast::trajectory_mse_forward", mutates_args=())
def _forward(student: list[Tensor], start: list[Tensor], target: list[Tensor], trajectories: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, den, exponent) per trajectory from checked lists (see :mod:`.inputs`): loss and den (B,) in the
    accumulation dtype, exponent (B,) on the CPU: trajectory b was summed scaled by ``2**-exponent[b]``
    (see :mod:`.values`), and den is its scaled denominator."""
    kernels = _kernels(backend, student[0])
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
    return num / den, den, exponent


@_forward.register_fake
def _forward_fake(student, start, target, trajectories, backend):
    loss = student[0].new_empty((trajectories,), dtype=accumulation_dtype(student[0].dtype))
    return loss, torch.empty_like(loss), torch.empty_like(loss, device="cpu")


@_forward.register_vmap
def _forward_vmap(info, in_dims, student, start, target, trajectories, backend):
    """Once per entry of the vmapped dimension, on that entry's (contiguous) tensors."""
    def entry(tensors, dims, index):
        return [x if dim is None else x.select(dim, index).contiguous() for x, dim in zip(tensors, dims)]

    outputs = [_forward(*(entry(tensors, dims, index) for tensors, dims in zip((student, start, target), in_dims[:3])),
                        trajectories, backend) for index in range(info.batch_size)]
    return tuple(torch.stack(per_entry) for per_entry in zip(*outputs)), (0, 0, 0)


@torch.library.custom_op("ddfast::trajectory_mse_backward", mutates_args=())
def _backward(grad: Tensor, loss: Tensor, den: Tensor, exponent: Tensor, student: list[Tensor], start: list[Tensor],
              target: list[Tensor], needs: list[bool], backend: str) -> list[Tensor]:
    """The gradients flagged in ``needs`` (3 flags per tensor: student's, start's, target's), in that order.
    Trajectories the forward scaled are differentiated scaled: the loss does not change under the
    scale ``s = 2**-exponent``, so its gradient is ``s`` times the gradient at the scaled inputs."""
    kernels = _kernels(backend, student[0])
    trajectories = grad.shape[0]
    tensors = [element_aligned(x) for x in (student, start, target)]
    if not bool(exponent.any()):
        return kernels.backward(grad.contiguous(), loss, den, *tensors, needs)
    exponent = exponent.to(student[0].device)
    tensors = [values.scaled(x, exponent, trajectories) for x in tensors]
    grads = kernels.backward(grad.contiguous(), loss, den, *tensors, needs)
    return values.scaled(grads, exponent, trajectories)


@_backward.register_fake
def _backward_fake(grad, loss, den, exponent, student, start, target, needs, backend):
    return [torch.empty_like(x) for x, need in zip(student + start + target, needs) if need]


_transforms.refuse_double_backward("ddfast.trajectory_mse", _backward)


def _setup_context(ctx, inputs, output):
    student, start, target, _, backend = inputs
    loss, den, exponent = output
    ctx.count = len(student)
    ctx.backend = backend
    ctx.save_for_backward(loss, den, exponent, *student, *start, *target)
    ctx.mark_non_differentiable(den, exponent)


def _backward_formula(ctx, grad_loss, grad_den, grad_exponent):
    n = ctx.count
    loss, den, exponent, *tensors = ctx.saved_tensors
    student, start, target = tensors[:n], tensors[n:2 * n], tensors[2 * n:]
    needs = [bool(flag) for flags in ctx.needs_input_grad[:3] for flag in flags]
    grads = iter(_backward(grad_loss, loss, den, exponent, student, start, target, needs, ctx.backend))
    per_input = [[next(grads) if need else None for need in needs[k * n:(k + 1) * n]] for k in range(3)]
    return *per_input, None, None


_forward.register_autograd(_backward_formula, setup_context=_setup_context)
