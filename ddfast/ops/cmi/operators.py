"""The torch.library operators ``ddfast::cmi_forward`` / ``ddfast::cmi_backward`` and their autograd.

Both are opaque to ``torch.compile`` (fake implementations give their shapes). They resolve the
backend (``auto``: ``cpu`` on CPU tensors; on a GPU, ``triton`` raced against ``cuda`` once per
device, dtype and size bucket), check the values of their inputs (labels in range, centroids a
finite probability simplex, features finite), pass them in the one layout the kernels read, then run that backend's functions (``streaming.py`` or a
``kernels.KernelBackend``), accumulating in float32 (float64 for float64 inputs). The backward is
first-order only.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from ... import _transforms
from ..._backends import Backend, Registry, accumulation_dtype, triton_missing, triton_runs_on
from . import cpu, cuda
from .segments import Segments

REGISTRY = Registry("cmi_loss", preference={"cpu": ("cpu",), "cuda": ("triton", "cuda")}, race={"cuda": ("triton", "cuda")})
REGISTRY.add(Backend("reference", lambda device: True))
REGISTRY.add(Backend("torch", lambda device: True))
REGISTRY.add(Backend("cpu", lambda device: device == "cpu", missing=cpu.BACKEND.missing))
REGISTRY.add(Backend("triton", triton_runs_on, missing=triton_missing))
REGISTRY.add(Backend("cuda", lambda device: device == "cuda", missing=cuda.BACKEND.missing))

_MODULES = {"torch": "streaming", "cpu": "cpu", "triton": "triton", "cuda": "cuda"}


def implementation(backend: str, features: torch.Tensor, trial=None):
    """The functions of ``backend`` (``auto`` resolved, racing with ``trial(name)`` where it races),
    imported on first use: Triton and the extensions are optional."""
    name = REGISTRY.resolve(backend, features.device, features.dtype, trial=trial, size=features.numel())
    if name == "reference":
        raise ValueError("backend='reference' is plain torch and does not run through the fused operator")
    module = importlib.import_module(f".{_MODULES[name]}", __package__)
    return getattr(module, "BACKEND", module)


def values(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor under any ``torch.func`` wrappers, for checks that read values: under
    ``vmap`` it holds every batch entry, so one check covers them all."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is batched by ``torch.func.vmap``."""
    return torch._C._functorch.is_batchedtensor(t)


def _non_finite(name: str) -> ValueError:
    return ValueError(f"{name} contains non-finite values (nan or inf)")


def check_finite(name: str, t: torch.Tensor) -> None:
    """Every entry of ``t`` is finite (an isfinite reduction: for inputs the kernels do not scan)."""
    if not bool(torch.isfinite(values(t)).all()):
        raise _non_finite(name)


def check_normalisers(norm: torch.Tensor) -> None:
    """The rows' softmax normalisers are finite: every backend's log-sum is nan for a row holding a
    nan or an inf, so this checks the features at the cost of reading (N,) values."""
    if not bool(torch.isfinite(norm[:, 1]).all()):
        raise _non_finite("features")


def check_values(labels: torch.Tensor, num_classes: int, centroids: torch.Tensor | None) -> None:
    """Labels lie in [0, num_classes); ``centroids`` rows are finite, >= 0 and sum to 1."""
    low, high = torch.aminmax(values(labels))
    low, high = int(low), int(high)
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes) = [0, {num_classes}), got values from {low} to {high}")
    if centroids is None:
        return
    entries = centroids.detach().to(torch.float64)
    if not bool(torch.isfinite(values(entries)).all()):
        raise _non_finite("centroids")
    if bool((values(entries) < 0).any()):
        raise ValueError("centroids must be a probability simplex per row: entries >= 0")
    sums = values(entries.sum(dim=1)).flatten()  # (C,), or every vmap entry's rows
    worst = int((sums - 1).abs().argmax())
    tolerance = max(1e-3, 4 * torch.finfo(centroids.dtype).eps)
    if abs(float(sums[worst]) - 1) > tolerance:
        row = f"row {worst}" if sums.numel() == centroids.shape[0] else "a row"
        raise ValueError(f"centroids must be a probability simplex per row: {row} sums to {float(sums[worst]):.6g}, not 1")


def kernel_layout(features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor | None = None):
    """The inputs in the one layout every backend's kernels read: features and centroids contiguous,
    labels contiguous int64. The operators pass nothing else to a backend."""
    return (features.contiguous(), labels.to(torch.long).contiguous(),
            None if centroids is None else centroids.contiguous())


