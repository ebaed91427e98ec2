"""Backend "cuda": the multi-tensor CUDA C++ kernel of ``csrc/trajectory_mse/trajectory_mse_cuda.cu``.

Its operators ``forward`` / ``backward`` have the contract of :mod:`.streaming`, on CUDA tensors:
one launch covers every parameter tensor of every trajectory (forward adds one small launch that
sums each trajectory's partials).
"""

from __future__ import annotations

import torch

from ddfast import _extension

EXTENSION = "trajectory_mse_cuda"


def missing() -> str | None:
    """Why the kernel cannot run here (it is built on first use), or ``None``."""
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return _extension.missing(EXTENSION)


def operators():
    """``torch.ops.ddfast_trajectory_mse_cuda``: ``forward`` and ``backward``."""
    return _extension.load(EXTENSION)
