"""ddfast: fused, compiled kernels for dataset distillation."""

from .ops.infonce import InfoNCE, infonce
from .ops.trajectory_mse import TrajectoryMSE, trajectory_mse

__all__ = ["infonce", "InfoNCE", "trajectory_mse", "TrajectoryMSE"]
__version__ = "0.1.0"
