"""ddfast: fused, compiled kernels for dataset distillation."""

from .ops.cmi import CMILoss, cmi_loss, cmi_per_class

__version__ = "0.1.0"
