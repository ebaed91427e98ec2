"""ddfast: fused, compiled kernels for dataset distillation."""

from .ops.cmi import CMILoss, cmi_loss, cmi_per_class
from .ops.infonce import InfoNCE, infonce
from .ops.trajectory_mse import TrajectoryMSE, trajectory_mse

__all__ = ["cmi_loss", "cmi_per_class", "CMILoss", "infonce", "InfoNCE", "trajectory_mse", "TrajectoryMSE"]
__version__ = "0.1.0"
