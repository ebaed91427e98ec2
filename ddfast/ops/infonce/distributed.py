"""InfoNCE with the keys sharded over the ranks of a process group, exact, without moving any key.

Each rank holds a shard of the keys (M_r rows; M = sum M_r) and either every query
(``queries="replicated"``: a synthetic set against a sharded real bank) or its own shard of them
(``queries="sharded"``: a global batch, as in CLIP training; the queries are all-gathered once,
N x D). Each rank runs the backend's kernels on all N queries against its key shard; the ranks
then all-reduce per-query statistics: the running max and sum of exponentials of the logsumexp and,
for the positives, the sum of positive logits and their count (which makes label positives on
other ranks work). The backward all-reduces the query gradient (N x D); the key gradient is local.
Per call: O(N D) bytes whatever M is (``ops/_distributed.py`` counts them).

Index positives (no labels) refer to global positions: query i's positive is key i of the
concatenation of the ranks' keys in rank order (queries too, in the sharded layout). They run as
labels: query i has label i, key j label j (-1 beyond N).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..._backends import accumulation_dtype
from .. import _distributed
from .._reduction import reduce, row_grads
from . import op, positives, rows

LAYOUTS = ("replicated", "sharded")
NAME = "ddfast.infonce"
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
FIELDS = ("the feature dimension D", "the dtype", "the labels (given or omitted)", "queries", "normalize", "reduction",
          "query.requires_grad", "key.requires_grad", "query rows", "key rows")  # the first 8 must agree across ranks


@dataclass(frozen=True)
class Plan:
    """What every rank agreed on: this rank, the layout, the query and key rows of each rank."""

    group: object
    rank: int
    layout: str
    query_rows: list[int]
    key_rows: list[int]
    normalize: bool
    reduction: str
    backend: str

    @property
    def queries(self) -> int:
        return self.query_rows[0] if self.layout == "replicated" else sum(self.query_rows)

    def own_queries(self) -> slice:
        """This rank's rows among all N queries."""
        if self.layout == "replicated":
            return slice(0, self.queries)
        start = _distributed.offsets(self.query_rows)[self.rank]
        return slice(start, start + self.query_rows[self.rank])


def agree(query: Tensor, key: Tensor, labelled: bool, layout: str, normalize: bool, reduction: str, backend: str,
          group, failure: BaseException | None) -> Plan:
    """Gather every rank's sizes and options; ``ValueError`` (on every rank) where they disagree or
    index positives would point beyond the keys."""
    rank, _ = _distributed.world(group)
    fields = dict.fromkeys(FIELDS, 0)
    if failure is None:
        fields.update(zip(FIELDS, (query.shape[1], _DTYPES.index(query.dtype), int(labelled), LAYOUTS.index(layout), int(normalize),
                                   ("mean", "sum", "none").index(reduction), int(torch.is_grad_enabled() and query.requires_grad),
                                   int(torch.is_grad_enabled() and key.requires_grad), query.shape[0], key.shape[0])))
    same = FIELDS[:8] + (("query rows",) if failure is None and layout == "replicated" else ())
    table = _distributed.agree(group, NAME, fields, same, failure, like=query)
    plan = Plan(group, rank, layout, table["query rows"], table["key rows"], normalize, reduction, backend)
    if not labelled and sum(plan.key_rows) < plan.queries:
        raise ValueError(f"without labels query i's positive is key i of all ranks' keys, so they need at least "
                         f"N={plan.queries} rows, got {sum(plan.key_rows)} ({plan.key_rows} rank by rank)")
    return plan


def _classes(plan: Plan, query_labels: Tensor | None, key_labels: Tensor | None, device) -> tuple[Tensor, Tensor]:
    """(N,) query and (M_r,) key labels as int64: the given ones (the queries' gathered in the sharded
    layout), or the index positives' global positions."""
    if query_labels is not None:
        query_labels = query_labels.long()
        if plan.layout == "sharded":
            query_labels = _distributed.all_gather_rows(query_labels, plan.query_rows, plan.group)
        return query_labels, key_labels.long()
    start = _distributed.offsets(plan.key_rows)[plan.rank]
    position = torch.arange(start, start + plan.key_rows[plan.rank], device=device)
    return torch.arange(plan.queries, device=device), torch.where(position < plan.queries, position, -1)


