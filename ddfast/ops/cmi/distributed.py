"""``cmi_loss`` with the batch sharded over the ranks of a process group, exact.

Each rank holds some rows of the batch. The batch centroids are those of the global batch: each
rank's class log-centroids (the backend's, in log space) are weighted by its class counts and merged
with a max all-reduce and a sum all-reduce of exponentials, so nothing underflows that the single
process keeps (2 C K values, plus C counts). The KL rows are local; ``mean`` divides their
all-reduced sum by the global N. The backward is local, except for ``reduction="none"`` with batch
centroids, whose centroid term all-reduces a (C, K) sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import _checks
from ..._backends import accumulation_dtype
from .. import _distributed
from .._reduction import row_grads
from . import op
from .segments import Segments

NAME = "ddfast.cmi_loss"
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
FIELDS = ("the feature dimension K", "the dtype", "centroids (given or omitted)", "reduction", "features.requires_grad",
          "num_classes", "rows")  # the first 5 must agree across ranks


@dataclass(frozen=True)
class Plan:
    group: object
    num_classes: int
    rows: int  # N over all ranks
    temperature: float
    reduction: str
    backend: str


def agree(features, centroids, num_classes: int, temperature: float, reduction: str, backend: str, group,
          failure: BaseException | None) -> Plan:
    """Gather every rank's sizes and options (``ValueError`` on every rank where they disagree); C is
    the largest over the ranks (each infers it from its own labels when not given)."""
    fields = dict.fromkeys(FIELDS, 0)
    if failure is None:
        fields.update(zip(FIELDS, (features.shape[1], _DTYPES.index(features.dtype), int(centroids is not None),
                                   ("mean", "sum", "none").index(reduction), int(torch.is_grad_enabled() and features.requires_grad),
                                   num_classes, features.shape[0])))
    table = _distributed.agree(group, NAME, fields, FIELDS[:5], failure, like=features)
    if centroids is not None and len(set(table["num_classes"])) > 1:
        raise ValueError(f"{NAME} with group=: centroids must have the same number of rows on every rank, got {table['num_classes']}")
    return Plan(group, max(table["num_classes"]), sum(table["rows"]), temperature, reduction, backend)


class ShardedCMI(torch.autograd.Function):
    """The loss of the global batch (``none``: this rank's rows); in backward, this rank's rows' gradient."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, labels: torch.Tensor, centroids, plan: Plan) -> torch.Tensor:
        features, labels, centroids = op.kernel_layout(features, labels, centroids)
        failure, counts = None, None
        try:
            op.check_values(labels, plan.num_classes, centroids)
            kernels = op.REGISTRY.kernels(plan.backend, features)
            segments = Segments(labels, plan.num_classes)
            if centroids is None:
                norm, log_q = kernels.class_log_centroids(features, segments, plan.temperature)
                counts = segments.counts.to(norm.dtype)
            else:
                norm = kernels.row_norm(features, plan.temperature)
                log_q = centroids.to(norm.dtype).log()
            _checks.finite("features", norm[:, 1])
        except Exception as error:  # every rank raises: see _distributed.all_reduce
            failure = error
            acc = accumulation_dtype(features.dtype)
            log_q = features.new_zeros((plan.num_classes, features.shape[1]), dtype=acc)
            counts = None if centroids is not None else log_q.new_zeros(plan.num_classes)
        guard = None
        if centroids is None:  # raises on every rank where one failed
            log_q, counts = _global_log_centroids(log_q, counts, plan, failure)
        else:
            guard = NAME  # the sum below carries the failure flag
        kl = kernels.row_kl(features, labels, norm, log_q, plan.temperature) if failure is None else log_q.new_zeros(features.shape[0])
        total = _distributed.all_reduce(kl.sum(), "sum", plan.group, guard=guard, failure=failure)
        loss = {"none": kl, "sum": total, "mean": total / plan.rows}[plan.reduction]
        ctx.save_for_backward(features, labels, kl, norm, log_q)
        ctx.kernels, ctx.plan, ctx.counts = kernels, plan, counts
        return loss.to(features.dtype, copy=True)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        features, labels, kl, norm, log_q = ctx.saved_tensors
        plan, kernels = ctx.plan, ctx.kernels
        g = row_grads(grad, plan.reduction, features.shape[0], plan.rows, dtype=kl.dtype)
        a = None
        if ctx.counts is not None and plan.reduction == "none":
            segments = Segments(labels, plan.num_classes)
            local = kernels.centroid_grad(features, segments, norm, log_q, g, plan.temperature) * segments.counts[:, None]
            a = _distributed.all_reduce(local, "sum", plan.group) / ctx.counts.clamp_min(1)[:, None]
        return kernels.row_grad(features, labels, norm, log_q, kl, g, a, plan.temperature), None, None, None


def _global_log_centroids(log_q: torch.Tensor, counts: torch.Tensor, plan: Plan, failure) -> tuple[torch.Tensor, torch.Tensor]:
    """log Q (C, K) and the counts (C,) of the global batch from each rank's log Q and counts:
    ``log Q_c = logsumexp_r (log n_c^r + log Q_c^r) - log n_c``, -inf for classes no rank has."""
    weighted = log_q + counts.log()[:, None]
    peak = _distributed.all_reduce(weighted, "max", plan.group, guard=NAME, failure=failure)
    shift = peak.clamp_min(torch.finfo(peak.dtype).min)  # finite: -inf - shift = -inf, never nan
    totals = _distributed.all_reduce(torch.cat([(weighted - shift).exp().flatten(), counts]), "sum", plan.group)
    sums, counts = totals[:-plan.num_classes].view_as(log_q), totals[-plan.num_classes:]
    log_q = torch.where(counts[:, None] > 0, shift + sums.log() - counts.log()[:, None], float("-inf"))
    return log_q, counts
