"""Backend "cpu": the compiled C++ kernel of ``csrc/trajectory_mse/trajectory_mse_cpu.cpp``.

Its operators ``forward`` / ``backward`` have the contract of :mod:`.streaming`, on CPU tensors.
"""

from __future__ import annotations

from ddfast import _extension

EXTENSION = "trajectory_mse_cpu"


def missing() -> str | None:
    """Why the kernel cannot run here (it is built on first use), or ``None``."""
    return _extension.missing(EXTENSION)


def operators():
    """``torch.ops.ddfast_trajectory_mse_cpu``: ``forward`` and ``backward``."""
    return _extension.load(EXTENSION)
