"""The benchmarked operations and, for each, the implementations compared.

Each operation has a module ``benchmarks/<op>.py`` (named in ``OPS``) that defines:

- ``FUNCTION``: ddfast's public function (takes ``backend=``); ``REGISTRY``: its backend registry;
  ``REFERENCE``: the plain-torch formula, called with the same arguments as ``FUNCTION``.
- ``AXIS``: the shape field swept (e.g. ``"M"``); ``PRESETS``: ``{(device_type, preset): [shape, ...]}``
  with shapes as dicts (dimension sizes, and e.g. a layout name), presets ``tiny``, ``default``, ``full``;
  the shapes that differ only in ``AXIS`` form one series (a line in the plots).
- ``inputs(shape, dtype, device) -> Inputs``; ``work(shape, dtype) -> Work``.
- ``PEERS``: ``{name: Peer}``, what a user would otherwise run (other libraries, authors' code).
- ``CHECKS``: acceptance checks (``Check``) evaluated on the results.

Implementations of an operation: every ddfast backend (by its registry name), ``compiled`` (the
reference under ``torch.compile``) and the peers.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import torch

OPS = ("infonce", "cmi", "trajectory_mse")
COMPILED = "compiled"
PHASES = ("forward", "forward_backward")


@dataclass
class Inputs:
    """Arguments of one call; ``grads``: the tensors that forward+backward differentiates."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    grads: tuple = ()


@dataclass(frozen=True)
class Work:
    """Work per call, ``unit`` "flop" (throughput in TFLOP/s) or "byte" (GB/s); ``count`` says how."""

    forward: float
    forward_backward: float
    unit: str
    count: str


@dataclass(frozen=True)
class Peer:
    """Code a user would otherwise run: ``make()`` imports ``package`` (``None``: nothing to install)
    and returns the callable."""

    make: Callable[[], Callable]
    package: str | None = None
    install: str | None = None


@dataclass(frozen=True)
class Check:
    """An acceptance criterion: ``ours`` against ``baseline`` at one case, as ratios of their figures."""

    title: str
    device: str
    dtype: str
    shape: dict
    ours: str
    baseline: str
    phase: str = "forward_backward"
    max_memory_ratio: float | None = None
    max_time_ratio: float | None = None


def load(name: str) -> ModuleType:
    if name not in OPS:
        raise ValueError(f"unknown operation {name!r}: choose from {', '.join(OPS)}")
    return importlib.import_module(f"benchmarks.{name}")


def problems(op: ModuleType, device: torch.device, dtype: torch.dtype) -> dict[str, str | None]:
    """Every implementation of ``op``: ``None`` where it runs here, else why it does not."""
    found: dict[str, str | None] = {}
    for name in op.REGISTRY.names():
        problem = op.REGISTRY.problem(name, device, dtype)
        if problem is None and name == "triton" and device.type == "cpu":
            problem = "Triton would run interpreted (TRITON_INTERPRET=1) on CPU tensors"
        found[name] = problem
    found[COMPILED] = None
    for name, peer in op.PEERS.items():
        installed = peer.package is None or importlib.util.find_spec(peer.package) is not None
        found[name] = None if installed else f"{peer.install} is not installed"
    return found


def implementation(op: ModuleType, name: str) -> Callable:
    """The callable of implementation ``name``, taking the op's inputs (see ``problems``)."""
    if name == COMPILED:
        return torch.compile(op.REFERENCE, dynamic=False)
    if name in op.PEERS:
        return op.PEERS[name].make()
    return functools.partial(op.FUNCTION, backend=name)


def calls(impl: Callable, inputs: Inputs) -> dict[str, Callable[[], object]]:
    """The timed calls per phase: the forward (recording autograd, as in training) and forward+backward."""
    def forward():
        return impl(*inputs.args, **inputs.kwargs)

    def forward_backward():
        return torch.autograd.grad(forward(), inputs.grads)

    return {"forward": forward, "forward_backward": forward_backward}


def shapes(op: ModuleType, device_type: str, preset: str, sizes: list[int] | None) -> list[dict]:
    """The preset's shapes, or with ``sizes`` the preset's first shape at each of those ``AXIS`` values."""
    preset_shapes = op.PRESETS[(device_type, preset)]
    if not sizes:
        return preset_shapes
    return [{**preset_shapes[0], op.AXIS: size} for size in sizes]
