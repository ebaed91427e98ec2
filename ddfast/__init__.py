"""ddfast: fused, compiled kernels for dataset distillation."""

__version__ = "0.1.0"
