"""ddfast: fused, compiled kernels for dataset distillation."""

from .ops.infonce import InfoNCE, infonce

__all__ = ["infonce", "InfoNCE"]
__version__ = "0.1.0"
