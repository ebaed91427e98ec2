"""Backend ``cuda``: the kernels of ``csrc/cmi/cmi_cuda.cu`` (warp-level row reductions, chunked
per-class column reductions)."""

from .kernels import KernelBackend

BACKEND = KernelBackend.from_extension("cmi_cuda", chunk_rows=64)
