"""Backend ``triton``: fused InfoNCE kernels for CUDA GPUs (and the CPU under ``TRITON_INTERPRET=1``).

The protocol of ``streaming.py``. Flash-attention style: a block of query rows stays in registers
while key tiles stream past; the logits exist only tile by tile, in the log2 domain.

- ``_lse_kernel``: online logsumexp per query, the keys split across programs so that a few
  hundred queries still fill the GPU (split statistics merged in torch: deterministic).
- ``_grad_kernel``: the softmax-weighted sums ``dq = scale * W (rk k)`` and ``dk = scale * W^T q``
  with the tile recomputed from the saved logsumexp. One kernel serves both: each program owns
  rows of its output (queries for dq, keys for dk) and loops over the other side, so there are no
  atomics and results are deterministic; the dk launch is skipped when keys need no gradient.

Row offsets are 64-bit (M x D may exceed 2^31 elements). Inputs are read in their own dtype
(bf16 / fp16 tensor cores); accumulation is float32 (float64 for float64 inputs). float32 inputs use full-precision dots unless
``torch.backends.cuda.matmul.allow_tf32`` is set.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..._backends import triton_interpreted

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in ACC. UPCAST: bfloat16 under the interpreter, whose dot multiplies the raw
    bfloat16 bit patterns (triton-lang/triton#11584); the products of bfloat16 values are exact in float32."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=ACC)
    else:
        out = tl.dot(a, b, input_precision=PRECISION, out_dtype=ACC)
    return out


@triton.jit
def _lse_kernel(Q, K, RK, MAX_OUT, SUM_OUT, n, m, d, stride_q, stride_k, keys_per_split, scale_log2e,
                HAS_NORM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """MAX_OUT / SUM_OUT (splits, n): running max and sum of exp2 of one key split, per query."""
    rows = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    split = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    q = tl.load(Q + rows.to(tl.int64)[:, None] * stride_q + dims[None, :], mask=(rows[:, None] < n) & (dims[None, :] < d), other=0.0)
    run_max = tl.full([BLOCK_A], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_A], ACC)
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, m)
    for k0 in range(start, stop, BLOCK_B):
        cols = k0 + tl.arange(0, BLOCK_B)
        col_ok = cols < stop
        k = tl.load(K + cols.to(tl.int64)[:, None] * stride_k + dims[None, :], mask=col_ok[:, None] & (dims[None, :] < d), other=0.0)
        s = _dot(q, tl.trans(k), ACC, PRECISION, UPCAST)
        if HAS_NORM:
            s = s * (tl.load(RK + cols, mask=col_ok, other=0.0) * scale_log2e)[None, :]
        else:
            s = s * scale_log2e
        s = tl.where(col_ok[None, :], s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, 1))
        run_sum = run_sum * tl.exp2(run_max - new_max) + tl.sum(tl.exp2(s - new_max[:, None]), 1)
        run_max = new_max
    out = split * n + rows
    tl.store(MAX_OUT + out, run_max, mask=rows < n)
    tl.store(SUM_OUT + out, run_sum, mask=rows < n)


@triton.jit
def _grad_kernel(A, B, RK, LSE2, WEIGHT, OUT, n_a, n_b, d, stride_a, stride_b, b_per_split, scale_log2e, scale,
                 QUERY_ROWS: tl.constexpr, HAS_NORM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT (splits, n_a, d): one split's share of the gradient of the rows of A.

    QUERY_ROWS: A = queries, B = keys (dq: per-row statistics on A, key norms on B's columns).
    Otherwise A = keys, B = queries (dk: key norms on A's rows, statistics on B's columns).
    """
    rows = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    split = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_a
    a = tl.load(A + rows.to(tl.int64)[:, None] * stride_a + dims[None, :], mask=row_ok[:, None] & (dims[None, :] < d), other=0.0)
    if QUERY_ROWS:
        row_lse = tl.load(LSE2 + rows, mask=row_ok, other=0.0)
        row_weight = tl.load(WEIGHT + rows, mask=row_ok, other=0.0)
    elif HAS_NORM:
        row_factor = tl.load(RK + rows, mask=row_ok, other=0.0) * scale_log2e
    acc = tl.zeros([BLOCK_A, BLOCK_D], ACC)
    start = split * b_per_split
    stop = tl.minimum(start + b_per_split, n_b)
    for b0 in range(start, stop, BLOCK_B):
        cols = b0 + tl.arange(0, BLOCK_B)
        col_ok = cols < stop
        b = tl.load(B + cols.to(tl.int64)[:, None] * stride_b + dims[None, :], mask=col_ok[:, None] & (dims[None, :] < d), other=0.0)
        s = _dot(a, tl.trans(b), ACC, PRECISION, UPCAST)
        if QUERY_ROWS:
            if HAS_NORM:
                col_norm = tl.load(RK + cols, mask=col_ok, other=0.0)
                s = s * (col_norm * scale_log2e)[None, :]
            else:
                s = s * scale_log2e
            p = tl.exp2(s - row_lse[:, None]) * row_weight[:, None]
            if HAS_NORM:
                p = p * col_norm[None, :]
        else:
            if HAS_NORM:
                s = s * row_factor[:, None]
            else:
                s = s * scale_log2e
            col_lse = tl.load(LSE2 + cols, mask=col_ok, other=0.0)
            col_weight = tl.load(WEIGHT + cols, mask=col_ok, other=0.0)
            p = tl.exp2(s - col_lse[None, :]) * col_weight[None, :]
        p = tl.where(col_ok[None, :], p, 0.0)
        acc += _dot(p.to(b.dtype), b, ACC, PRECISION, UPCAST)
    out = OUT + (split * n_a + rows.to(tl.int64)[:, None]) * d + dims[None, :]
    tl.store(out, acc * scale, mask=row_ok[:, None] & (dims[None, :] < d))


