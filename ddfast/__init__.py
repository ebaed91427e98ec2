"""ddfast: fused, compiled kernels for dataset distillation."""

from .ops.infonce import InfoNCE, infonce

__all__ = ["infonce", "InfoNCE"]
__version__ = "0.1.0"

from ddfast.ops.trajectory_mse import TrajectoryMSE, trajectory_mse  # noqa: E402
