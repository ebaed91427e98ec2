"""``cmi_loss``: the class-conditional mutual information regulariser, fused and in log space.

For features f (N, K) of a frozen network and labels y (N,):
``P_i = softmax(f_i / T)``, ``Q_c`` = mean of ``P_i`` over the rows of class c (or given
``centroids``, held constant), ``KL_i = KL(P_i || Q_{y_i})``; the loss is their mean (the CMI,
equal to the authors' ``F.kl_div(log Q_y, log_softmax(f), log_target=True, reduction="batchmean")``),
sum, or the KLs themselves. ``cmi_per_class`` gives each class's mean KL ("class-aware complexity").
``ClassCentroids`` accumulates centroids over a dataset (e.g. the real training split) batch by batch.

Backends (``backend=``): ``reference`` (plain torch, the naive formula), ``torch`` (log space,
streamed over rows, any device), ``cpu`` (C++), ``triton`` (GPU; CPU under TRITON_INTERPRET=1) and
``cuda`` (CUDA C++). ``auto`` takes ``cpu`` on CPU tensors and races ``triton`` against ``cuda``
on a GPU once per (device, dtype, size bucket), keeping the faster (``ddfast._backends``).
"""

from __future__ import annotations

import torch
from torch import nn

from ... import _checks, _transforms
from ..._backends import AUTO, accumulation_dtype
from . import distributed, op, reference
from .op import REGISTRY
from .segments import Segments


def cmi_loss(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None, *, temperature: float = 1.0,
             centroids: torch.Tensor | None = None, reduction: str = "mean", backend: str = AUTO, group=None) -> torch.Tensor:
    """The CMI of ``features`` given ``labels``: mean (or sum, or each) of KL(P_i || Q_{y_i}).

    features: (N, K) float32 / float64 / bfloat16 / float16 logits or features (N, K >= 1), any
        layout, finite; the only input that gets a gradient.
    labels: (N,) integer class labels in [0, num_classes), any integer dtype and layout.
    num_classes: C, a positive int; defaults to ``centroids.shape[0]``, else ``labels.max() + 1``
        (which reads the labels: pass it under ``torch.compile``).
    temperature: a python float > 0 whose inverse is a normal number of the accumulation dtype
        (float32, float64 for float64 features); ``P_i = softmax(features_i / temperature)``.
    centroids: None for the batch's own class means (gradients flow through them, as in the
        authors' code), or (C, K) finite probability rows (e.g. real-data centroids) held constant.
    reduction: "mean" (the CMI), "sum", or "none" for the (N,) per-sample KLs.
    group: a ``torch.distributed`` process group: ``features`` / ``labels`` are then this rank's rows of
        the batch, the centroids and the loss those of all ranks' rows (``none``: this rank's KLs), and
        the gradient this rank's rows' part of the single-process one; every rank calls with the same
        options. Not with ``backend="reference"``; ``torch.compile`` does not trace it.
    Returns a tensor in the features' dtype; computed in float32 (float64 for float64 inputs).
    Supports ``torch.func.vmap``; the fused backends refuse ``torch.func.grad`` / ``jvp``, forward-mode
    AD and double backward, which ``backend="reference"`` supports.
    """
    if group is not None:
        return _sharded(features, labels, num_classes, temperature, centroids, reduction, backend, group)
    if backend != "reference":
        _transforms.refuse_unsupported("ddfast.cmi_loss", features)
    features, labels, centroids, num_classes, temperature = _validated(features, labels, num_classes, temperature, centroids)
    _checks.reduction(reduction)
    if backend == "reference":
        op.check_values(labels, num_classes, centroids)
        _checks.finite("features", features)
        return reference.cmi_reference(features, labels, num_classes, temperature=temperature, centroids=centroids, reduction=reduction)
    return torch.ops.ddfast.cmi_forward(features, labels, centroids, num_classes, temperature, reduction, backend)[0]


