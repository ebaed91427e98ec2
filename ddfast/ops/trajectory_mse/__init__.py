"""``trajectory_mse``: the MTT trajectory-matching loss, batched over trajectories and parameter lists.

For each trajectory b: ``||student_b - target_b||^2 / ||start_b - target_b||^2``, the norms over all of
its parameters. One fused pass reads each input once and accumulates in float32 (float64 for
float64 inputs) with partial sums of bounded length, so the error does not grow with P. Non-finite
inputs and a zero denominator raise ``ValueError``; finite inputs whose squares would overflow or
underflow are summed scaled (see :mod:`.values`). The argument forms are described in :mod:`.inputs`.

Backends: ``reference`` (plain torch, autograd), ``torch`` (streaming, any device), ``cpu``
(C++), ``triton`` (GPU, or CPU under ``TRITON_INTERPRET=1``), ``cuda`` (CUDA C++, one launch over
all parameter tensors). All but ``reference`` run as the operators
``torch.ops.ddfast.trajectory_mse_forward`` / ``_backward`` of :mod:`.op`, opaque to ``torch.compile``,
which resolve ``backend`` themselves; :mod:`.streaming` describes the protocol every backend follows.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ... import _checks, _transforms
from . import distributed, reference
from .inputs import as_lists
from .op import REGISTRY

__all__ = ["trajectory_mse", "TrajectoryMSE", "REGISTRY"]


def trajectory_mse(student, start, target, *, reduction: str = "mean", batched: bool | None = None,
                   backend: str = "auto", group=None) -> Tensor:
    """Normalised distance of each student trajectory to its target.

    Args:
        student, start, target: each a (B, P) tensor, a (P,) tensor (one trajectory), or a list of the
            per-parameter tensors of one trajectory (any shapes). ``batched=True`` reads a list as
            per-parameter tensors of shape (B, *param_shape) for B trajectories; ``batched=False``
            reads any tensor or list as one trajectory. float32 / float64 / bfloat16 / float16, one
            dtype and device for all; the three match tensor by tensor. Any strides.
        reduction: ``"mean"`` or ``"sum"`` over the B trajectories, or ``"none"`` for a (B,) tensor.
        backend: ``"auto"`` or one of ``REGISTRY.names()``.
        group: a ``torch.distributed`` process group: the arguments are then this rank's share of every
            trajectory's parameters (some tensors or slices; B, dtype and reduction the same on every rank),
            the loss that of all ranks' parameters and the gradients this rank's. Not with
            ``backend="reference"``; ``torch.compile`` does not trace it.

    Returns:
        The loss in the inputs' dtype. Gradients flow to every input that requires one.

    Raises:
        ValueError: where an input holds a nan or an inf (naming it), or ``start`` equals ``target``
            for some trajectory (zero denominator). The checks read (B,) sums: one device
            synchronisation per forward on a GPU.
        NotImplementedError: for forward-mode AD, ``torch.func.grad`` / ``vjp`` / ``jacrev`` and double
            backward, except with ``backend="reference"`` (plain torch, every transform).
    """
    if group is not None:
        return _sharded(student, start, target, reduction, batched, backend, group)
    _checks.reduction(reduction)
    REGISTRY.check_name(backend)
    if backend == "reference":
        return reference.trajectory_mse(student, start, target, reduction=reduction, batched=batched)
    _transforms.refuse_unsupported("ddfast.trajectory_mse", student, start, target)
    student, start, target, trajectories = as_lists(student, start, target, batched=batched)
    return torch.ops.ddfast.trajectory_mse_forward(student, start, target, trajectories, reduction, backend)[0]


def _sharded(student, start, target, reduction, batched, backend, group) -> Tensor:
    """``trajectory_mse`` over a process group (``distributed.py``); a rank whose arguments fail the
    checks raises its error and the others raise ``RankFailed``."""
    failure, trajectories = None, 0
    try:
        _checks.reduction(reduction)
        REGISTRY.check_name(backend)
        if backend == "reference":
            raise ValueError("backend='reference' does not run with group=: it needs every parameter in one process")
        _transforms.refuse_unsupported("ddfast.trajectory_mse", student, start, target)
        student, start, target, trajectories = as_lists(student, start, target, batched=batched)
    except (TypeError, ValueError, NotImplementedError) as error:
        failure = error
    plan = distributed.agree(student, trajectories, reduction, backend, group, failure)
    return distributed.ShardedTrajectoryMSE.apply(plan, *student, *start, *target)


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

