"""How the distillation loops run their networks: memory layout, compilation and precision.

``SpeedConfig`` (a run's ``speed`` settings) and ``FastNetwork``, which calls a network's ``embed`` /
``forward`` with the parameters of any network of the same architecture (the loops build a fresh one
each iteration), so that one compiled program serves every iteration:

- ``channels_last``: images and feature maps in NHWC order, oneDNN's native layout for convolutions
  on the CPU (default there for compiled calls; on CUDA, cuDNN picks its own).
- ``compile``: ``torch.compile`` of the calls whose gradients are first order (DM's embeddings, the
  real side of gradient matching); calls differentiated twice (``create_graph``) run eagerly, as
  torch.compile does not support double backward. Each input shape compiles once (seconds on a
  CPU: ``compile_seconds``); if compiling fails, a warning names why and the calls run eagerly.
- ``precision``: ``float32`` (default), or ``bfloat16`` autocast of the network calls (opt-in: values
  change by bfloat16 rounding; 1.5 to 3 times faster on a CPU with AMX, ``benchmarks/loops.py``).

Layout and compilation change no value beyond rounding (summation order); ``tests/test_speed.py``
compares every path with the eager, contiguous one in float64.
"""

from __future__ import annotations

import contextlib
import copy
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from ..settings import SettingError

PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class SpeedConfig:
    """How a run's loops call their networks; only ``precision="bfloat16"`` changes values beyond rounding."""

    channels_last: bool | None = None  # None: for compiled calls on the CPU
    compile: bool = True  # torch.compile the first-order network calls
    precision: str = "float32"  # or "bfloat16" (autocast; values change)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise SettingError("precision", f"one of {PRECISIONS}", self.precision)

    def uses_channels_last(self, device: torch.device, compiled: bool) -> bool:
        """NHWC for this call: by default for compiled calls on the CPU (eager double backward gains nothing from it there)."""
        if self.channels_last is None:
            return device.type == "cpu" and compiled and self.compile
        return self.channels_last


class FastNetwork:
    """``embed`` and ``forward`` of ``template``'s architecture with another network's parameters.

    ``fast.embed(network, x)`` equals ``network.embed(x)`` (to rounding; ``bfloat16`` precision
    aside): x (N, C, H, W) float, ``network`` built like ``template`` (same parameter names and
    shapes). ``compiled=False`` on a call runs it eagerly (calls to be differentiated twice).
    """

    def __init__(self, template: nn.Module, speed: SpeedConfig, device: torch.device):
        self.speed = speed
        self._modules = {"forward": (template, ""), "embed": (_Embedding(template), "net.")}
        self.device = torch.device(device)
        self.compile_seconds = 0.0  # time of the first call of each input shape (compilation, mostly)
        self._failed: str | None = None
        self._seen: set[tuple] = set()

    def embed(self, network: nn.Module, x: torch.Tensor, *, compiled: bool = True) -> torch.Tensor:
        return self.call("embed", _state(network), x, compiled=compiled)

    def forward(self, network: nn.Module, x: torch.Tensor, *, compiled: bool = True) -> torch.Tensor:
        return self.call("forward", _state(network), x, compiled=compiled)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context of the network calls (bfloat16 autocast, or nothing)."""
        if self.speed.precision == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def call(self, name: str, state: dict[str, torch.Tensor], x: torch.Tensor, *, compiled: bool = True) -> torch.Tensor:
        """``name`` ("embed" or "forward") of the template with its parameters and buffers replaced by ``state`` (by name)."""
        compiled = compiled and self.speed.compile and self._failed is None
        if x.dim() == 4 and self.speed.uses_channels_last(self.device, compiled):
            x = x.clone(memory_format=torch.channels_last) if compiled else x.contiguous(memory_format=torch.channels_last)
        elif compiled:
            x = x.clone(memory_format=torch.contiguous_format)  # one stride pattern per shape: compiled once
        module, prefix = self._modules[name]
        state = {prefix + key: t for key, t in state.items()}
        with self.autocast():
            out = None
            if compiled:
                out = self._compiled_call(name, module, state, x)
            if out is None:
                out = _apply(module, state, x)
        return out.float() if out.dtype == torch.bfloat16 else out

    def _compiled_call(self, name: str, module: nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor | None:
        key = (name, tuple(x.shape), x.stride(), x.dtype, torch.is_grad_enabled(), x.requires_grad)
        start = time.perf_counter()
        try:
            out = _apply(_compiled_copy(module, state), state, x)
        except Exception as error:  # a compiler missing or failing: the eager call computes the same values
            self._failed = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            warnings.warn(f"torch.compile of the network failed ({self._failed}); running it eagerly (speed.compile=false "
                          "skips compiling)", RuntimeWarning, stacklevel=4)
            return None
        if key not in self._seen:
            self._seen.add(key)
            self.compile_seconds += time.perf_counter() - start
        return out


_COMPILED: dict[tuple, nn.Module] = {}  # per architecture, for the whole process (a sweep's runs share the programs)


def _compiled_copy(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A compiled copy of ``module``, one per architecture (its layers' settings) and parameter layout; parameters are swapped
    in by ``functional_call`` outside the compiled region, so new values never recompile."""
    key = (type(module), repr(module), *((name, t.shape, t.dtype, t.device) for name, t in state.items()))  # repr: padding, norms
    if key not in _COMPILED:
        compiled = copy.deepcopy(module)
        compiled.compile(dynamic=False)
        _COMPILED[key] = compiled
    return _COMPILED[key]


def _state(network: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(network.named_parameters()), **dict(network.named_buffers())}


class _Embedding(nn.Module):
    """``net.embed`` as a module's forward, so that ``functional_call`` can run it (parameters ``net.<name>``)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x)


def _apply(module: nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor:
    return functional_call(module, state, (x,))
