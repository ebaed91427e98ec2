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

A compiled backend can still fail when its kernel launches (a Triton compile error, out of shared
memory, a CUDA launch error, an extension that does not build). ``kernels()`` returns a ``Launcher``
that calls the backend's protocol functions and, under ``auto``, moves on to the next backend of the
preference order when one fails that way: one ``RuntimeWarning`` per backend and device type names the
op, the backend, the function and the error, and ``auto`` skips that backend from then on (in the
backward too). A forced backend raises ``BackendFailed`` from the error instead. Other errors (a
``ValueError`` from a check, a wrong result) are never caught.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import warnings
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


class BackendFailed(RuntimeError):
    """A forced backend's kernel could not launch here (the launch error is its ``__cause__``)."""


_LAUNCH_MESSAGES = ("CUDA error", "CUDA driver error", "no kernel image", "invalid device function", "out of resources",
                    "too many resources requested", "ptxas", "nvrtc", "PTX JIT", "Error building extension")


def launch_failure(exc: BaseException) -> bool:
    """Whether ``exc`` means a backend cannot run here rather than a mistake in the inputs: a Triton error,
    a missing module or extension, or a CUDA launch / JIT error (running out of memory is not one)."""
    if isinstance(exc, BackendFailed):
        return True
    if isinstance(exc, (ValueError, TypeError, torch.OutOfMemoryError)):
        return False
    if isinstance(exc, ImportError) or any(k.__name__ == "TritonError" and k.__module__.startswith("triton")
                                           for k in type(exc).__mro__):
        return True
    return isinstance(exc, RuntimeError) and any(text in str(exc) for text in _LAUNCH_MESSAGES)


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
    failed: dict[tuple[str, str], str] = field(default_factory=dict)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

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
        Returns a ``Launcher``: the backend's protocol functions, falling back under ``auto`` when one
        fails to launch.
        """
        name = self.resolve(requested, like.device, like.dtype, trial=trial, size=like.numel() if size is None else size, like=like)
        return Launcher(self, requested, name, like)

    def fail(self, name: str, device: torch.device, what: str, exc: BaseException) -> None:
        """Record that backend ``name`` cannot launch on ``device``'s type, warning the first time."""
        key = (name, device.type)
        with self.lock:
            if key in self.failed:
                return
            self.failed[key] = f"{type(exc).__name__}: {exc}"
            self.picks = {k: v for k, v in self.picks.items() if not (v == name and k[0].type == device.type)}
        warnings.warn(f"ddfast.{self.op}: backend {name!r} failed to launch {what} on {device.type} "
                      f"({self.failed[key][:500]}); backend='auto' uses the next backend from now on",
                      RuntimeWarning, stacklevel=3)

    def _usable(self, name: str, device: torch.device, dtype: torch.dtype, like) -> bool:
        """``auto`` may pick ``name``: it runs here and has not failed to launch on this device type."""
        return (name in self.backends and (name, device.type) not in self.failed
                and self.problem(name, device, dtype, like) is None)

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
                if name == "torch" or self._usable(name, device, dtype, like):
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
        """The cached or newly measured fastest of the raced candidates, or ``None`` without a race.

        Without a ``trial`` (e.g. in the backward) the cached pick is returned if there is one. A
        candidate whose trial fails to launch is recorded as failed and left out.
        """
        key = (device, dtype, max(int(size), 1).bit_length())
        with self.lock:
            if key in self.picks or trial is None:
                return self.picks.get(key)
            candidates = [n for n in self.race.get(device.type, ()) if self._usable(n, device, dtype, like)]
            if len(candidates) < 2:
                return None
            times = {}
            for name in candidates:
                try:
                    times[name] = self._time(name, device, trial)
                except BackendFailed as exc:
                    self.fail(name, device, "its trial", exc.__cause__ or exc)
            if not times:
                return None
            self.picks[key] = min(times, key=times.get)
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


class Launcher:
    """Backend ``name``'s protocol functions, as resolved from ``requested`` for inputs like ``like``.

    Each call runs the backend's function. When it fails to launch (``launch_failure``), a forced
    backend raises ``BackendFailed`` from the error; ``auto`` records the failure in the registry and
    runs the same call, and every later one, on the next backend (``torch`` last, which is not retried).
    """

    def __init__(self, registry: Registry, requested: str, name: str, like: torch.Tensor):
        self._registry, self._requested, self._like = registry, requested, like
        self.name = name
        self.module = registry.backends[name].load()

    def __getattr__(self, function: str):
        implementation = getattr(self.module, function)
        if not callable(implementation):
            return implementation

        @functools.wraps(implementation)  # keeps the protocol function's name and signature
        def launch(*args, **kwargs):
            return self._launch(function, *args, **kwargs)
        return launch

    def _launch(self, function: str, *args, **kwargs):
        while True:
            try:
                return getattr(self.module, function)(*args, **kwargs)
            except Exception as exc:
                if self.name == "torch" or not launch_failure(exc):
                    raise
                if self._requested != AUTO:
                    raise BackendFailed(f"ddfast.{self._registry.op}: backend={self.name!r} failed to launch {function} "
                                        f"here ({type(exc).__name__}: {exc})") from exc
                like = self._like
                self._registry.fail(self.name, like.device, function, exc)
                self.name = self._registry.resolve(AUTO, like.device, like.dtype, size=like.numel(), like=like)
                self.module = self._registry.backends[self.name].load()
