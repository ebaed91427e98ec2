"""The protocol of :mod:`.streaming` over a compiled extension of ``csrc/trajectory_mse/`` (cpu or cuda)."""

from __future__ import annotations

import torch

from ... import _extension


def protocol(extension: str):
    """``forward`` and ``backward`` calling extension ``extension`` (built on first use)."""

    def forward(student: list[torch.Tensor], start: list[torch.Tensor], target: list[torch.Tensor],
                trajectories: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _extension.load(extension).forward(student, start, target, trajectories)

    def backward(grad: torch.Tensor, loss: torch.Tensor, den: torch.Tensor, student: list[torch.Tensor], start: list[torch.Tensor],
                 target: list[torch.Tensor], needs: list[bool]) -> list[torch.Tensor]:
        return _extension.load(extension).backward(grad, loss, den, student, start, target, needs)

    return forward, backward
