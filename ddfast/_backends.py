"""Backend registry: which implementations of an operation can run, and which ``auto`` picks.

Every operation has the backends ``reference`` (plain torch, the oracle), ``torch`` (pure-torch
streaming, runs anywhere) and compiled ones (``cpu``: C++ from ``csrc/``; ``triton``; ``cuda``:
CUDA C++ from ``csrc/``). ``auto`` takes the first backend of the device's preference list that
runs on the device, supports the dtype and is available on this machine.

Where no fixed order is right (Triton against CUDA C++ on a GPU), an operation can name the backends
that ``auto`` races on a device type: on the first call for a (device, dtype, size bucket), each
runnable candidate runs the caller's ``trial`` once to warm up (JIT compilation, caches), then
``TRIAL_REPEATS`` times under a timer; the fastest by its best time is cached and returned from then
on, so ``auto`` is deterministic after that first call. Size buckets are powers of two of the size the
caller gives. Operations resolve their backend inside their opaque operators, so ``torch.compile``
never traces this.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import _extension

AUTO = "auto"
TRIAL_REPEATS = 3


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in: float64 for float64 inputs, float32 for every other float."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def triton_interpreted() -> bool:
    """True under ``TRITON_INTERPRET=1``: Triton kernels then run, slowly, on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def triton_missing() -> str | None:
    """Why Triton cannot run here, or ``None``."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    return None


def triton_runs_on(device_type: str) -> bool:
    return device_type == "cuda" or (device_type == "cpu" and triton_interpreted())


def anywhere(device_type: str) -> bool:
    return True


def on_cpu(device_type: str) -> bool:
    return device_type == "cpu"


def on_cuda(device_type: str) -> bool:
    return device_type == "cuda"


def _no_kernels():
    raise ValueError("backend='reference' is plain torch and does not run through the fused operators")


@dataclass(frozen=True)
class Backend:
    """One implementation of an operation.

    ``load()`` returns what implements the op's backend protocol (its module, imported on first
    use: Triton and the compiled extensions are optional and slow to import); ``runs_on(device_type)``
    tells where it can run; ``missing()`` why it cannot on this machine (``None`` when it can);
    ``float64`` whether it computes in double precision; ``refuses(like)`` why it cannot take inputs
    shaped like ``like`` (``None`` when it can: ``auto`` then moves on, a forced choice raises).
    """

    name: str
    runs_on: Callable[[str], bool]
    load: Callable[[], object] = _no_kernels
    missing: Callable[[], str | None] = lambda: None
    float64: bool = True
    refuses: Callable[[torch.Tensor], str | None] = lambda like: None


def _cuda_extension_missing(extension: str) -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return _extension.missing(extension)


def cpu_extension(module, extension: str) -> Backend:
    """Backend ``cpu``: ``module`` implements the protocol over ``csrc/``'s ``extension`` (built on first use)."""
    return Backend("cpu", on_cpu, load=lambda: module, missing=lambda: _extension.missing(extension))


def cuda_extension(module, extension: str) -> Backend:
    """Backend ``cuda``: ``module`` implements the protocol over ``csrc/``'s ``extension`` (built on first use)."""
    return Backend("cuda", on_cuda, load=lambda: module, missing=lambda: _cuda_extension_missing(extension))


