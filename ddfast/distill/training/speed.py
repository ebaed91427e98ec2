"""How the distillation loops run their networks: memory layout, compilation and precision.

``SpeedConfig`` (a run's ``speed`` settings) and ``FastNetwork``, which calls a network's ``embed`` /
``forward`` and computes its parameter gradients (``gradients``) with the parameters of any network of
the same architecture (the loops build a fresh one each iteration), so that one compiled program
serves every iteration:

- ``channels_last``: images and feature maps in NHWC order, oneDNN's native layout for convolutions
  on the CPU (default there for compiled network calls; gradient programs keep NCHW unless asked,
  as inductor's CPU kernels for their norm backward vectorise better so; on CUDA, cuDNN picks its own).
- ``compile``: ``torch.compile`` of the network calls (DM's embeddings) and of the parameter gradients
  of the cross-entropy (``gradients``: gradient matching and its inner epochs, the unrolled students
  of MTT and BPTT). A gradient to be differentiated again is computed by a compiled program made with
  ``torch.func.grad``, whose backward inductor compiles too (torch.compile cannot differentiate
  ``autograd.grad`` twice); a first-order one by ``autograd.grad`` through a compiled forward call.
  Compiled calls and programs run a copy of the network in fusable form (``fusable``: the first block
  computed over its pool's phases, the other 2x2 pools as reshaped means; on the CPU, outside the
  ``torch.func`` programs, the wide 3x3 convolutions as Winograd F(4x4, 3x3), ``winograd``, and the
  first block of calls on inputs without gradient as one kernel, ``conv_block``). Each input
  shape compiles once (seconds to a minute on a CPU: ``compile_seconds``); if compiling fails, a
  warning names why and the calls run eagerly.
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
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..settings import SettingError
from .fusable import fusable

PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class SpeedConfig:
    """How a run's loops call their networks; only ``precision="bfloat16"`` changes values beyond rounding."""

    channels_last: bool | None = None  # None: for compiled network calls on the CPU (not gradient programs)
    compile: bool = True  # torch.compile the network calls and the parameter gradients
    precision: str = "float32"  # or "bfloat16" (autocast; values change)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise SettingError("precision", f"one of {PRECISIONS}", self.precision)

    def uses_channels_last(self, device: torch.device, compiled: bool) -> bool:
        """NHWC for a network call: by default for compiled calls on the CPU (eager calls gain nothing from it there)."""
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
        return self.call("embed", network_state(network), x, compiled=compiled)

    def forward(self, network: nn.Module, x: torch.Tensor, *, compiled: bool = True) -> torch.Tensor:
        return self.call("forward", network_state(network), x, compiled=compiled)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The precision context of the network calls (bfloat16 autocast, or nothing)."""
        if self.speed.precision == "bfloat16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def call(self, name: str, state: dict[str, torch.Tensor], x: torch.Tensor, *, compiled: bool = True,
             channels_last: bool | None = None) -> torch.Tensor:
        """``name`` ("embed" or "forward") of the template with its parameters and buffers replaced by ``state`` (by name);
        ``channels_last`` overrides the settings' layout of the call."""
        compiled = compiled and self._compiles()
        x = self._layout(x, compiled, self.speed.uses_channels_last(self.device, compiled) if channels_last is None else channels_last)
        module, prefix = self._modules[name]
        state = {prefix + key: t for key, t in state.items()}
        with self.autocast():
            out = None
            if compiled:
                out = self._compiled(("call", name), x, lambda: _apply(_compiled_copy(module, state), state, x))
            if out is None:
                out = _apply(module, state, x)
        return _full_precision(out)

    def gradients(self, state: dict[str, torch.Tensor], names: list[str], x: torch.Tensor, labels: torch.Tensor, *,
                  create_graph: bool) -> list[torch.Tensor]:
        """d CE(forward(x), labels) / d state[name] for each of ``names``, like ``torch.autograd.grad`` of the loss.

        x (N, C, H, W) float, labels (N,) long; the loss is the mean cross-entropy. ``create_graph``:
        the gradients are differentiable in ``x`` and in the differentiated tensors (second order);
        otherwise they are constants. Compiled unless the settings say otherwise: second order by a
        ``torch.func.grad`` program (one per architecture and shape), first order (every differentiated
        tensor a leaf that requires grad) by ``autograd.grad`` through the compiled forward call;
        eagerly, ``autograd.grad`` of the same loss.
        """
        compiled = self._compiles()
        if compiled and not create_graph and all(state[n].requires_grad for n in names):
            # first order: the compiled forward copy (Winograd convolutions on the CPU, which the torch.func programs cannot
            # run) and its compiled backward, in the gradient programs' layout
            with torch.enable_grad():
                loss = F.cross_entropy(self.call("forward", state, x, channels_last=bool(self.speed.channels_last)), labels)
            return list(torch.autograd.grad(loss, [state[n] for n in names]))
        x = self._layout(x, compiled, bool(self.speed.channels_last))
        module = self._modules["forward"][0]
        with self.autocast():
            grads = None
            if compiled:
                params, rest = tuple(state[n] for n in names), {key: t for key, t in state.items() if key not in names}
                with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
                    grads = self._compiled(("gradients", tuple(names)), x,
                                           lambda: _gradient_program(module, state, names, self.device)(params, rest, x, labels))
            if grads is None:
                loss = F.cross_entropy(_full_precision(_apply(module, state, x)), labels)
                grads = torch.autograd.grad(loss, [state[n] for n in names], create_graph=create_graph)
        return list(grads)

    def _compiles(self) -> bool:
        return self.speed.compile and self._failed is None

    @staticmethod
    def _layout(x: torch.Tensor, compiled: bool, channels_last: bool) -> torch.Tensor:
        if x.dim() == 4 and channels_last:
            return x.clone(memory_format=torch.channels_last) if compiled else x.contiguous(memory_format=torch.channels_last)
        if compiled:
            return x.clone(memory_format=torch.contiguous_format)  # one stride pattern per shape: compiled once
        return x

    def _compiled(self, kind: tuple, x: torch.Tensor, run):
        """``run()`` (a compiled call), its first call per kind and input shape timed into ``compile_seconds``; None if compiling fails."""
        key = (*kind, tuple(x.shape), x.stride(), x.dtype, torch.is_grad_enabled(), x.requires_grad)
        start = time.perf_counter()
        try:
            out = run()
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
    """A compiled, fusable copy of ``module``, one per architecture (its layers' settings) and parameter layout; parameters are
    swapped in by ``functional_call`` outside the compiled region, so new values never recompile."""
    key = (type(module), repr(module), *((name, t.shape, t.dtype, t.device) for name, t in state.items()))  # repr: padding, norms
    if key not in _COMPILED:
        compiled = fusable(copy.deepcopy(module), cpu_kernels=next(iter(state.values())).device.type == "cpu")
        compiled.compile(dynamic=False)
        _COMPILED[key] = compiled
    return _COMPILED[key]


