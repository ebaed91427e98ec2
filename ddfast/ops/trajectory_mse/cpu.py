"""Backend "cpu": the protocol of :mod:`.streaming` over ``csrc/trajectory_mse/trajectory_mse_cpu.cpp``, on CPU tensors."""

from __future__ import annotations

import torch

from ... import _extension


def forward(student: list[torch.Tensor], start: list[torch.Tensor], target: list[torch.Tensor],
            trajectories: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _extension.load("trajectory_mse_cpu").forward(student, start, target, trajectories)


def backward(grad: torch.Tensor, loss: torch.Tensor, den: torch.Tensor, student: list[torch.Tensor], start: list[torch.Tensor],
             target: list[torch.Tensor], needs: list[bool]) -> list[torch.Tensor]:
    return _extension.load("trajectory_mse_cpu").backward(grad, loss, den, student, start, target, needs)
