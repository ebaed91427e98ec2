"""The CMI backends (``REGISTRY``), its value checks, and the operators ``ddfast::cmi_forward`` /
``ddfast::cmi_backward`` with their autograd.

Both operators are opaque to ``torch.compile`` (fake implementations give their shapes). The forward
checks the values of its inputs (labels in range, centroids a finite probability simplex, features
finite), passes them in the one layout the kernels read (``kernel_layout``), asks ``REGISTRY.kernels``
for the backend's module (``auto``: ``cpu`` on CPU tensors; on a GPU, ``triton`` raced against
``cuda`` once per device, dtype and size bucket), runs the protocol functions that ``streaming.py``
lists, accumulating in float32 (float64 for float64 inputs), and reduces the per-sample KLs
(``ops/_reduction.py``). The backward is first-order only.
"""

from __future__ import annotations

from typing import Optional

import torch

from ... import _checks, _custom_ops, _transforms
from ..._backends import Registry, accumulation_dtype, cpu_extension, cuda_extension, triton_kernels
from .._reduction import reduce, row_grads
from . import cpu, cuda, streaming
from .segments import Segments


def _triton():
    from . import triton  # imports Triton: only once a Triton kernel runs
    return triton


REGISTRY = Registry("cmi_loss", preference={"cpu": ("cpu",), "cuda": ("triton", "cuda")}, streaming=lambda: streaming,
                    race={"cuda": ("triton", "cuda")})
REGISTRY.add(cpu_extension(cpu, "cmi_cpu"))
REGISTRY.add(triton_kernels(_triton))
REGISTRY.add(cuda_extension(cuda, "cmi_cuda"))


def check_values(labels: torch.Tensor, num_classes: int, centroids: torch.Tensor | None) -> None:
    """Labels lie in [0, num_classes); ``centroids`` rows are finite, >= 0 and sum to 1 (through
    ``torch.func`` wrappers: under ``vmap``, every entry at once)."""
    low, high = torch.aminmax(_checks._data(labels))
    low, high = int(low), int(high)
    if low < 0 or high >= num_classes:
        raise ValueError(f"labels must lie in [0, num_classes) = [0, {num_classes}), got values from {low} to {high}")
    if centroids is None:
        return
    entries = centroids.detach().to(torch.float64)
    _checks.finite("centroids", entries)
    if bool((_checks._data(entries) < 0).any()):
        raise ValueError("centroids must be a probability simplex per row: entries >= 0")
    sums = _checks._data(entries.sum(dim=1)).flatten()  # (C,), or every vmap entry's rows
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


@_custom_ops.custom_op("ddfast::cmi_forward")
def cmi_forward(features: torch.Tensor, labels: torch.Tensor, centroids: Optional[torch.Tensor], num_classes: int,
                temperature: float, reduction: str, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """features (N, K) float, labels (N,) int64, centroids (C, K) or None (batch centroids).

    Returns the loss (scalar, or (N,) for reduction "none") in the features' dtype, and for the
    backward, in the accumulation dtype: KL (N,), softmax normalisers (N, 2) (each row's max
    feature and log sum exp((f - max) / T)), log Q (C, K).
    """
    check_values(labels, num_classes, centroids)
    features, labels, centroids = kernel_layout(features, labels, centroids)

    def trial(name: str) -> None:
        """One forward and backward with backend ``name``: what ``auto`` races."""
        kernels = REGISTRY.kernels(name, features)
        loss, kl, norm, log_q = _forward(kernels, features, labels, centroids, num_classes, temperature, reduction)
        _backward(kernels, torch.ones_like(loss), features, labels, kl, norm, log_q, centroids is None, temperature, reduction)

    kernels = REGISTRY.kernels(backend, features, trial=trial)
    return _forward(kernels, features, labels, centroids, num_classes, temperature, reduction)


def _forward(kernels, features, labels, centroids, num_classes, temperature, reduction):
    if centroids is None:
        norm, log_q = kernels.class_log_centroids(features, Segments(labels, num_classes), temperature)
    else:
        norm = kernels.row_norm(features, temperature)
        log_q = centroids.to(norm.dtype).log()
    # every backend's log-sum is nan for a row holding a nan or an inf: this checks the features
    # at the cost of reading (N,) values
    _checks.finite("features", norm[:, 1])
    kl = kernels.row_kl(features, labels, norm, log_q, temperature)
    loss = reduce(kl, reduction).to(features.dtype, copy=True)  # a copy: outputs must not alias
    return loss, kl, norm, log_q


@cmi_forward.register_fake
def _(features, labels, centroids, num_classes, temperature, reduction, backend):
    n, k = features.shape
    acc = accumulation_dtype(features.dtype)
    loss = features.new_empty((n,) if reduction == "none" else ())
    return loss, features.new_empty(n, dtype=acc), features.new_empty((n, 2), dtype=acc), features.new_empty((num_classes, k), dtype=acc)


@_custom_ops.custom_op("ddfast::cmi_backward")
def cmi_backward(grad: torch.Tensor, features: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor, norm: torch.Tensor,
                 log_q: torch.Tensor, batch_centroids: bool, temperature: float, reduction: str, backend: str) -> torch.Tensor:
    """d(loss)/d(features) (N, K) in the features' dtype, from ``cmi_forward``'s saved outputs.

    With batch centroids the centroids' own term cancels when every sample has the same upstream
    gradient (reduction mean / sum); for reduction "none" it is computed (one more pass).
    """
    features, labels, _ = kernel_layout(features, labels)
    return _backward(REGISTRY.kernels(backend, features), grad, features, labels, kl, norm, log_q, batch_centroids,
                     temperature, reduction)


def _backward(kernels, grad, features, labels, kl, norm, log_q, batch_centroids, temperature, reduction):
    g = row_grads(grad, reduction, features.shape[0], dtype=kl.dtype)
    a = None
    if batch_centroids and reduction == "none":
        a = kernels.centroid_grad(features, Segments(labels, log_q.shape[0]), norm, log_q, g, temperature)
    return kernels.row_grad(features, labels, norm, log_q, kl, g, a, temperature)


@cmi_backward.register_fake
def _(grad, features, labels, kl, norm, log_q, batch_centroids, temperature, reduction, backend):
    return torch.empty_like(features, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    features, labels, centroids, _, temperature, reduction, backend = inputs
    _, kl, norm, log_q = output
    ctx.save_for_backward(features, labels, kl, norm, log_q)
    ctx.options = (centroids is None, temperature, reduction, backend)


def _autograd(ctx, grad, *unused):
    features, labels, kl, norm, log_q = ctx.saved_tensors
    grad_features = None
    if ctx.needs_input_grad[0]:
        grad_features = torch.ops.ddfast.cmi_backward(grad, features, labels, kl, norm, log_q, *ctx.options)
    return grad_features, None, None, None, None, None, None


cmi_forward.register_autograd(_autograd, setup_context=_setup_context)
_transforms.refuse_double_backward("ddfast.cmi_loss", cmi_backward)
