"""Distillation loops: DM, DC and DSA (gradient matching), IDC, MTT and BPTT (unrolled students), each
with optional regularisers: CMI and MIM4DD.

    from ddfast.distill import preset, run
    config = preset("dm", "mnist", ipc=10, name="quick")
    results = run(config, "runs/dm-mnist-10")   # synthetic.pt, synthetic.png, results.json

What lives where:

- the runs: ``config`` (``DistillConfig``), ``presets``, ``preflight`` (checks before any work),
  ``runner``, ``sweep``, ``outputs`` (``synthetic.pt`` and its picture), ``cli`` (the ``ddfast`` command);
- the methods: ``method`` (the ``Method`` base and registry, ``SyntheticSet``, ``RealSampler``,
  ``Context``, the ``Regularizer`` protocol), ``dm``, ``dc`` (DC, DSA), ``idc`` (with
  ``multiformation``, its stored-image format), ``mtt``, ``bptt``, and ``unroll`` (the student MTT
  and BPTT train by unrolled SGD);
- the regularisers: ``cmi_regularizer`` and ``mim_regularizer`` (MIM4DD), on the kernels of
  ``ddfast.ops.cmi`` and ``ddfast.ops.infonce``;
- what a run relies on: ``settings`` (frozen dataclasses to and from dicts, overrides, ranges),
  ``checkpoint`` (atomic files), ``progress`` (bars and messages), ``allocator`` (glibc's freed memory),
  ``distributed`` (the processes of a torchrun launch and their collectives);
- ``training``: real data, networks, augmentation, and how networks are trained and evaluated.

Methods register themselves in ``METHODS`` (see ``method.Method``); importing this package
imports the built-in ones.
"""

from . import bptt, dc, dm, idc, mtt  # noqa: F401  (registers the methods)
from .cmi_regularizer import CMIConfig, CMIRegularizer
from .config import DistillConfig
from .method import METHODS, Context, Method, register
from .mim_regularizer import MIMConfig, MIMRegularizer
from .presets import PRESETS, preset
from .runner import load_data, pretrain, resolve_device, run
from .sweep import sweep

__all__ = ["METHODS", "PRESETS", "CMIConfig", "CMIRegularizer", "MIMConfig", "MIMRegularizer", "Context", "DistillConfig", "Method",
           "load_data", "preset", "pretrain", "register", "resolve_device", "run", "sweep"]
