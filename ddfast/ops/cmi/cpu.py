"""Backend ``cpu``: the kernels of ``csrc/cmi/cmi_cpu.cpp`` (at::parallel_for, ATen vectorized exp/log)."""

from .kernels import KernelBackend

BACKEND = KernelBackend.from_extension("cmi_cpu", chunk_rows=64)
