"""The ``ddfast::infonce_forward`` / ``ddfast::infonce_backward`` operators and their autograd.

The backends compute only the softmax statistics (``lse`` and its gradient, see ``streaming.py``);
this module adds what costs O((N + M) D): normalisation (``rows.py``), the positive term, the
temperature gradient. Values (temperature, non-finite features, overflowing logits) and the backend
choice are checked here, inside the opaque operator, so that ``torch.compile(fullgraph=True)`` traces
callers without data-dependent branches. Every kernel receives contiguous rows.
"""

import importlib
from typing import Optional

import torch
from torch import Tensor

from ... import _checks, _extension, _transforms
from ..._backends import Backend, Registry, accumulation_dtype, triton_missing, triton_runs_on
from . import positives, rows
from .reference import check_logits

TRITON_MAX_DIM = 1024  # the Triton kernels hold whole rows of D on chip

REGISTRY = Registry("infonce", preference={"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")})
REGISTRY.add(Backend("reference", runs_on=lambda device: True))
REGISTRY.add(Backend("torch", runs_on=lambda device: True))
REGISTRY.add(Backend("cpu", runs_on=lambda device: device == "cpu", missing=lambda: _extension.missing("infonce_cpu")))
REGISTRY.add(Backend("triton", runs_on=triton_runs_on, missing=triton_missing))

_MODULES = {"torch": "streaming", "cpu": "cpu", "triton": "triton"}


def kernels(backend: str, query: Tensor):
    """The kernel module that runs ``backend`` (``auto`` resolved) for ``query``-like inputs."""
    name = REGISTRY.resolve(backend, query.device, query.dtype)
    if name == "reference":
        raise ValueError("backend='reference' is plain torch and does not run through the fused operator")
    if name == "triton" and query.shape[1] > TRITON_MAX_DIM:
        if backend == "triton":
            raise ValueError(f"backend='triton' supports feature dimensions up to {TRITON_MAX_DIM}, got {query.shape[1]}")
        name = "torch"
    return importlib.import_module(f"{__package__}.{_MODULES[name]}")


def _scale(temperature: Tensor) -> float:
    return 1.0 / _checks.positive_finite("temperature", float(temperature))


class _Prepared:
    """Inputs as the kernels take them: normalised queries, keys (raw or rescaled) with their
    inverse norms, all contiguous; the rows of both sides for the normalisation's backward."""

    def __init__(self, query: Tensor, key: Tensor, query_labels, key_labels, normalize: bool):
        self.acc = accumulation_dtype(query.dtype)
        self.query_rows = rows.prepare("query", query, normalize, self.acc)
        self.key_rows = rows.prepare("key", key, normalize, self.acc)
        self.key = self.key_rows.values.contiguous()
        self.key_inv_norm = self.key_rows.inv_norm
        self.query = self.query_rows.values.to(self.acc)
        if normalize:
            self.query = self.query * self.query_rows.inv_norm[:, None]
        self.query = self.query.contiguous()
        self.positives = positives.build(query_labels, key_labels, query.shape[0], key.shape[0], query.device, self.acc)


RECOMPUTE_ERROR = 2.0 ** -4  # largest rounding error of a recomputed logit the backward accepts


def _largest_norm(x: Tensor) -> float:
    return max(float(torch.linalg.vector_norm(x[start:start + positives.CHUNK_ROWS], dim=1, dtype=torch.float64).max())
               for start in range(0, x.shape[0], positives.CHUNK_ROWS))


def _check_recomputable(p: _Prepared, scale: float) -> None:
    """The backward recomputes each logit and exponentiates ``s_ij - lse_i``: a rounding error of about
    ``eps * scale * ||q_i|| ||k_j||`` must stay well under 1, or the softmax weights come out wrong."""
    reach = scale if p.key_inv_norm is not None else scale * _largest_norm(p.query) * _largest_norm(p.key)
    limit = RECOMPUTE_ERROR / torch.finfo(p.acc).eps
    if reach > limit:
        raise ValueError(f"ddfast.infonce cannot differentiate logits reaching |<q, k>| / temperature = {reach:.3g} in "
                         f"{p.acc} (recomputed softmax weights need it under {limit:.3g}): raise the temperature, "
                         f"use float64 inputs, or backend='reference'")