def _sharded(features, labels, num_classes, temperature, centroids, reduction, backend, group) -> torch.Tensor:
    """``cmi_loss`` over a process group (``distributed.py``); a rank whose arguments fail the checks
    raises its error and the others raise ``RankFailed``."""
    failure = None
    try:
        if backend == "reference":
            raise ValueError("backend='reference' does not run with group=: it needs the whole batch in one process")
        _transforms.refuse_unsupported("ddfast.cmi_loss", features)
        features, labels, centroids, num_classes, temperature = _validated(features, labels, num_classes, temperature, centroids)
        _checks.reduction(reduction)
        REGISTRY.check_name(backend)
    except (TypeError, ValueError, NotImplementedError) as error:
        failure = error
    plan = distributed.agree(features, centroids, num_classes, temperature, reduction, backend, group, failure)
    return distributed.ShardedCMI.apply(features, labels, centroids, plan)


def cmi_per_class(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None, *, temperature: float = 1.0,
                  centroids: torch.Tensor | None = None, backend: str = AUTO) -> torch.Tensor:
    """(C,) mean KL(P_i || Q_c) over the rows of each class c: the class-aware complexity.

    NaN for classes without rows. ``cmi_loss`` (mean) equals ``sum_c n_c / N * cmi_per_class[c]``.
    Arguments as ``cmi_loss``; differentiable like it. Under ``torch.func.vmap`` over the labels,
    pass ``num_classes`` (or ``centroids``): the output's length must not depend on each entry's labels.
    """
    if backend != "reference":
        _transforms.refuse_unsupported("ddfast.cmi_per_class", features)
    inferred = num_classes is None and centroids is None
    features, labels, centroids, num_classes, temperature = _validated(features, labels, num_classes, temperature, centroids)
    if inferred and torch._C._functorch.is_batchedtensor(labels):
        raise ValueError("cmi_per_class needs num_classes under torch.func.vmap over the labels: its output has one "
                         "entry per class, so C must not depend on each entry's labels")
    kl = cmi_loss(features, labels, num_classes, temperature=temperature, centroids=centroids, reduction="none", backend=backend)
    acc = kl.to(accumulation_dtype(kl.dtype))
    sums = acc.new_zeros(num_classes).index_add(0, labels, acc)
    counts = acc.new_zeros(num_classes).index_add(0, labels, torch.ones_like(acc))  # bincount, also batched under vmap
    return (sums / counts).to(kl.dtype)