_GRADIENT_PROGRAMS: dict[tuple, object] = {}


def _gradient_program(module: nn.Module, state: dict[str, torch.Tensor], names: list[str], device: torch.device):
    """A compiled ``(params, rest, x, labels) -> grads`` for ``module``'s architecture (a fusable copy of it): the gradients of
    the mean cross-entropy with respect to ``params`` (the tensors of ``names``, in order), differentiable in its inputs."""
    key = (type(module), repr(module), tuple(names), *((name, t.shape, t.dtype, t.device) for name, t in state.items()))
    if key not in _GRADIENT_PROGRAMS:
        network = fusable(copy.deepcopy(module), func_transforms=True)

        def program(params, rest, x, labels):
            def loss(params):
                return F.cross_entropy(_full_precision(functional_call(network, {**rest, **dict(zip(names, params))}, (x,))), labels)
            return torch.func.grad(loss)(params)

        # On the CPU, inductor's channels-last rewrite mixes layouts in these programs (transposes around every fused kernel).
        options = {"layout_optimization": False} if device.type == "cpu" else None
        _GRADIENT_PROGRAMS[key] = torch.compile(program, dynamic=False, options=options)
    return _GRADIENT_PROGRAMS[key]


def network_state(network: nn.Module) -> dict[str, torch.Tensor]:
    """``network``'s parameters and buffers by name (what ``functional_call`` takes)."""
    return {**dict(network.named_parameters()), **dict(network.named_buffers())}


class _Embedding(nn.Module):
    """``net.embed`` as a module's forward, so that ``functional_call`` can run it (parameters ``net.<name>``)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embed(x)


def _full_precision(out: torch.Tensor) -> torch.Tensor:
    """bfloat16 outputs of autocast calls as float32; float32 and float64 as they are."""
    return out.float() if out.dtype == torch.bfloat16 else out


def _apply(module: nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor:
    return functional_call(module, state, (x,))
