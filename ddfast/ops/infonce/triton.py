"""Backend ``triton``: fused InfoNCE kernels for CUDA GPUs (and the CPU under ``TRITON_INTERPRET=1``).

The protocol of ``streaming.py``. Flash-attention style: a program owns a block of query rows while
key tiles stream past; the logits exist only tile by tile, in the log2 domain, each tile accumulated
over the features in chunks (GEMM-shaped, so that Hopper runs the dots on wgmma; ``_config``).

- ``_lse_kernel``: online logsumexp per query, the keys split across programs so that a few
  hundred queries still fill the GPU (split statistics merged in torch: deterministic).
- ``_grad_kernel``: the softmax-weighted sums ``dq = scale * W (rk k)`` and ``dk = scale * W^T q``
  with the tile recomputed from the saved logsumexp. One kernel serves both: each program owns
  rows of its output (queries for dq, keys for dk) and a block of its features, and loops over the
  other side, so there are no atomics and results are deterministic; the dk launch is skipped when
  keys need no gradient.

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
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. UPCAST: bfloat16 under the interpreter, whose dot multiplies the raw bfloat16 bit
    patterns (triton-lang/triton#11584); the products of bfloat16 values are exact in float32."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee", out_dtype=acc.dtype)
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
    return out


@triton.jit
def _logits(A, B, rows, cols, row_ok, col_ok, d, stride_a, stride_b, ACC: tl.constexpr, PRECISION: tl.constexpr,
            UPCAST: tl.constexpr, BLOCK_D: tl.constexpr):
    """(len(rows), len(cols)) tile of A[rows] @ B[cols]^T in ACC, the feature dimension in BLOCK_D chunks."""
    s = tl.zeros([rows.shape[0], cols.shape[0]], ACC)
    a_rows = A + rows.to(tl.int64)[:, None] * stride_a
    b_rows = B + cols.to(tl.int64)[:, None] * stride_b
    for d0 in range(0, d, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims[None, :] < d
        a = tl.load(a_rows + dims[None, :], mask=row_ok[:, None] & dim_ok, other=0.0)
        b = tl.load(b_rows + dims[None, :], mask=col_ok[:, None] & dim_ok, other=0.0)
        s = _dot(a, tl.trans(b), s, PRECISION, UPCAST)
    return s


@triton.jit
def _lse_kernel(Q, K, RK, MAX_OUT, SUM_OUT, n, m, d, stride_q, stride_k, keys_per_split, scale_log2e,
                HAS_NORM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """MAX_OUT / SUM_OUT (splits, n): running max and sum of exp2 of one key split, per query."""
    rows = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    row_ok = rows < n
    split = tl.program_id(1)
    run_max = tl.full([BLOCK_A], float("-inf"), ACC)
    run_sum = tl.zeros([BLOCK_A], ACC)
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, m)
    for k0 in tl.range(start, stop, BLOCK_B, flatten=True):
        cols = k0 + tl.arange(0, BLOCK_B)
        col_ok = cols < stop
        s = _logits(Q, K, rows, cols, row_ok, col_ok, d, stride_q, stride_k, ACC, PRECISION, UPCAST, BLOCK_D)
        if HAS_NORM:
            s = s * (tl.load(RK + cols, mask=col_ok, other=0.0) * scale_log2e)[None, :]
        else:
            s = s * scale_log2e
        s = tl.where(col_ok[None, :], s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, 1))
        run_sum = run_sum * tl.exp2(run_max - new_max) + tl.sum(tl.exp2(s - new_max[:, None]), 1)
        run_max = new_max
    out = split * n + rows
    tl.store(MAX_OUT + out, run_max, mask=row_ok)
    tl.store(SUM_OUT + out, run_sum, mask=row_ok)


@triton.jit
def _grad_kernel(A, B, RK, LSE2, WEIGHT, OUT, n_a, n_b, d, stride_a, stride_b, b_per_split, scale_log2e, scale,
                 QUERY_ROWS: tl.constexpr, HAS_NORM: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_OUT: tl.constexpr):
    """OUT (splits, n_a, d): one split's share of the gradient of the rows of A, BLOCK_OUT of its
    features per program (grid: row blocks, feature blocks, splits).

    QUERY_ROWS: A = queries, B = keys (dq: per-row statistics on A, key norms on B's columns).
    Otherwise A = keys, B = queries (dk: key norms on A's rows, statistics on B's columns).
    """
    rows = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    outs = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    split = tl.program_id(2)
    row_ok = rows < n_a
    out_ok = outs[None, :] < d
    if QUERY_ROWS:
        row_lse = tl.load(LSE2 + rows, mask=row_ok, other=0.0)
        row_weight = tl.load(WEIGHT + rows, mask=row_ok, other=0.0)
    elif HAS_NORM:
        row_factor = tl.load(RK + rows, mask=row_ok, other=0.0) * scale_log2e
    acc = tl.zeros([BLOCK_A, BLOCK_OUT], ACC)
    start = split * b_per_split
    stop = tl.minimum(start + b_per_split, n_b)
    for b0 in tl.range(start, stop, BLOCK_B, flatten=True):
        cols = b0 + tl.arange(0, BLOCK_B)
        col_ok = cols < stop
        s = _logits(A, B, rows, cols, row_ok, col_ok, d, stride_a, stride_b, ACC, PRECISION, UPCAST, BLOCK_D)
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
        b = tl.load(B + cols.to(tl.int64)[:, None] * stride_b + outs[None, :], mask=col_ok[:, None] & out_ok, other=0.0)
        acc = _dot(p.to(b.dtype), b, acc, PRECISION, UPCAST)
    out = OUT + (split * n_a + rows.to(tl.int64)[:, None]) * d + outs[None, :]
    tl.store(out, acc * scale, mask=row_ok[:, None] & out_ok)


CONFIGS = {  # (kernel, element bytes) -> tiles and launch options on a GPU; see _config
    ("lse", 2): {"BLOCK_A": 128, "BLOCK_B": 128, "BLOCK_D": 64, "num_warps": 8, "num_stages": 3},
    ("grad", 2): {"BLOCK_A": 128, "BLOCK_B": 64, "BLOCK_D": 64, "BLOCK_OUT": 256, "num_warps": 8, "num_stages": 3},
    ("lse", 4): {"BLOCK_A": 64, "BLOCK_B": 64, "BLOCK_D": 32, "num_warps": 4, "num_stages": 3},
    ("grad", 4): {"BLOCK_A": 64, "BLOCK_B": 32, "BLOCK_D": 32, "BLOCK_OUT": 256, "num_warps": 8, "num_stages": 3},
    ("lse", 8): {"BLOCK_A": 32, "BLOCK_B": 32, "BLOCK_D": 16, "num_warps": 4, "num_stages": 2},
    ("grad", 8): {"BLOCK_A": 32, "BLOCK_B": 32, "BLOCK_D": 16, "BLOCK_OUT": 64, "num_warps": 4, "num_stages": 2},
}


def _config(kernel: str, d: int, dtype: torch.dtype) -> dict:
    """Tiles and launch options on a GPU of ``kernel`` ("lse" or "grad") for (padded) feature dimension ``d``.

    ``CONFIGS`` by element size; BLOCK_OUT is cut to ``d`` rounded up to a power of two:

    | dtype | kernel | BLOCK_A x BLOCK_B x BLOCK_D | BLOCK_OUT | warps | stages | sm_90: dots, registers, shared memory |
    |---|---|---|---|---|---|---|
    | bf16 / fp16 | lse | 128 x 128 x 64 | | 8 | 3 | wgmma; 123 (bf16) / 172 (fp16) regs, 96 KB |
    | bf16 / fp16 | grad | 128 x 64 x 64 | 256 | 8 | 3 | wgmma; up to 242 regs, up to 128 KB |
    | fp32 | lse | 64 x 64 x 32 | | 4 | 3 | wgmma (tf32) or FMA (ieee); 80 / 168 regs, 48 / 32 KB |
    | fp32 | grad | 64 x 32 x 32 | 256 | 8 | 3 | wgmma (tf32) or FMA (ieee); up to 184 regs, 112 / 72 KB |
    | fp64 | both | 32 x 32 x 16 | 64 | 4 | 2 | DMMA (mma.sync f64) |

    No configuration spills (ptxas for sm_90a, D = 64 to 1024). The reasons:

    - wgmma needs 64 rows per warpgroup: the 16-bit tiles have 128 rows on two warpgroups (8 warps).
    - The logits tile is accumulated over the features in BLOCK_D chunks (64 bf16 = one 128-byte
      swizzled row), so shared memory holds ``num_stages`` x (BLOCK_A + BLOCK_B) x BLOCK_D inputs
      whatever D is (sm_90 allows 227 KB a block); the loops over keys and chunks are flattened into
      one software pipeline. lse then fits two programs per SM (96 KB, 128 registers a thread).
    - The gradient's accumulator BLOCK_A x BLOCK_OUT (fp32) stays in registers (128 a thread); the
      features of the output are split across programs (grid axis 1), each recomputing the logits
      tile over all of D: D <= 256 computes the logits once, D = 512 twice, D = 1024 four times.
      BLOCK_OUT = 512 fits only at 255 registers and 205 KB; 128 doubles the recomputation.
    - fp32 without tf32 runs on FMA units, whose operand registers need the smaller fp32 tiles.
    - Rows reach the kernels padded to a multiple of 16 features (``_rows``) so that the compiler
      knows their pitch divides by 16: loads vectorise and pipeline (an odd pitch spills and serialises).
    """
    config = dict(CONFIGS[kernel, dtype.itemsize])
    if "BLOCK_OUT" in config:
        config["BLOCK_OUT"] = min(config["BLOCK_OUT"], max(16, triton.next_power_of_2(d)))
    return config


def _launch_config(kernel: str, d: int, dtype: torch.dtype) -> dict:
    """``_config``, or small tiles under the interpreter so that tests cover several row and key blocks,
    feature chunks (D > 16) and output feature blocks (D > 32)."""
    if triton_interpreted():
        return {"BLOCK_A": 16, "BLOCK_B": 16, "BLOCK_D": 32, **({"BLOCK_OUT": 32} if kernel == "grad" else {})}
    return _config(kernel, d, dtype)


def _programs(device: torch.device) -> int:
    """How many programs fill the device (twice its multiprocessor count)."""
    if device.type != "cuda":
        return 8
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _split(row_programs: int, n_other: int, block_other: int, device) -> tuple[int, int]:
    """(splits, items per split) of the looped-over side so that row programs x splits fill the device
    without a nearly empty last wave (rounded down)."""
    splits = max(1, min(_programs(device) // row_programs, triton.cdiv(n_other, block_other)))
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
    return _rows(query, key.dtype), _rows(key, key.dtype), constexprs


def _rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x (rows, D) contiguous in ``dtype``, zero-padded to a multiple of 16 features where D is not one:
    Triton then knows the row pitch divides by 16, so that loads vectorise and pipeline (the zeros add
    nothing to the dots, and the gradients' padding is cut off)."""
    d = x.shape[1]
    if d % 16 == 0:
        return x.to(dtype).contiguous()
    padded = x.new_zeros(x.shape[0], triton.cdiv(d, 16) * 16, dtype=dtype)
    padded[:, :d] = x
    return padded


def lse(query: torch.Tensor, key: torch.Tensor, key_inv_norm: torch.Tensor | None, scale: float) -> torch.Tensor:
    acc_dtype = query.dtype
    query, key, types = _types(query, key)
    (n, d), m = query.shape, key.shape[0]
    cfg = _launch_config("lse", d, key.dtype)
    row_blocks = triton.cdiv(n, cfg["BLOCK_A"])
    splits, per_split = _split(row_blocks, m, cfg["BLOCK_B"], query.device)
    run_max = torch.empty(splits, n, dtype=acc_dtype, device=query.device)
    run_sum = torch.empty_like(run_max)
    grid = (row_blocks, splits)
    _lse_kernel[grid](query, key, key_inv_norm if key_inv_norm is not None else query, run_max, run_sum,
                      n, m, d, query.stride(0), key.stride(0), per_split, scale * LOG2E,
                      HAS_NORM=key_inv_norm is not None, **types, **cfg)
    top = run_max.max(0).values
    return (top + torch.log2((run_sum * torch.exp2(run_max - top)).sum(0))) * math.log(2.0)


def _weighted_sum(a, b, key_inv_norm, lse2, weight, scale, query_rows, types, features):
    """(n_a, features): the gradient of the rows of A (the first ``features`` of its padded width)."""
    (n_a, d), n_b = a.shape, b.shape[0]
    cfg = _launch_config("grad", d, b.dtype)
    row_blocks, out_blocks = triton.cdiv(n_a, cfg["BLOCK_A"]), triton.cdiv(d, cfg["BLOCK_OUT"])
    splits, per_split = _split(row_blocks * out_blocks, n_b, cfg["BLOCK_B"], a.device)
    out = torch.empty(splits, n_a, d, dtype=lse2.dtype, device=a.device)
    grid = (row_blocks, out_blocks, splits)
    _grad_kernel[grid](a, b, key_inv_norm if key_inv_norm is not None else lse2, lse2, weight, out,
                       n_a, n_b, d, a.stride(0), b.stride(0), per_split, scale * LOG2E, scale,
                       QUERY_ROWS=query_rows, HAS_NORM=key_inv_norm is not None, **types, **cfg)
    return (out[0] if splits == 1 else out.sum(0))[:, :features].contiguous()


def grads(query: torch.Tensor, key: torch.Tensor, key_inv_norm: torch.Tensor | None, scale: float, lse: torch.Tensor,
          weight: torch.Tensor, need_query: bool, need_key: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    features = query.shape[1]
    query, key, types = _types(query, key)
    lse2 = (lse * LOG2E).contiguous()
    weight = weight.contiguous()
    grad_query = _weighted_sum(query, key, key_inv_norm, lse2, weight, scale, True, types, features) if need_query else None
    grad_key = _weighted_sum(key, query, key_inv_norm, lse2, weight, scale, False, types, features) if need_key else None
    return grad_query, grad_key