class CMILoss(nn.Module):
    """``cmi_loss`` as a module: ``CMILoss(num_classes, temperature=..., reduction=...)(features, labels, centroids=None)``."""

    def __init__(self, num_classes: int | None = None, *, temperature: float = 1.0, reduction: str = "mean", backend: str = AUTO):
        super().__init__()
        self.num_classes = num_classes
        self.temperature = temperature
        self.reduction = _checks.reduction(reduction)
        self.backend = backend

    def forward(self, features: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor | None = None) -> torch.Tensor:
        return cmi_loss(features, labels, self.num_classes, temperature=self.temperature, centroids=centroids,
                        reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, temperature={self.temperature}, reduction={self.reduction!r}, backend={self.backend!r}"


class ClassCentroids:
    """Class centroids for ``cmi_loss(..., centroids=)`` over more rows than fit at once (a whole dataset).

    ``add(features, labels)`` folds in a batch of rows (no gradient); ``centroids()`` is then (C, K)
    with ``Q_c`` = the mean of ``softmax(f_i / temperature)`` over every row added with label c, in
    the accumulation dtype (float32, float64 for float64 features). Memory O(C K) whatever the number
    of rows: each batch's class means come from the backend's fused per-class reduction in log space
    and are merged by a count-weighted log-sum-exp. ``counts`` (C,) int64: rows added per class.
    """

    def __init__(self, num_classes: int, *, temperature: float = 1.0, backend: str = AUTO):
        self.num_classes = _checks.positive_int("num_classes", num_classes)
        self.temperature = _temperature(temperature, torch.float64)
        self.backend = REGISTRY.check_name(backend)
        self.counts: torch.Tensor | None = None
        self._log_sums: torch.Tensor | None = None  # (C, K): log of each class's sum of softmax rows

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """features (N, K) float (finite), labels (N,) integers in [0, num_classes); arguments as ``cmi_loss``."""
        features, labels, _, classes, temperature = _validated(features.detach(), labels, self.num_classes, self.temperature, None)
        if self._log_sums is not None:
            _checks.same_device(self._log_sums.device, features=features)
            if features.shape[1] != self._log_sums.shape[1]:
                raise ValueError(f"features must have {self._log_sums.shape[1]} columns like the rows added before, got {features.shape[1]}")
        op.check_values(labels, classes, None)
        with torch.no_grad():
            if self.backend == "reference":
                log_p = torch.log_softmax((features - features.amax(dim=1, keepdim=True)) / temperature, dim=1)
                batch = log_p.new_zeros(classes, features.shape[1]).index_add_(0, labels, log_p.exp()).log()
                _checks.finite("features", log_p[:, :1])
                counts = torch.bincount(labels, minlength=classes)
            else:
                features, labels, _ = op.kernel_layout(features, labels)
                segments = Segments(labels, classes)
                norm, log_q = REGISTRY.kernels(self.backend, features).class_log_centroids(features, segments, temperature)
                _checks.finite("features", norm[:, 1])
                counts = segments.counts
                batch = log_q + counts.to(log_q.dtype).log()[:, None]
            batch = batch.to(accumulation_dtype(features.dtype))
            if self._log_sums is None:
                self.counts, self._log_sums = counts, batch
            else:
                self.counts, self._log_sums = self.counts + counts, torch.logaddexp(self._log_sums, batch.to(self._log_sums.dtype))

    def centroids(self) -> torch.Tensor:
        """(C, K) probability rows; a ``ValueError`` names the classes without any row (undefined centroids)."""
        if self.counts is None:
            raise ValueError("no rows were added: the centroids are undefined")
        missing = (self.counts == 0).nonzero().flatten().tolist()
        if missing:
            raise ValueError(f"class(es) {missing} have no rows among the {int(self.counts.sum())} added: their centroids are undefined")
        return (self._log_sums - self.counts.to(self._log_sums.dtype).log()[:, None]).exp()


def _validated(features, labels, num_classes, temperature, centroids):
    """Metadata checks with messages naming the argument; labels come back as int64, centroids
    detached, num_classes as an int and temperature as a float."""
    features = _checks.tensor("features", features, ndim=2)
    if features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"features must have at least one row and one column, got shape {tuple(features.shape)}")
    labels = _checks.labels("labels", labels, features.shape[0], features.device).long()
    temperature = _temperature(temperature, features.dtype)
    if centroids is not None:
        centroids = _checks.tensor("centroids", centroids, ndim=2).detach()
        _checks.same_device(features=features, centroids=centroids)
        if centroids.shape[1] != features.shape[1]:
            raise ValueError(f"centroids must have shape (num_classes, {features.shape[1]}) to match features {tuple(features.shape)}, "
                             f"got {tuple(centroids.shape)}")
    if num_classes is not None:
        num_classes = _checks.positive_int("num_classes", num_classes)
        if centroids is not None and num_classes != centroids.shape[0]:
            raise ValueError(f"num_classes={num_classes} disagrees with centroids of shape {tuple(centroids.shape)}")
    elif centroids is not None:
        num_classes = centroids.shape[0]
    else:
        # under torch.func.vmap, the largest label of every entry: the loss does not depend on C beyond it
        num_classes = int(_checks._data(labels).max()) + 1
    return features, labels, centroids, num_classes, temperature


def _temperature(value, dtype: torch.dtype) -> float:
    """A python float T > 0 whose inverse, by which the kernels scale, is a normal number of the
    accumulation dtype: no overflow to inf, no loss of precision below the normal range."""
    if isinstance(value, torch.Tensor):
        raise TypeError("temperature must be a python float for cmi_loss, got a tensor (a learned temperature "
                        "would lower the CMI by flattening every softmax)")
    temperature = _checks.positive_scalar("temperature", value)
    acc = accumulation_dtype(dtype)
    limits = torch.finfo(acc)
    if not limits.tiny <= 1.0 / temperature <= limits.max:
        raise ValueError(f"temperature must lie in [{1 / limits.max:.3g}, {1 / limits.tiny:.3g}] for {dtype} features "
                         f"(1 / temperature must be a normal {acc}), got {temperature:g}")
    return temperature


__all__ = ["CMILoss", "ClassCentroids", "REGISTRY", "cmi_loss", "cmi_per_class"]