@torch.library.custom_op("ddfast::infonce_forward", mutates_args=())
def infonce_forward(query: Tensor, key: Tensor, query_labels: Optional[Tensor], key_labels: Optional[Tensor],
                    temperature: Tensor, normalize: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-query loss (N,), logsumexp (N,) in the accumulation dtype, and (N,) bool has-a-positive."""
    scale = _scale(temperature)
    run = kernels(backend, query)
    p = _Prepared(query, key, query_labels, key_labels, normalize)
    lse = run.lse(p.query, p.key, p.key_inv_norm, scale)
    valid = p.positives.count > 0
    loss = torch.where(valid, lse - positives.mean_logit(p.positives, p.query, p.key, p.key_inv_norm, scale), 0.0)
    check_logits(lse, loss, p.acc)
    return loss, lse, valid


@infonce_forward.register_fake
def _(query, key, query_labels, key_labels, temperature, normalize, backend):
    acc = accumulation_dtype(query.dtype)
    n = query.shape[0]
    return query.new_empty(n, dtype=acc), query.new_empty(n, dtype=acc), query.new_empty(n, dtype=torch.bool)


@torch.library.custom_op("ddfast::infonce_backward", mutates_args=())
def infonce_backward(grad_rows: Tensor, query: Tensor, key: Tensor, query_labels: Optional[Tensor],
                     key_labels: Optional[Tensor], temperature: Tensor, lse: Tensor, normalize: bool,
                     need_query: bool, need_key: bool, need_temperature: bool,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for query (N, D), key (M, D) and temperature; empty tensors for those not needed."""
    scale = _scale(temperature)
    run = kernels(backend, query)
    p = _Prepared(query, key, query_labels, key_labels, normalize)
    _check_recomputable(p, scale)
    weight = torch.where(p.positives.count > 0, grad_rows.to(p.acc), 0.0)
    grad_query, grad_key = run.grads(p.query, p.key, p.key_inv_norm, scale, lse, weight,
                                     need_query or need_temperature, need_key)
    positives.subtract_grads(p.positives, weight, p.query, p.key, p.key_inv_norm, scale, grad_query, grad_key)
    grad_temperature = query.new_empty(0)
    if need_temperature:
        # s_ij is bilinear in the normalised rows and proportional to 1 / T (summed in float64: 1 / T may be large)
        grad_temperature = (-(p.query * grad_query).sum(dtype=torch.float64) * scale).reshape(temperature.shape)
        grad_temperature = grad_temperature.to(temperature.device, temperature.dtype)
    if need_query and normalize:
        rows.normalize_backward_(p.query_rows, grad_query)
    if need_key and normalize:
        rows.normalize_backward_(p.key_rows, grad_key)
    return (grad_query.to(query.dtype) if need_query else query.new_empty(0),
            grad_key.to(key.dtype) if need_key else query.new_empty(0),
            grad_temperature)


@infonce_backward.register_fake
def _(grad_rows, query, key, query_labels, key_labels, temperature, lse, normalize, need_query, need_key,
      need_temperature, backend):
    return (query.new_empty(query.shape) if need_query else query.new_empty(0),
            key.new_empty(key.shape) if need_key else query.new_empty(0),
            temperature.new_empty(temperature.shape) if need_temperature else query.new_empty(0))


_transforms.refuse_double_backward("ddfast.infonce", infonce_backward)


def _setup_context(ctx, inputs, output):
    query, key, query_labels, key_labels, temperature, normalize, backend = inputs
    _, lse, valid = output
    ctx.mark_non_differentiable(lse, valid)
    ctx.save_for_backward(query, key, query_labels, key_labels, temperature, lse)
    ctx.normalize, ctx.backend = normalize, backend


def _backward(ctx, grad_rows, _grad_lse, _grad_valid):
    query, key, query_labels, key_labels, temperature, lse = ctx.saved_tensors
    need_query, need_key = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_temperature = ctx.needs_input_grad[4]
    grad_query, grad_key, grad_temperature = torch.ops.ddfast.infonce_backward(
        grad_rows, query, key, query_labels, key_labels, temperature, lse, ctx.normalize,
        need_query, need_key, need_temperature, ctx.backend)
    return (grad_query if need_query else None, grad_key if need_key else None, None, None,
            grad_temperature if need_temperature else None, None, None)


infonce_forward.register_autograd(_backward, setup_context=_setup_context)
