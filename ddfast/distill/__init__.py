"""Distillation loops: DM, DC and DSA (gradient matching), MTT and BPTT (unrolled students), each
with optional regularisers: CMI and MIM4DD.

    from ddfast.distill import preset, run
    config = preset("dm", "mnist", ipc=10, name="quick")
    results = run(config, "runs/dm-mnist-10")   # synthetic.pt, synthetic.png, results.json

Methods register themselves in ``METHODS`` (see ``common.Method``); importing this package
imports the built-in ones.
"""

from . import bptt, dc, dm, mtt  # noqa: F401  (registers the methods)
from .cmi import CMIConfig, CMIRegularizer
from .mim import MIMConfig, MIMRegularizer
from .common import METHODS, Context, Method, register
from .config import DistillConfig
from .presets import PRESETS, preset
from .runner import load_data, pretrain, resolve_device, run
from .sweep import sweep

__all__ = ["METHODS", "PRESETS", "CMIConfig", "CMIRegularizer", "MIMConfig", "MIMRegularizer", "Context", "DistillConfig", "Method", "load_data", "preset", "pretrain", "register", "resolve_device", "run", "sweep"]
