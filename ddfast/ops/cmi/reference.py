"""The CMI regulariser in plain torch: the test oracle and the loss that ``cmi_loss`` replaces.

``P_i = softmax(features_i / T)``, ``Q_c`` = the mean of ``P_i`` over the rows labelled ``c`` (or
given ``centroids``, held constant), ``KL_i = KL(P_i || Q_{y_i})``, reduced by mean / sum / none.
These are the naive forms: in float32 a centroid entry can underflow to 0, and the loss to inf/nan.
Each row's max is subtracted before the division by T (the same softmax), so that finite features
never overflow there (``features / T`` would for large features or small T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cmi_reference(features: torch.Tensor, labels: torch.Tensor, num_classes: int | None = None, *,
                  temperature: float = 1.0, centroids: torch.Tensor | None = None,
                  reduction: str = "mean") -> torch.Tensor:
    """Softmaxes, class means of the softmaxes, per-sample KL; computed in the features' dtype.

    features (N, K) float, labels (N,) int64 in [0, num_classes), centroids (C, K) or None.
    Returns a scalar (mean / sum) or (N,) (none). Differentiated by autograd, centroids included.
    """
    log_p = F.log_softmax((features - features.detach().amax(dim=1, keepdim=True)) / temperature, dim=1)
    p = log_p.exp()
    if centroids is None:
        num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
        sums = p.new_zeros(num_classes, p.shape[1]).index_add(0, labels, p)
        counts = p.new_zeros(num_classes).index_add(0, labels, p.new_ones(p.shape[0])).clamp_min(1)
        q = sums / counts[:, None]
    else:
        q = centroids.detach().to(p.dtype)
    kl = (p * (log_p - q.log()[labels])).sum(dim=1)
    if reduction == "none":
        return kl
    return kl.sum() if reduction == "sum" else kl.mean()


def cmi_authors(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, temperature: float = 1.0) -> torch.Tensor:
    """The authors' formulation, literally: a per-class loop for the centroids, then
    ``F.kl_div(log Q_y, log_softmax(f / T), log_target=True, reduction="batchmean")``."""
    p = F.softmax(features / temperature, dim=1)
    rows = []
    for c in range(num_classes):
        members = p[labels == c]
        rows.append(members.mean(dim=0) if len(members) else torch.zeros_like(p[0]))
    q = torch.stack(rows)
    return F.kl_div(q[labels].log(), F.log_softmax(features / temperature, dim=1), log_target=True, reduction="batchmean")