def triton_kernels(load: Callable[[], object], refuses: Callable[[torch.Tensor], str | None] = lambda like: None) -> Backend:
    """Backend ``triton``: ``load()`` imports the op's Triton module (importing Triton, so only when it runs)."""
    return Backend("triton", triton_runs_on, load=load, missing=triton_missing, refuses=refuses)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op where work runs synchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Registry:
    """The backends of one operation, ``auto``'s preference and its raced backends per device type.

    Every operation has ``reference`` (plain torch, differentiated by autograd, never run through the
    fused operators) and ``torch`` (pure-torch streaming, any device, loaded by ``streaming``); the
    compiled ones are added with ``add``. ``clock`` times the races (a fake one in tests); ``picks``
    caches their winners by (device, dtype, size bucket).
    """

    op: str
    preference: dict[str, tuple[str, ...]]
    streaming: Callable[[], object] = _no_kernels
    race: dict[str, tuple[str, ...]] = field(default_factory=dict)
    clock: Callable[[], float] = time.perf_counter
    backends: dict[str, Backend] = field(default_factory=dict)
    picks: dict[tuple, str] = field(default_factory=dict)

    def __post_init__(self):
        self.add(Backend("reference", anywhere))
        self.add(Backend("torch", anywhere, load=self.streaming))

    def add(self, backend: Backend) -> Backend:
        self.backends[backend.name] = backend
        return backend

    def kernels(self, requested: str, like: torch.Tensor, *, trial: Callable[[str], object] | None = None,
                size: int | None = None):
        """What implements backend ``requested`` (``auto`` resolved) for inputs like ``like``.

        Called inside the operators. ``trial`` and ``size`` (default ``like.numel()``) as in ``resolve``.
        """
        name = self.resolve(requested, like.device, like.dtype, trial=trial, size=like.numel() if size is None else size, like=like)
        return self.backends[name].load()

    def names(self) -> list[str]:
        return list(self.backends)

    def problem(self, name: str, device: torch.device, dtype: torch.dtype, like: torch.Tensor | None = None) -> str | None:
        """Why backend ``name`` cannot run ``device`` / ``dtype`` inputs (shaped like ``like``) here, or ``None``."""
        backend = self.backends[name]
        if not backend.runs_on(device.type):
            return f"it does not run on {device.type} tensors"
        if dtype == torch.float64 and not backend.float64:
            return "it does not support float64"
        return backend.missing() or (backend.refuses(like) if like is not None else None)

    def available(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[str]:
        """Backends that can run here for ``device`` / ``dtype`` inputs."""
        device = torch.device(device)
        return [n for n in self.backends if self.problem(n, device, dtype) is None]

    def resolve(self, requested: str, device: torch.device, dtype: torch.dtype, *,
                trial: Callable[[str], object] | None = None, size: int = 1, like: torch.Tensor | None = None) -> str:
        """The backend to run: ``requested`` itself after checking it, or ``auto``'s pick.

        ``trial(name)`` runs the operation once with backend ``name`` on representative inputs of
        ``size`` (e.g. the element count); ``auto`` calls it to race the device type's candidates.
        ``like``: an input whose shape the backends' ``refuses`` checks.
        """
        if requested == AUTO:
            raced = self._raced(device, dtype, trial, size, like)
            if raced is not None:
                return raced
            for name in self.preference.get(device.type, ()) + ("torch",):
                if name in self.backends and self.problem(name, device, dtype, like) is None:
                    return name
            raise RuntimeError(f"{self.op}: no backend runs {dtype} tensors on {device}")
        self.check_name(requested)
        problem = self.problem(requested, device, dtype, like)
        if problem is not None:
            raise RuntimeError(f"{self.op}: backend={requested!r} cannot run here: {problem}")
        return requested

    def check_name(self, requested: str) -> str:
        """``requested`` is ``auto`` or a backend of this operation (metadata only: traces under ``torch.compile``)."""
        if requested != AUTO and requested not in self.backends:
            raise ValueError(f"backend must be 'auto' or one of {self.names()} for {self.op}, got {requested!r}")
        return requested

    def _raced(self, device: torch.device, dtype: torch.dtype, trial, size: int, like) -> str | None:
        """The cached or newly measured fastest of the raced candidates, or ``None`` without a race."""
        candidates = [n for n in self.race.get(device.type, ()) if n in self.backends and self.problem(n, device, dtype, like) is None]
        if len(candidates) < 2 or trial is None:
            return None
        key = (device, dtype, max(int(size), 1).bit_length())
        if key not in self.picks:
            self.picks[key] = min(candidates, key=lambda name: self._time(name, device, trial))
        return self.picks[key]

    def _time(self, name: str, device: torch.device, trial: Callable[[str], object]) -> float:
        """Best of ``TRIAL_REPEATS`` timed runs of ``trial(name)`` after one warm-up run."""
        trial(name)
        best = float("inf")
        for _ in range(TRIAL_REPEATS):
            synchronize(device)
            start = self.clock()
            trial(name)
            synchronize(device)
            best = min(best, self.clock() - start)
        return best
