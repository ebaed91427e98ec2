"""Backend ``cuda``: the protocol of ``streaming.py`` over the kernels of ``csrc/cmi/cmi_cuda.cu``
(warp-level row reductions, chunked per-class column reductions), on CUDA tensors."""

from ... import _extension
from . import compiled

CHUNK_ROWS = 64  # kChunkRows of csrc/cmi/cmi_cuda.cu

row_norm, class_log_centroids, row_kl, centroid_grad, row_grad = compiled.protocol(lambda: _extension.load("cmi_cuda"),
                                                                                   chunk_rows=CHUNK_ROWS)
