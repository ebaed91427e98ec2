"""InfoNCE's operators: the backend registry, the value checks, ``ddfast::infonce_forward`` /
``ddfast::infonce_backward`` with their fake implementations, and the autograd formula.

``REGISTRY`` names the module of each backend (``streaming.py``, ``cpu.py``, ``triton.py``); those
compute only the softmax statistics (``lse`` and its gradient, the protocol in ``streaming.py``).
The operators add what costs O((N + M) D): normalisation (``rows.py``), the positive term
(``positives.py``), the temperature's gradient and the reduction (``ops/_reduction.py``). Values
(temperature, non-finite features, overflowing logits) and the backend are checked here, inside the
opaque operators, so that ``torch.compile(fullgraph=True)`` traces callers without data-dependent
branches. Every kernel receives contiguous rows.
"""

from typing import Optional

import torch
from torch import Tensor

from ... import _checks, _custom_ops, _transforms
from ..._backends import Registry, accumulation_dtype, cpu_extension, triton_kernels
from .._reduction import reduce, row_grads
from . import cpu, positives, rows, streaming

TRITON_MAX_DIM = 1024  # the gradient kernel recomputes the logits per 256 output features (cost ~ D^2): wider goes to matmuls


def _triton():
    from . import triton  # imports Triton: only once a Triton kernel runs
    return triton


def _triton_refuses(like: Tensor) -> Optional[str]:
    if like.shape[1] > TRITON_MAX_DIM:
        return f"it supports feature dimensions up to {TRITON_MAX_DIM}, got {like.shape[1]}"
    return None


REGISTRY = Registry("infonce", preference={"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}, streaming=lambda: streaming)
REGISTRY.add(cpu_extension(cpu, "infonce_cpu"))
REGISTRY.add(triton_kernels(_triton, refuses=_triton_refuses))


def check_logits(lse: Tensor, losses: Tensor, dtype: torch.dtype) -> None:
    """Value check: per-query logsumexp and loss are finite (finite inputs make them overflow only
    when ``|<q, k>| / temperature`` exceeds ``dtype``'s range)."""
    if not _checks.all_finite(lse, losses):
        raise ValueError(f"the logits <q, k> / temperature overflow {dtype}: raise the temperature, scale the "
                         f"features down, or use normalize=True")


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
        self.valid = self.positives.count > 0  # (N,) bool: the queries that have a positive


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


@_custom_ops.custom_op("ddfast::infonce_forward")
def infonce_forward(query: Tensor, key: Tensor, query_labels: Optional[Tensor], key_labels: Optional[Tensor],
                    temperature: Tensor, normalize: bool, reduction: str, backend: str) -> tuple[Tensor, Tensor]:
    """The loss of queries (N, D) against keys (M, D) in their dtype, reduced (a scalar, or (N,) for
    ``none``; the mean is over the queries that have a positive), and the (N,) logsumexp of each
    query's logits in the accumulation dtype, which the backward needs."""
    scale = _scale(temperature)
    run = REGISTRY.kernels(backend, query)
    p = _Prepared(query, key, query_labels, key_labels, normalize)
    lse = run.lse(p.query, p.key, p.key_inv_norm, scale)
    losses = torch.where(p.valid, lse - positives.mean_logit(p.positives, p.query, p.key, p.key_inv_norm, scale), 0.0)
    check_logits(lse, losses, p.acc)
    return reduce(losses, reduction, p.valid.sum()).to(query.dtype), lse


@infonce_forward.register_fake
def _(query, key, query_labels, key_labels, temperature, normalize, reduction, backend):
    n = query.shape[0]
    loss = query.new_empty(n) if reduction == "none" else query.new_empty(())
    return loss, query.new_empty(n, dtype=accumulation_dtype(query.dtype))


@_custom_ops.custom_op("ddfast::infonce_backward")
def infonce_backward(grad: Tensor, query: Tensor, key: Tensor, query_labels: Optional[Tensor],
                     key_labels: Optional[Tensor], temperature: Tensor, lse: Tensor, normalize: bool,
                     reduction: str, need_query: bool, need_key: bool, need_temperature: bool,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for query (N, D), key (M, D) and temperature (its shape and dtype) given ``grad`` of
    ``infonce_forward``'s loss; empty tensors for those not needed."""
    scale = _scale(temperature)
    run = REGISTRY.kernels(backend, query)
    p = _Prepared(query, key, query_labels, key_labels, normalize)
    _check_recomputable(p, scale)
    weight = torch.where(p.valid, row_grads(grad, reduction, query.shape[0], p.valid.sum(), dtype=p.acc), 0.0)
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
def _(grad, query, key, query_labels, key_labels, temperature, lse, normalize, reduction, need_query, need_key,
      need_temperature, backend):
    return (query.new_empty(query.shape) if need_query else query.new_empty(0),
            key.new_empty(key.shape) if need_key else query.new_empty(0),
            temperature.new_empty(temperature.shape) if need_temperature else query.new_empty(0))


_transforms.refuse_double_backward("ddfast.infonce", infonce_backward)


def _setup_context(ctx, inputs, output):
    query, key, query_labels, key_labels, temperature, normalize, reduction, backend = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(query, key, query_labels, key_labels, temperature, lse)
    ctx.normalize, ctx.reduction, ctx.backend = normalize, reduction, backend


def _backward(ctx, grad, _grad_lse):
    query, key, query_labels, key_labels, temperature, lse = ctx.saved_tensors
    need_query, need_key = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_temperature = ctx.needs_input_grad[4]
    grad_query, grad_key, grad_temperature = torch.ops.ddfast.infonce_backward(
        grad, query, key, query_labels, key_labels, temperature, lse, ctx.normalize, ctx.reduction,
        need_query, need_key, need_temperature, ctx.backend)
    return (grad_query if need_query else None, grad_key if need_key else None, None, None,
            grad_temperature if need_temperature else None, None, None, None)


infonce_forward.register_autograd(_backward, setup_context=_setup_context)
