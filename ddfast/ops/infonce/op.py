"""The ``ddfast::infonce_forward`` / ``ddfast::infonce_backward`` operators and their autograd.

The backends compute only the softmax statistics (``lse`` and its gradient, see ``streaming.py``);
this module adds what costs O((N + M) D): normalisation, the positive term, the temperature gradient.
Values (temperature sign) and the backend choice are checked here, inside the opaque operator, so
that ``torch.compile(fullgraph=True)`` traces callers without data-dependent branches.
"""

import importlib
from typing import Optional

import torch
from torch import Tensor

from ... import _extension
from ..._backends import Backend, Registry, accumulation_dtype, triton_missing, triton_runs_on
from . import positives

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


def inverse_norm(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(rows,) ``1 / max(||x_i||, 1e-12)`` in ``dtype`` (``F.normalize``'s scaling), in bounded chunks."""
    out = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    for start in range(0, x.shape[0], positives.CHUNK_ROWS):
        out[start:start + positives.CHUNK_ROWS] = torch.linalg.vector_norm(x[start:start + positives.CHUNK_ROWS], dim=1, dtype=dtype)
    return out.clamp_min_(1e-12).reciprocal_()


def _scale(temperature: Tensor) -> float:
    value = float(temperature)
    if not value > 0 or value == float("inf"):
        raise ValueError(f"temperature must be a finite number > 0, got {value}")
    return 1.0 / value


class _Prepared:
    """Inputs as the kernels take them: normalised queries, raw keys with their inverse norms."""

    def __init__(self, query: Tensor, key: Tensor, query_labels, key_labels, normalize: bool):
        self.acc = accumulation_dtype(query.dtype)
        self.key = key.contiguous()
        self.query_inv_norm = inverse_norm(query, self.acc) if normalize else None
        self.key_inv_norm = inverse_norm(self.key, self.acc) if normalize else None
        self.query = query.to(self.acc)
        if normalize:
            self.query = self.query * self.query_inv_norm[:, None]
        self.positives = positives.build(query_labels, key_labels, query.shape[0], key.shape[0], query.device, self.acc)


@torch.library.custom_op("ddfast::infonce_forward", mutates_args=())
def infonce_forward(query: Tensor, key: Tensor, query_labels: Optional[Tensor], key_labels: Optional[Tensor],
                    temperature: Tensor, normalize: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Per-query loss (N,), logsumexp (N,) in the accumulation dtype, and (N,) bool has-a-positive."""
    scale = _scale(temperature)
    run = kernels(backend, query)
    p = _Prepared(query, key, query_labels, key_labels, normalize)
    lse = run.lse(p.query, p.key, p.key_inv_norm, scale)
    valid = p.positives.count > 0
    rows = torch.where(valid, lse - positives.mean_logit(p.positives, p.query, p.key, p.key_inv_norm, scale), 0.0)
    return rows, lse, valid


@infonce_forward.register_fake
def _(query, key, query_labels, key_labels, temperature, normalize, backend):
    acc = accumulation_dtype(query.dtype)
    n = query.shape[0]
    return query.new_empty(n, dtype=acc), query.new_empty(n, dtype=acc), query.new_empty(n, dtype=torch.bool)


def _normalize_backward_(x: Tensor, inv_norm: Tensor, grad: Tensor) -> Tensor:
    """In place: gradient wrt normalised rows ``x_i * r_i`` -> wrt raw rows ``x_i``, in bounded chunks."""
    for start in range(0, x.shape[0], positives.CHUNK_ROWS):
        stop = start + positives.CHUNK_ROWS
        r, g = inv_norm[start:stop, None], grad[start:stop]
        rows = x[start:stop].to(g.dtype)
        radial = (rows * g).sum(1, keepdim=True) * r * r
        # F.normalize clamps norms at 1e-12: rows under it are scaled by a constant, no radial part
        radial = torch.where(r < 1e12, radial, 0.0)
        g.sub_(rows * radial).mul_(r)
    return grad


@torch.library.custom_op("ddfast::infonce_backward", mutates_args=())
def infonce_backward(grad_rows: Tensor, query: Tensor, key: Tensor, query_labels: Optional[Tensor],
                     key_labels: Optional[Tensor], temperature: Tensor, lse: Tensor, normalize: bool,
                     need_query: bool, need_key: bool, need_temperature: bool,
                     backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for query (N, D), key (M, D) and temperature; empty tensors for those not needed."""
    scale = _scale(temperature)
    run = kernels(backend, query)
    p = _Prepared(query, key, query_labels, key_labels, normalize)
    weight = torch.where(p.positives.count > 0, grad_rows.to(p.acc), 0.0)
    grad_query, grad_key = run.grads(p.query, p.key, p.key_inv_norm, scale, lse, weight,
                                     need_query or need_temperature, need_key)
    positives.subtract_grads(p.positives, weight, p.query, p.key, p.key_inv_norm, scale, grad_query, grad_key)
    grad_temperature = query.new_empty(0)
    if need_temperature:
        # s_ij is bilinear in the normalised rows and proportional to 1 / T
        grad_temperature = (-(p.query * grad_query).sum() * scale).reshape(temperature.shape).to(temperature.dtype)
    if need_query and normalize:
        _normalize_backward_(query, p.query_inv_norm, grad_query)
    if need_key and normalize:
        _normalize_backward_(p.key, p.key_inv_norm, grad_key)
    return (grad_query.to(query.dtype) if need_query else query.new_empty(0),
            grad_key.to(key.dtype) if need_key else query.new_empty(0),
            grad_temperature)


@infonce_backward.register_fake
def _(grad_rows, query, key, query_labels, key_labels, temperature, lse, normalize, need_query, need_key,
      need_temperature, backend):
    return (torch.empty_like(query) if need_query else query.new_empty(0),
            torch.empty_like(key) if need_key else query.new_empty(0),
            torch.empty_like(temperature) if need_temperature else query.new_empty(0))


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
