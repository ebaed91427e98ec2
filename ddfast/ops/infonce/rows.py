"""One side's rows (queries or keys) as the kernels take them, and the normalisation's backward.

Rows are checked for non-finite values through their largest magnitude, a statistic the
normalisation needs anyway. Normalisation follows ``F.normalize`` (``x / max(||x||, EPS)``) without
overflowing where the math does not: rows whose largest magnitude exceeds ``LARGE`` are divided by a
power of two near it (exact) before anything squares them, so norms, inverse norms and the kernels'
dot products of finite rows stay in range; their gradient is divided by the same power of two.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ... import _checks
from .positives import CHUNK_ROWS

EPS = 1e-12  # F.normalize's clamp on the norm
LARGE = 2.0 ** 32  # rows up to this magnitude are squared as they are (any D, float32)


class Rows(NamedTuple):
    """``values`` (R, D): the rows the kernels read (the input, or a rescaled copy in its dtype);
    ``inv_norm`` (R,): ``1 / max(||values_i||, EPS)`` in the accumulation dtype (``None`` without
    normalisation); ``scale`` (R,): the power of two each row was divided by (``None`` if none was)."""

    values: torch.Tensor
    inv_norm: torch.Tensor | None
    scale: torch.Tensor | None


def power_of_two(peak: torch.Tensor) -> torch.Tensor:
    """``2^(e - 1)`` for ``peak = m 2^e`` (``0.5 <= m < 1``): ``peak`` divided by it lies in [1, 2];
    0.5 for zeros. Dividing by it is exact."""
    _, exponent = torch.frexp(peak)
    return torch.ldexp(torch.ones_like(peak), exponent - 1)


def peaks(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(R,) ``max_j |x_ij|`` in ``dtype`` (nan for rows holding a nan), in bounded chunks."""
    out = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    for start in range(0, x.shape[0], CHUNK_ROWS):
        out[start:start + CHUNK_ROWS] = x[start:start + CHUNK_ROWS].abs().amax(1)
    return out


def prepare(name: str, x: torch.Tensor, normalize: bool, dtype: torch.dtype) -> Rows:
    """``x`` (R, D) checked finite (``ValueError`` naming ``name``), rescaled where needed, with its
    inverse norms in ``dtype`` when ``normalize``."""
    peak = peaks(x, dtype)
    _checks.finite(name, peak)
    if not normalize:
        return Rows(x, None, None)
    scale = None
    if bool((peak > LARGE).any()):
        scale = torch.where(peak > LARGE, power_of_two(peak), 1.0)
        x = x / scale[:, None].to(x.dtype)
    out = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    for start in range(0, x.shape[0], CHUNK_ROWS):
        out[start:start + CHUNK_ROWS] = torch.linalg.vector_norm(x[start:start + CHUNK_ROWS], dim=1, dtype=dtype)
    return Rows(x, out.clamp_min_(EPS).reciprocal_(), scale)


def normalize_backward_(rows: Rows, grad: torch.Tensor) -> torch.Tensor:
    """In place: gradient (R, D) with respect to the normalised rows -> with respect to the input rows.

    ``d(x r)/dx`` applied as ``r (g - u <u, g>)`` with ``u = x r`` the unit rows, so nothing is squared;
    rows under the clamp (norm <= EPS) are scaled by a constant and have no radial part.
    """
    clamped = rows.inv_norm.new_tensor(EPS).reciprocal()
    for start in range(0, grad.shape[0], CHUNK_ROWS):
        stop = start + CHUNK_ROWS
        r, g = rows.inv_norm[start:stop, None], grad[start:stop]
        unit = rows.values[start:stop].to(g.dtype) * r
        radial = torch.where(r < clamped, (unit * g).sum(1, keepdim=True), 0.0)
        g.sub_(unit * radial).mul_(r)
    if rows.scale is not None:
        grad.div_(rows.scale[:, None])
    return grad
