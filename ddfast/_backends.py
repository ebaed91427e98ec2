"""Backend registry: which implementations of an operation can run, and which ``auto`` picks.

Every operation has the backends ``reference`` (plain torch, the oracle), ``torch`` (pure-torch
streaming, runs anywhere) and compiled ones (``cpu``: C++ from ``csrc/``; ``triton``; ``cuda``:
CUDA C++ from ``csrc/``). ``auto`` takes the first backend of the device's preference list that
runs on the device, supports the dtype and is available on this machine.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

AUTO = "auto"


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


@dataclass(frozen=True)
class Backend:
    """One implementation of an operation.

    ``runs_on(device_type)`` tells where it can run; ``missing()`` why it cannot on this machine
    (``None`` when it can); ``float64`` whether it computes in double precision.
    """

    name: str
    runs_on: Callable[[str], bool]
    missing: Callable[[], str | None] = lambda: None
    float64: bool = True


@dataclass
class Registry:
    """The backends of one operation and ``auto``'s preference per device type."""

    op: str
    preference: dict[str, tuple[str, ...]]
    backends: dict[str, Backend] = field(default_factory=dict)

    def add(self, backend: Backend) -> Backend:
        self.backends[backend.name] = backend
        return backend

    def names(self) -> list[str]:
        return list(self.backends)

    def problem(self, name: str, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why backend ``name`` cannot run ``device`` / ``dtype`` inputs here, or ``None``."""
        backend = self.backends[name]
        if not backend.runs_on(device.type):
            return f"it does not run on {device.type} tensors"
        if dtype == torch.float64 and not backend.float64:
            return "it does not support float64"
        return backend.missing()

    def available(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[str]:
        """Backends that can run here for ``device`` / ``dtype`` inputs."""
        device = torch.device(device)
        return [n for n in self.backends if self.problem(n, device, dtype) is None]

    def resolve(self, requested: str, device: torch.device, dtype: torch.dtype) -> str:
        """The backend to run: ``requested`` itself after checking it, or ``auto``'s pick."""
        if requested == AUTO:
            for name in self.preference.get(device.type, ()) + ("torch",):
                if name in self.backends and self.problem(name, device, dtype) is None:
                    return name
            raise RuntimeError(f"{self.op}: no backend runs {dtype} tensors on {device}")
        if requested not in self.backends:
            raise ValueError(f"backend must be 'auto' or one of {self.names()} for {self.op}, got {requested!r}")
        problem = self.problem(requested, device, dtype)
        if problem is not None:
            raise RuntimeError(f"{self.op}: backend={requested!r} cannot run here: {problem}")
        return requested
