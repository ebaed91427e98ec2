"""InfoNCE over many negatives without materialising the N x M logits.

``infonce`` checks the arguments' metadata and calls ``torch.ops.ddfast.infonce_forward`` (``op.py``),
which streams over key tiles with an online logsumexp, saves per-query statistics only and recomputes
tiles in backward; ``streaming.py`` lists the protocol every backend module follows.
``backend="reference"`` runs ``reference.py``, plain torch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ... import _checks, _transforms
from . import distributed, reference
from .op import REGISTRY

__all__ = ["infonce", "InfoNCE", "REGISTRY"]


def infonce(query: Tensor, key: Tensor, query_labels: Tensor | None = None, key_labels: Tensor | None = None, *,
            temperature: float | Tensor, normalize: bool = True, reduction: str = "mean",
            symmetric: bool = False, backend: str = "auto", group=None, queries: str = "replicated") -> Tensor:
    """InfoNCE / supervised-contrastive loss of queries against keys.

    Args:
        query: (N, D) float32 / float64 / bfloat16 / float16, e.g. synthetic-sample embeddings.
        key: (M, D), same dtype and device, e.g. real-sample embeddings (M may be 50K or more).
        query_labels, key_labels: (N,) and (M,) integer labels, both or neither. With labels, the
            positives of query i are the keys with its label; without, key i alone (keys beyond N are
            extra negatives, as in a MoCo queue; needs M >= N).
        temperature: > 0, a float or a one-element floating tensor of shape () or (1,), on the inputs'
            device or the CPU (differentiable when it requires grad; its gradient has its shape and dtype).
        normalize: L2-normalise rows first (cosine similarity).
        reduction: ``mean`` over the queries that have a positive (0 if none has), ``sum``, or ``none``
            (N,) with 0 for queries without a positive.
        symmetric: average the loss of both directions (query->key and key->query), as CLIP does.
        backend: ``auto``, ``reference`` (plain torch, N x M memory), ``torch`` (streaming, pure torch),
            ``cpu`` (compiled C++), ``triton`` (CUDA GPUs; D up to 1024, where ``auto`` takes ``torch`` beyond).
        group: a ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD``): ``key`` and
            ``key_labels`` are then this rank's shard of the keys, and the loss and gradients are those of
            one process on all ranks' keys concatenated in rank order; every rank calls with the same options.
            Not with ``symmetric`` or ``backend="reference"``; ``torch.compile`` does not trace it.
        queries: with ``group``, ``"replicated"`` (every rank passes the same queries: it gets their whole
            gradient) or ``"sharded"`` (each rank passes its own; index positives and the loss are over
            all ranks' queries; ``reduction="none"`` returns this rank's rows).

    ``loss_i = logsumexp_j s_ij - mean_{j in P(i)} s_ij`` with ``s_ij = <q_i, k_j> / temperature``.
    Returns a scalar (or (N,) for ``reduction="none"``) in the inputs' dtype; accumulation is float32
    (float64 for float64 inputs). Non-finite features and logits that overflow raise ``ValueError``.
    ``torch.func.vmap`` works on every backend; ``torch.func.grad`` / ``jvp``, forward-mode AD and
    double backward need ``backend="reference"`` (the others raise ``NotImplementedError``).
    """
    if group is not None:
        return _sharded(query, key, query_labels, key_labels, temperature, normalize, reduction, symmetric, backend, group, queries)
    if queries != "replicated":
        raise ValueError(f"queries={queries!r} needs group= (a process group whose ranks hold the queries' shards)")
    _check(query, key, query_labels, key_labels, temperature, normalize, reduction, symmetric, backend)
    if query_labels is None and key.shape[0] < query.shape[0]:
        raise ValueError(f"without labels query i's positive is key i, so key needs at least N={query.shape[0]} rows, got {key.shape[0]}")
    if backend == "reference":
        return reference.infonce(query, key, query_labels, key_labels, temperature=temperature,
                                 normalize=normalize, reduction=reduction, symmetric=symmetric)
    _transforms.refuse_unsupported("ddfast.infonce", query, key, temperature)
    if not isinstance(temperature, Tensor):
        temperature = torch.tensor(float(temperature), dtype=torch.float64)
    loss, _ = torch.ops.ddfast.infonce_forward(query, key, query_labels, key_labels, temperature, normalize, reduction,
                                               backend)
    if symmetric:
        reverse, _ = torch.ops.ddfast.infonce_forward(key, query, key_labels, query_labels, temperature, normalize,
                                                      reduction, backend)
        loss = 0.5 * (loss + reverse)
    return loss


def _check(query, key, query_labels, key_labels, temperature, normalize, reduction, symmetric, backend) -> None:
    _checks.tensor("query", query, ndim=2)
    _checks.tensor("key", key, ndim=2)
    _checks.same_dtype(query=query, key=key)
    device = _checks.same_device(query=query, key=key)
    (n, d), (m, d_key) = query.shape, key.shape
    if n == 0 or m == 0 or d == 0:
        raise ValueError(f"query and key must be non-empty, got shapes {tuple(query.shape)} and {tuple(key.shape)}")
    if d != d_key:
        raise ValueError(f"query and key must have the same feature dimension, got {d} and {d_key}")
    if (query_labels is None) != (key_labels is None):
        raise ValueError("query_labels and key_labels must be given together (labelled positives) or both omitted (index positives)")
    if query_labels is not None:
        for name, labels, rows in (("query_labels", query_labels, n), ("key_labels", key_labels, m)):
            _checks.labels(name, labels, rows, device)
            if labels.dtype == torch.uint64:
                raise TypeError(f"{name} must have an integer dtype whose values fit int64, got {labels.dtype}")
    _checks.positive_scalar("temperature", temperature, device)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    _checks.reduction(reduction)
    if symmetric and reduction == "none":
        raise ValueError("symmetric=True needs reduction 'mean' or 'sum': the two directions have N and M rows")
    REGISTRY.check_name(backend)


def _sharded(query, key, query_labels, key_labels, temperature, normalize, reduction, symmetric, backend, group, queries) -> Tensor:
    """``infonce`` over a process group (``distributed.py``); a rank whose arguments fail the checks
    raises its error and the others raise ``RankFailed``."""
    failure = None
    try:
        _check(query, key, query_labels, key_labels, temperature, normalize, reduction, symmetric, backend)
        if queries not in distributed.LAYOUTS:
            raise ValueError(f"queries must be one of {distributed.LAYOUTS}, got {queries!r}")
        if symmetric:
            raise ValueError("symmetric=True is not supported with group=: call infonce once per direction")
        if backend == "reference":
            raise ValueError("backend='reference' does not run with group=: it needs every key in one process")
        _transforms.refuse_unsupported("ddfast.infonce", query, key, temperature)
    except (TypeError, ValueError, NotImplementedError) as error:
        failure = error
    plan = distributed.agree(query, key, query_labels is not None, queries, normalize, reduction, backend, group, failure)
    if not isinstance(temperature, Tensor):
        temperature = torch.tensor(float(temperature), dtype=torch.float64)
    return distributed.ShardedInfoNCE.apply(query, key, temperature, query_labels, key_labels, plan)


class InfoNCE(nn.Module):
    """``nn.Module`` twin of :func:`infonce`; ``learn_temperature=True`` makes it a parameter."""

    def __init__(self, temperature: float = 0.1, *, normalize: bool = True, reduction: str = "mean",
                 symmetric: bool = False, backend: str = "auto", learn_temperature: bool = False):
        super().__init__()
        _checks.positive_scalar("temperature", temperature)
        value = torch.tensor(float(temperature))
        if learn_temperature:
            self.temperature = nn.Parameter(value)
        else:
            self.register_buffer("temperature", value)
        self.normalize, self.reduction, self.symmetric, self.backend = normalize, reduction, symmetric, backend

    def forward(self, query: Tensor, key: Tensor, query_labels: Tensor | None = None,
                key_labels: Tensor | None = None) -> Tensor:
        return infonce(query, key, query_labels, key_labels, temperature=self.temperature, normalize=self.normalize,
                       reduction=self.reduction, symmetric=self.symmetric, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature.item():g}, normalize={self.normalize}, reduction={self.reduction!r}, "
                f"symmetric={self.symmetric}, backend={self.backend!r}")
