"""Backend "cuda": the protocol of :mod:`.streaming` over the multi-tensor CUDA C++ kernel of
``csrc/trajectory_mse/trajectory_mse_cuda.cu``, on CUDA tensors: one launch covers every parameter
tensor of every trajectory (forward adds one small launch that sums each trajectory's partials).
"""

from __future__ import annotations

import torch

from ... import _extension


def forward(student: list[torch.Tensor], start: list[torch.Tensor], target: list[torch.Tensor],
            trajectories: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _extension.load("trajectory_mse_cuda").forward(student, start, target, trajectories)


def backward(grad: torch.Tensor, loss: torch.Tensor, den: torch.Tensor, student: list[torch.Tensor], start: list[torch.Tensor],
             target: list[torch.Tensor], needs: list[bool]) -> list[torch.Tensor]:
    return _extension.load("trajectory_mse_cuda").backward(grad, loss, den, student, start, target, needs)
