"""Backend ``cpu``: the protocol of ``streaming.py`` over the kernels of ``csrc/cmi/cmi_cpu.cpp``
(at::parallel_for, ATen vectorized exp/log), on CPU tensors."""

from ... import _extension
from . import compiled

CHUNK_ROWS = 64

row_norm, class_log_centroids, row_kl, centroid_grad, row_grad = compiled.protocol(lambda: _extension.load("cmi_cpu"),
                                                                                   chunk_rows=CHUNK_ROWS)