class ShardedInfoNCE(torch.autograd.Function):
    """The loss (as the single-process operator returns it, for all N queries; ``none``: this rank's
    rows) and, in backward, this rank's gradients of the single-process loss."""

    @staticmethod
    def forward(ctx, query: Tensor, key: Tensor, temperature: Tensor, query_labels, key_labels, plan: Plan) -> Tensor:
        every_query = query if plan.layout == "replicated" else _distributed.all_gather_rows(query, plan.query_rows, plan.group)
        query_class, key_class = _classes(plan, query_labels, key_labels, query.device)
        n, failure = every_query.shape[0], None
        try:
            scale = op._scale(temperature)
            p = op._Prepared(every_query, key, query_class, key_class, plan.normalize)
            if any(ctx.needs_input_grad[:3]):
                op._check_recomputable(p, scale)
            run = op.REGISTRY.kernels(plan.backend, key)
            local_lse = run.lse(p.query, p.key, p.key_inv_norm, scale)
            local = torch.stack([positives.logit_sums(p.positives, p.query, p.key, p.key_inv_norm, scale), p.positives.count])
        except Exception as error:  # every rank raises: see _distributed.all_reduce
            failure, local_lse = error, query.new_zeros(n, dtype=accumulation_dtype(query.dtype))
            local = local_lse.new_zeros(2, n)
        peak = _distributed.all_reduce(local_lse, "max", plan.group, guard=NAME, failure=failure)
        totals = _distributed.all_reduce(torch.cat([(local_lse - peak).exp()[None], local]), "sum", plan.group)
        lse, count = peak + totals[0].log(), totals[2]
        valid = count > 0
        losses = torch.where(valid, lse - totals[1] / count.clamp_min(1), 0.0)
        op.check_logits(lse, losses, p.acc)
        loss = reduce(losses, plan.reduction, valid.sum())
        if plan.reduction == "none":
            loss = loss[plan.own_queries()]
        ctx.prepared, ctx.lse, ctx.count, ctx.scale, ctx.plan = p, lse, count, scale, plan
        ctx.temperature = (temperature.shape, temperature.dtype, temperature.device)
        return loss.to(query.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, plan, scale = ctx.prepared, ctx.plan, ctx.scale
        need_query, need_key, need_temperature = ctx.needs_input_grad[:3]
        n, valid, failure = p.query.shape[0], ctx.count > 0, None
        if plan.reduction == "none" and plan.layout == "sharded":
            weight = _distributed.all_gather_rows(grad.to(p.acc), plan.query_rows, plan.group)
        else:
            weight = row_grads(grad, plan.reduction, n, valid.sum(), dtype=p.acc)
        weight = torch.where(valid, weight, 0.0)
        try:
            run = op.REGISTRY.kernels(plan.backend, p.key)
            grad_query, grad_key = run.grads(p.query, p.key, p.key_inv_norm, scale, ctx.lse, weight,
                                             need_query or need_temperature, need_key)
            positives.subtract_grads(p.positives._replace(count=ctx.count), weight, p.query, p.key, p.key_inv_norm, scale,
                                     grad_query, grad_key)
        except Exception as error:
            failure, grad_query = error, p.query.new_zeros(p.query.shape)
        grad_temperature = None
        if need_query or need_temperature:
            grad_query = _distributed.all_reduce(grad_query, "sum", plan.group, guard=NAME, failure=failure)
        elif failure is not None:
            raise failure
        if need_temperature:
            shape, dtype, device = ctx.temperature
            grad_temperature = (-(p.query * grad_query).sum(dtype=torch.float64) * scale).reshape(shape).to(device, dtype)
        if need_query:
            if plan.normalize:
                rows.normalize_backward_(p.query_rows, grad_query)
            grad_query = grad_query[plan.own_queries()].to(p.query_rows.values.dtype)
        if need_key:
            if plan.normalize:
                rows.normalize_backward_(p.key_rows, grad_key)
            grad_key = grad_key.to(p.key.dtype)
        return (grad_query if need_query else None, grad_key if need_key else None, grad_temperature, None, None, None)