def _config(d: int, dtype: torch.dtype) -> dict:
    """Block sizes and launch options on a GPU for feature dimension ``d``.

    A program keeps BLOCK_A rows of its side resident and streams BLOCK_B rows of the other per
    pipeline stage, all BLOCK_D wide: the row size in bytes sets how many fit in shared memory
    (about 227 KB per block on Hopper; checked by tests/test_infonce.py for sm_90).
    """
    block_d = max(16, triton.next_power_of_2(d))
    row_bytes = block_d * dtype.itemsize
    if row_bytes <= 256:
        return {"BLOCK_A": 64, "BLOCK_B": 64, "BLOCK_D": block_d, "num_warps": 4, "num_stages": 3}
    if row_bytes <= 512:
        return {"BLOCK_A": 64, "BLOCK_B": 64, "BLOCK_D": block_d, "num_warps": 8, "num_stages": 2}
    if row_bytes <= 2048:
        return {"BLOCK_A": 32, "BLOCK_B": 32, "BLOCK_D": block_d, "num_warps": 8, "num_stages": 2}
    return {"BLOCK_A": 16, "BLOCK_B": 16, "BLOCK_D": block_d, "num_warps": 8, "num_stages": 1}


def _launch_config(d: int, dtype: torch.dtype) -> dict:
    """``_config``, or small blocks under the interpreter so that tests cover several blocks and splits."""
    if triton_interpreted():
        return {"BLOCK_A": 16, "BLOCK_B": 16, "BLOCK_D": max(16, triton.next_power_of_2(d))}
    return _config(d, dtype)


def _programs(device: torch.device) -> int:
    """How many programs fill the device (twice its multiprocessor count)."""
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _split(n_rows: int, n_other: int, block_rows: int, block_other: int, device) -> tuple[int, int]:
    """(splits, items per split) of the looped-over side so that rows x splits fill the device."""
    row_blocks = triton.cdiv(n_rows, block_rows)
    splits = max(1, min(triton.cdiv(_programs(device), row_blocks), triton.cdiv(n_other, block_other)))
    per_split = triton.cdiv(triton.cdiv(n_other, splits), block_other) * block_other
    return triton.cdiv(n_other, per_split), per_split


def _types(query: torch.Tensor, key: torch.Tensor):
    """Both sides in the key's dtype, and the dtype constexprs of the kernels."""
    if key.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        precision = "tf32"
    elif key.dtype in (torch.float32, torch.float64):
        precision = "ieee"
    else:
        precision = None  # bf16 / fp16 products are exact, accumulated in float32
    constexprs = {"ACC": tl.float64 if key.dtype == torch.float64 else tl.float32, "PRECISION": precision,
                  "UPCAST": triton_interpreted() and key.dtype == torch.bfloat16}
    query, key = query.to(key.dtype).contiguous(), key.contiguous()
    # the kernels step rows by stride(0) and assume unit stride along D
    assert query.stride(1) == 1 or query.shape[1] == 1, query.stride()
    assert key.stride(1) == 1 or key.shape[1] == 1, key.stride()
    return query, key, constexprs


def lse(query: torch.Tensor, key: torch.Tensor, key_inv_norm: torch.Tensor | None, scale: float) -> torch.Tensor:
    acc_dtype = query.dtype
    query, key, types = _types(query, key)
    (n, d), m = query.shape, key.shape[0]
    cfg = _launch_config(d, key.dtype)
    splits, per_split = _split(n, m, cfg["BLOCK_A"], cfg["BLOCK_B"], query.device)
    run_max = torch.empty(splits, n, dtype=acc_dtype, device=query.device)
    run_sum = torch.empty_like(run_max)
    grid = (triton.cdiv(n, cfg["BLOCK_A"]), splits)
    _lse_kernel[grid](query, key, key_inv_norm if key_inv_norm is not None else query, run_max, run_sum,
                      n, m, d, query.stride(0), key.stride(0), per_split, scale * LOG2E,
                      HAS_NORM=key_inv_norm is not None, **types, **cfg)
    top = run_max.max(0).values
    return (top + torch.log2((run_sum * torch.exp2(run_max - top)).sum(0))) * math.log(2.0)


def _weighted_sum(a, b, key_inv_norm, lse2, weight, scale, query_rows, types):
    (n_a, d), n_b = a.shape, b.shape[0]
    cfg = _launch_config(d, b.dtype)
    splits, per_split = _split(n_a, n_b, cfg["BLOCK_A"], cfg["BLOCK_B"], a.device)
    out = torch.empty(splits, n_a, d, dtype=lse2.dtype, device=a.device)
    grid = (triton.cdiv(n_a, cfg["BLOCK_A"]), splits)
    _grad_kernel[grid](a, b, key_inv_norm if key_inv_norm is not None else lse2, lse2, weight, out,
                       n_a, n_b, d, a.stride(0), b.stride(0), per_split, scale * LOG2E, scale,
                       QUERY_ROWS=query_rows, HAS_NORM=key_inv_norm is not None, **types, **cfg)
    return out[0] if splits == 1 else out.sum(0)


def grads(query: torch.Tensor, key: torch.Tensor, key_inv_norm: torch.Tensor | None, scale: float, lse: torch.Tensor,
          weight: torch.Tensor, need_query: bool, need_key: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    query, key, types = _types(query, key)
    lse2 = (lse * LOG2E).contiguous()
    weight = weight.contiguous()
    grad_query = _weighted_sum(query, key, key_inv_norm, lse2, weight, scale, True, types) if need_query else None
    grad_key = _weighted_sum(key, query, key_inv_norm, lse2, weight, scale, False, types) if need_key else None
    return grad_query, grad_key
