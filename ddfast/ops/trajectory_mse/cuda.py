"""Backend "cuda": the protocol of :mod:`.streaming` over the multi-tensor CUDA C++ kernel of
``csrc/trajectory_mse/trajectory_mse_cuda.cu``, on CUDA tensors: one launch covers every parameter
tensor of every trajectory (forward adds one small launch that sums each trajectory's partials).
"""

from . import compiled

forward, backward = compiled.protocol("trajectory_mse_cuda")
