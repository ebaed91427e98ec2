"""Input validation shared by the public operations.

Every check raises before any kernel runs, with a message that names the offending argument.
Checks here look only at metadata (shape, dtype, device), so they are free and trace cleanly under
``torch.compile``; checks on values (label ranges, temperature sign) run inside the operators.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")


def tensor(name: str, x, *, ndim: int | None = None, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    """``x`` is a tensor with ``ndim`` dimensions and one of ``dtypes``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {_names(dtypes)}, got {x.dtype}")
    return x


def labels(name: str, y, length: int, device: torch.device) -> torch.Tensor:
    """``y`` is a 1-D integer tensor of ``length`` labels on ``device``."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class labels, got {type(y).__name__}")
    if y.dim() != 1 or y.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), one label per row, got {tuple(y.shape)}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"{name} must have an integer dtype, got {y.dtype}")
    same_device(**{name: y}, expected=device)
    return y


def same_device(expected: torch.device | None = None, **tensors: torch.Tensor) -> torch.device:
    """All ``tensors`` (and ``expected``) are on one device; returns it."""
    devices = {name: t.device for name, t in tensors.items()}
    first = expected if expected is not None else next(iter(devices.values()))
    for name, device in devices.items():
        if device != first:
            listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
            raise ValueError(f"{name} must be on {first} like the other inputs ({listed})")
    return first


def same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    """All ``tensors`` share one dtype; returns it."""
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"inputs must share one dtype, got {listed}")
    return next(iter(dtypes.values()))


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


def positive_scalar(name: str, value) -> float | torch.Tensor:
    """A python number > 0, or a one-element floating tensor (its sign is checked by the operator)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or not value.dtype.is_floating_point:
            raise ValueError(f"{name} must be a positive float or a one-element floating tensor, got {value.dtype} of shape {tuple(value.shape)}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__}")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def positive_int(name: str, value) -> int | torch.SymInt:
    """A python (or numpy) integer >= 1, returned as an int; a ``torch.SymInt`` passes as it is."""
    if isinstance(value, torch.SymInt):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return "(" + ", ".join(str(d).replace("torch.", "") for d in dtypes) + ")"
