"""Backend "cpu": the protocol of :mod:`.streaming` over ``csrc/trajectory_mse/trajectory_mse_cpu.cpp``, on CPU tensors."""

from . import compiled

forward, backward = compiled.protocol("trajectory_mse_cpu")