@torch.library.custom_op("ddfast::cmi_forward", mutates_args=())
def cmi_forward(features: torch.Tensor, labels: torch.Tensor, centroids: Optional[torch.Tensor], num_classes: int,
                temperature: float, reduction: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """features (N, K), labels (N,) int64, centroids (C, K) or None (batch centroids).

    Returns the loss (scalar, or (N,) for reduction "none") in the features' dtype, and for the
    backward, in the accumulation dtype: KL (N,), softmax normalisers (N, 2) (each row's max
    feature and log sum exp((f - max) / T)), log Q (C, K).
    """
    check_values(labels, num_classes, centroids)
    features, labels, centroids = kernel_layout(features, labels, centroids)

    def trial(name: str) -> None:
        """One forward and backward with backend ``name``: what ``auto`` races."""
        impl = implementation(name, features)
        loss, kl, norm, log_q = _forward(impl, features, labels, centroids, num_classes, temperature, reduction)
        _backward_features(impl, torch.ones_like(loss), features, labels, kl, norm, log_q, centroids is None, temperature, reduction)

    return _forward(implementation(backend, features, trial), features, labels, centroids, num_classes, temperature, reduction)


def _forward(impl, features, labels, centroids, num_classes, temperature, reduction):
    if centroids is None:
        norm, log_q = impl.class_log_centroids(features, Segments(labels, num_classes), temperature)
    else:
        norm = impl.row_norm(features, temperature)
        log_q = centroids.to(norm.dtype).log()
    check_normalisers(norm)
    kl = impl.row_kl(features, labels, norm, log_q, temperature)
    if reduction == "none":
        loss = kl.to(features.dtype, copy=True)
    else:
        loss = (kl.sum() if reduction == "sum" else kl.mean()).to(features.dtype)
    return loss, kl, norm, log_q


@cmi_forward.register_fake
def _(features, labels, centroids, num_classes, temperature, reduction, backend):
    n, k = features.shape
    acc = accumulation_dtype(features.dtype)
    loss = features.new_empty((n,) if reduction == "none" else ())
    return loss, features.new_empty(n, dtype=acc), features.new_empty((n, 2), dtype=acc), features.new_empty((num_classes, k), dtype=acc)


def per_sample(grad: torch.Tensor, n: int, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """(N,) upstream gradient of each sample's KL under ``reduction``."""
    grad = grad.to(dtype)
    if reduction == "mean":
        grad = grad / n
    return grad.expand(n).contiguous()


@torch.library.custom_op("ddfast::cmi_backward", mutates_args=())
def cmi_backward(grad: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor, norm: torch.Tensor,
                 log_q: torch.Tensor, batch_centroids: bool, temperature: float, reduction: str, backend: str) -> torch.Tensor:
    """d(loss)/d(features) (N, K) in the features' dtype, from ``cmi_forward``'s saved outputs.

    With batch centroids the centroids' own term cancels when every sample has the same upstream
    gradient (reduction mean / sum); for reduction "none" it is computed (one more pass).
    """
    features, labels, _ = kernel_layout(features, labels)
    return _backward_features(implementation(backend, features), grad, features, labels, kl, norm, log_q, batch_centroids,
                              temperature, reduction)


def _backward_features(impl, grad, features, labels, kl, norm, log_q, batch_centroids, temperature, reduction):
    g = per_sample(grad, features.shape[0], reduction, kl.dtype)
    a = None
    if batch_centroids and reduction == "none":
        a = impl.centroid_grad(features, Segments(labels, log_q.shape[0]), norm, log_q, g, temperature)
    return impl.row_grad(features, labels, norm, log_q, kl, g, a, temperature)


@cmi_backward.register_fake
def _(grad, features, labels, kl, norm, log_q, batch_centroids, temperature, reduction, backend):
    return torch.empty_like(features, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    features, labels, centroids, _, temperature, reduction, backend = inputs
    _, kl, norm, log_q = output
    ctx.save_for_backward(features, labels, kl, norm, log_q)
    ctx.options = (centroids is None, temperature, reduction, backend)


def _backward(ctx, grad, *unused):
    features, labels, kl, norm, log_q = ctx.saved_tensors
    grad_features = None
    if ctx.needs_input_grad[0]:
        grad_features = torch.ops.ddfast.cmi_backward(grad, features, labels, kl, norm, log_q, *ctx.options)
    return grad_features, None, None, None, None, None, None


cmi_forward.register_autograd(_backward, setup_context=_setup_context)
_transforms.refuse_double_backward("ddfast.cmi_loss", cmi_backward)
