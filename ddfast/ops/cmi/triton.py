"""Backend ``triton``: the protocol of ``streaming.py`` over the seven kernels of ``csrc/cmi/cmi_ops.h``
written in Triton (``Kernels``), on CUDA tensors (CPU tensors under ``TRITON_INTERPRET=1``).

Row kernels handle ``ROWS`` rows per program and stream over the columns in tiles of ``BLOCK_K``
(``_config``); per-class reductions take one chunk of at most ``CHUNK_ROWS`` rows of one class per
program (one tile), then a combine kernel reduces each class's chunks in order: deterministic, no atomics.
All arithmetic is in the accumulation dtype (float32, float64 for float64 inputs); the scale
``inv_t`` travels as a one-element tensor of that dtype so that float64 keeps full precision.
Shapes and the normalisers ``norm`` (N, 2) as in ``csrc/cmi/cmi_ops.h``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._backends import accumulation_dtype
from . import compiled

ROWS = 16
CHUNK_ROWS = ROWS  # the chunk kernels' tile is the row kernels' (see _config)
COMBINE_CHUNKS = 8
BLOCK_K = {torch.float32: 128, torch.float64: 64}  # the widest column tile, by accumulation dtype


@triton.jit
def _features_tile(f_ptr, rows, row_mask, cols, k, acc_dtype):
    """A (rows, cols) tile of the features in the accumulation dtype; -inf outside its mask."""
    mask = row_mask[:, None] & (cols < k)[None, :]
    f = tl.load(f_ptr + rows[:, None] * k + cols[None, :], mask=mask, other=0.0).to(acc_dtype)
    return tl.where(mask, f, float("-inf")), mask


@triton.jit
def _log_p_tile(f_ptr, rows, row_mask, cols, k, inv_t, top, log_sum):
    """log P = (features - top) * inv_t - log_sum on a (rows, cols) tile; -inf outside its mask."""
    f, mask = _features_tile(f_ptr, rows, row_mask, cols, k, inv_t.dtype)
    return (f - top[:, None]) * inv_t - log_sum[:, None], mask


@triton.jit
def _rows_norm(f_ptr, rows, row_mask, k, inv_t, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Each row's max feature and log sum exp((f - max) * inv_t), by an online max and sum
    (-inf for masked rows); the log-sum is nan for a row holding a nan or an inf."""
    zero = tl.zeros([ROWS], dtype=inv_t.dtype)
    m = zero + float("-inf")
    s = zero
    non_finite = tl.zeros([ROWS], dtype=tl.int32)
    for k0 in range(0, k, BLOCK_K):
        f, mask = _features_tile(f_ptr, rows, row_mask, k0 + tl.arange(0, BLOCK_K), k, inv_t.dtype)
        bad = mask & ((f != f) | (tl.abs(f) == float("inf")))
        non_finite = tl.maximum(non_finite, tl.max(bad.to(tl.int32), 1))
        m_new = tl.maximum(m, tl.max(f, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp((m - shift) * inv_t) + tl.sum(tl.exp((f - shift[:, None]) * inv_t), 1)
        m = m_new
    return m, tl.where(non_finite > 0, float("nan"), tl.log(s))


@triton.jit
def _load_norm(norm_ptr, rows, row_mask):
    return tl.load(norm_ptr + 2 * rows, mask=row_mask, other=0.0), tl.load(norm_ptr + 2 * rows + 1, mask=row_mask, other=0.0)


@triton.jit
def _row_norm_kernel(f_ptr, norm_ptr, inv_t_ptr, n, k, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n
    top, log_sum = _rows_norm(f_ptr, rows, row_mask, k, tl.load(inv_t_ptr), ROWS, BLOCK_K)
    tl.store(norm_ptr + 2 * rows, top, mask=row_mask)
    tl.store(norm_ptr + 2 * rows + 1, log_sum, mask=row_mask)


@triton.jit
def _chunk_rows(order_ptr, start_ptr, end_ptr, chunk, CHUNK: tl.constexpr):
    """The row indices of a chunk (padded to CHUNK) and their mask."""
    start = tl.load(start_ptr + chunk)
    index = start + tl.arange(0, CHUNK)
    row_mask = index < tl.load(end_ptr + chunk)
    return tl.load(order_ptr + index, mask=row_mask, other=0), row_mask


@triton.jit
def _chunk_norm_kernel(f_ptr, order_ptr, start_ptr, end_ptr, norm_ptr, part_ptr, inv_t_ptr, k,
                       CHUNK: tl.constexpr, BLOCK_K: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    rows, row_mask = _chunk_rows(order_ptr, start_ptr, end_ptr, chunk, CHUNK)
    inv_t = tl.load(inv_t_ptr)
    top, log_sum = _rows_norm(f_ptr, rows, row_mask, k, inv_t, CHUNK, BLOCK_K)
    tl.store(norm_ptr + 2 * rows, top, mask=row_mask)
    tl.store(norm_ptr + 2 * rows + 1, log_sum, mask=row_mask)
    top = tl.where(row_mask, top, 0.0)
    log_sum = tl.where(row_mask, log_sum, 0.0)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x, _ = _log_p_tile(f_ptr, rows, row_mask, cols, k, inv_t, top, log_sum)
        col_max = tl.max(x, 0)
        shift = tl.where(col_max == float("-inf"), 0.0, col_max)
        total = tl.sum(tl.exp(x - shift[None, :]), 0)
        tl.store(part_ptr + chunk * k + cols, shift + tl.log(total), mask=cols < k)


@triton.jit
def _combine_kernel(part_ptr, first_ptr, counts_ptr, out_ptr, k, LOG: tl.constexpr, CHUNKS: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per class and column tile: logsumexp - log n (LOG) or sum / n over the class's chunks."""
    c = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    col_mask = cols < k
    lo = tl.load(first_ptr + c)
    hi = tl.load(first_ptr + c + 1)
    count = tl.load(counts_ptr + c).to(out_ptr.dtype.element_ty)
    zero = tl.zeros([BLOCK_K], dtype=out_ptr.dtype.element_ty)
    m = zero + float("-inf")
    s = zero
    for j0 in range(lo, hi, CHUNKS):
        j = j0 + tl.arange(0, CHUNKS)
        mask = (j < hi)[:, None] & col_mask[None, :]
        if LOG:
            tile = tl.load(part_ptr + j[:, None] * k + cols[None, :], mask=mask, other=float("-inf"))
            m_new = tl.maximum(m, tl.max(tile, 0))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(tile - shift[None, :]), 0)
            m = m_new
        else:
            s += tl.sum(tl.load(part_ptr + j[:, None] * k + cols[None, :], mask=mask, other=0.0), 0)
    if LOG:
        out = tl.where(count > 0, m + tl.log(s) - tl.log(count), float("-inf"))
    else:
        out = tl.where(count > 0, s / count, 0.0)
    tl.store(out_ptr + c * k + cols, out, mask=col_mask)


@triton.jit
def _row_kl_kernel(f_ptr, labels_ptr, norm_ptr, log_q_ptr, kl_ptr, inv_t_ptr, n, k, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n
    y = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    top, log_sum = _load_norm(norm_ptr, rows, row_mask)
    inv_t = tl.load(inv_t_ptr)
    total = tl.zeros([ROWS], dtype=inv_t.dtype)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x, mask = _log_p_tile(f_ptr, rows, row_mask, cols, k, inv_t, top, log_sum)
        log_q = tl.load(log_q_ptr + y[:, None] * k + cols[None, :], mask=mask, other=0.0)
        p = tl.exp(x)
        total += tl.sum(tl.where(p > 0, p * (x - log_q), 0.0), 1)
    tl.store(kl_ptr + rows, total, mask=row_mask)


@triton.jit
def _chunk_centroid_grad_kernel(f_ptr, order_ptr, start_ptr, end_ptr, cls_ptr, norm_ptr, log_q_ptr, g_ptr, part_ptr, inv_t_ptr, k,
                                CHUNK: tl.constexpr, BLOCK_K: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rows, row_mask = _chunk_rows(order_ptr, start_ptr, end_ptr, chunk, CHUNK)
    top, log_sum = _load_norm(norm_ptr, rows, row_mask)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    log_q = tl.load(log_q_ptr + tl.load(cls_ptr + chunk) * k + cols, mask=cols < k, other=0.0)
    x, _ = _log_p_tile(f_ptr, rows, row_mask, cols, k, tl.load(inv_t_ptr), top, log_sum)
    ratio = tl.where(x > float("-inf"), tl.exp(x - log_q[None, :]), 0.0)  # 0 where log P is -inf (cmi_ops.h)
    total = tl.sum(g[:, None] * ratio, 0)
    tl.store(part_ptr + chunk * k + cols, total, mask=cols < k)


@triton.jit
def _row_grad_kernel(f_ptr, labels_ptr, norm_ptr, log_q_ptr, kl_ptr, g_ptr, a_ptr, out_ptr, inv_t_ptr, n, k,
                     HAS_A: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < n
    y = tl.load(labels_ptr + rows, mask=row_mask, other=0)
    top, log_sum = _load_norm(norm_ptr, rows, row_mask)
    kl = tl.load(kl_ptr + rows, mask=row_mask, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_mask, other=0.0)
    inv_t = tl.load(inv_t_ptr)
    through_centroid = tl.zeros([ROWS], dtype=inv_t.dtype)  # sum_k P_ik a_ck
    if HAS_A:
        for k0 in range(0, k, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x, mask = _log_p_tile(f_ptr, rows, row_mask, cols, k, inv_t, top, log_sum)
            a = tl.load(a_ptr + y[:, None] * k + cols[None, :], mask=mask, other=0.0)
            through_centroid += tl.sum(tl.exp(x) * a, 1)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x, mask = _log_p_tile(f_ptr, rows, row_mask, cols, k, inv_t, top, log_sum)
        p = tl.exp(x)
        d = g[:, None] * (x - tl.load(log_q_ptr + y[:, None] * k + cols[None, :], mask=mask, other=0.0) - kl[:, None])
        if HAS_A:
            d = d - tl.load(a_ptr + y[:, None] * k + cols[None, :], mask=mask, other=0.0) + through_centroid[:, None]
        grad = tl.where(p > 0, p * d * inv_t, 0.0)
        tl.store(out_ptr + rows[:, None] * k + cols[None, :], grad.to(out_ptr.dtype.element_ty), mask=mask)


def _contiguous(*tensors: torch.Tensor | None) -> None:
    """The kernels index every tensor as a contiguous array: any other layout is refused (the
    operators pass only contiguous tensors, see ``op.kernel_layout``)."""
    for t in tensors:
        if t is not None and not t.is_contiguous():
            raise RuntimeError(f"the CMI Triton kernels read contiguous tensors, got shape {tuple(t.shape)} with strides {t.stride()}")


def _config(k: int, dtype: torch.dtype) -> dict:
    """``{"BLOCK_K", "num_warps", "num_stages"}`` for K = ``k`` columns of ``dtype`` features.

    The kernels are memory bound and do no dots. Where K is no multiple of 16, every element loads on
    its own, with its own 64-bit address, so a thread's registers grow with the tile values it holds.
    Every kernel holds a tile of ``ROWS`` (``CHUNK_ROWS``) rows; the widest, 128 columns with float32
    accumulation or 64 with float64 (the same bytes), runs 8 warps: a thread holds 8 float32 or 4
    float64 values of it and no kernel spills on sm_90 (4 warps, 128 float64 columns or 32-row chunks
    spill). Narrower K takes the next power of two and 4 warps, holding no more per thread. The loops'
    loads are not pipelined: their sm_90 code is the same at 1 and 3 stages.
    """
    widest = BLOCK_K[accumulation_dtype(dtype)]
    block_k = min(widest, triton.next_power_of_2(k))
    return {"BLOCK_K": block_k, "num_warps": 8 if block_k == widest else 4, "num_stages": 3}


def _scale(features: torch.Tensor, inv_t: float) -> torch.Tensor:
    return torch.full((1,), inv_t, dtype=accumulation_dtype(features.dtype), device=features.device)


def _acc_empty(features: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.empty(shape, dtype=accumulation_dtype(features.dtype), device=features.device)


def _combine(partial: torch.Tensor, first: torch.Tensor, counts: torch.Tensor, log: bool) -> torch.Tensor:
    _contiguous(partial, first, counts)
    k = partial.shape[1]
    out = torch.empty((counts.shape[0], k), dtype=partial.dtype, device=partial.device)
    config = _config(k, partial.dtype)
    _combine_kernel[(counts.shape[0], triton.cdiv(k, config["BLOCK_K"]))](partial, first, counts, out, k, LOG=log,
                                                                          CHUNKS=COMBINE_CHUNKS, **config)
    return out


class Kernels:
    """The seven kernels of ``csrc/cmi/cmi_ops.h`` as Triton launches, under the names and signatures
    the C++ extensions give them."""

    @staticmethod
    def row_norm(features: torch.Tensor, inv_t: float) -> torch.Tensor:
        _contiguous(features)
        n, k = features.shape
        norm = _acc_empty(features, n, 2)
        _row_norm_kernel[(triton.cdiv(n, ROWS),)](features, norm, _scale(features, inv_t), n, k, ROWS=ROWS, **_config(k, features.dtype))
        return norm

    @staticmethod
    def chunk_norm(features: torch.Tensor, order: torch.Tensor, start: torch.Tensor, end: torch.Tensor, inv_t: float):
        _contiguous(features, order, start, end)
        n, k = features.shape
        norm, partial = _acc_empty(features, n, 2), _acc_empty(features, start.shape[0], k)
        _chunk_norm_kernel[(start.shape[0],)](features, order, start, end, norm, partial, _scale(features, inv_t), k,
                                              CHUNK=CHUNK_ROWS, **_config(k, features.dtype))
        return norm, partial

    @staticmethod
    def combine_lse(partial: torch.Tensor, first: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return _combine(partial, first, counts, True)

    @staticmethod
    def combine_mean(partial: torch.Tensor, first: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return _combine(partial, first, counts, False)

    @staticmethod
    def row_kl(features: torch.Tensor, labels: torch.Tensor, norm: torch.Tensor, log_q: torch.Tensor, inv_t: float) -> torch.Tensor:
        _contiguous(features, labels, norm, log_q)
        n, k = features.shape
        kl = _acc_empty(features, n)
        _row_kl_kernel[(triton.cdiv(n, ROWS),)](features, labels, norm, log_q, kl, _scale(features, inv_t), n, k,
                                                ROWS=ROWS, **_config(k, features.dtype))
        return kl

    @staticmethod
    def chunk_centroid_grad(features, order, start, end, cls, norm, log_q, g, inv_t: float) -> torch.Tensor:
        _contiguous(features, order, start, end, cls, norm, log_q, g)
        k = features.shape[1]
        partial = _acc_empty(features, start.shape[0], k)
        config = _config(k, features.dtype)
        _chunk_centroid_grad_kernel[(start.shape[0], triton.cdiv(k, config["BLOCK_K"]))](
            features, order, start, end, cls, norm, log_q, g, partial, _scale(features, inv_t), k, CHUNK=CHUNK_ROWS, **config)
        return partial

    @staticmethod
    def row_grad(features, labels, norm, log_q, kl, g, a, inv_t: float) -> torch.Tensor:
        _contiguous(features, labels, norm, log_q, kl, g, a)
        n, k = features.shape
        out = torch.empty_like(features)
        _row_grad_kernel[(triton.cdiv(n, ROWS),)](features, labels, norm, log_q, kl, g, kl if a is None else a, out,
                                                  _scale(features, inv_t), n, k, HAS_A=a is not None, ROWS=ROWS,
                                                  **_config(k, features.dtype))
        return out


row_norm, class_log_centroids, row_kl, centroid_grad, row_grad = compiled.protocol(lambda: Kernels, chunk_rows=CHUNK_ROWS)
