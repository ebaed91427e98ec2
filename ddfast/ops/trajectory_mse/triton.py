"""Backend "triton": one launch over all parameter tensors, through a table of their addresses.

The protocol of :mod:`.streaming`. The table (int64, on the inputs' device) holds, for n tensors of
row lengths n_i: ``chunk_end[i]`` (cumulative count of CHUNK-element chunks per row), ``n_i``, then
the addresses of the student, start and target tensors (and, in backward, of the gradient outputs,
0 where a gradient is not wanted). Program ``w`` of the grid of B * K (K chunks per row) handles
chunk ``w % K`` of trajectory ``w // K``: it finds its tensor by counting the chunk ends at or below
its chunk. Forward writes one partial sum per program (float32, float64 for float64 inputs; a
fixed-length tree sum) and a second kernel adds a trajectory's partials in float64 in a fixed order:
deterministic, no atomics, error bounded by CHUNK rather than P.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._backends import accumulation_dtype, triton_interpreted

CHUNK = 4096  # elements of one row handled by one program
BLOCK = 1024  # elements per step inside a program
FINISH_BLOCK = 256  # partials per step of the per-trajectory sum
LAUNCH = {"num_warps": 4, "num_stages": 3}  # every kernel's launch options

_TRITON_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _locate(table, w, n_chunks, n_tensors, TENSORS: tl.constexpr, CHUNK: tl.constexpr):
    """(trajectory b, tensor i, first element of the chunk, row length n_i) of program ``w``."""
    b = w // n_chunks
    k = w % n_chunks
    index = tl.arange(0, TENSORS)
    ends = tl.load(table + index, mask=index < n_tensors, other=n_chunks + 1)
    i = tl.sum((ends <= k).to(tl.int32))
    first_chunk = tl.load(table + i - 1, mask=i > 0, other=0)
    row = tl.load(table + n_tensors + i)
    return b, i, (k - first_chunk) * CHUNK, row


@triton.jit
def _address(table, slot, DTYPE: tl.constexpr):
    return tl.load(table + slot).to(tl.pointer_type(DTYPE))


@triton.jit
def _to_output(x, DTYPE: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
    """``x`` in ``DTYPE``, rounded to nearest even. GPUs do so; the interpreter truncates float32 to
    bfloat16, so there (ROUND_BY_HAND) the bits are rounded explicitly."""
    if ROUND_BY_HAND and DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def _partials_kernel(table, partial_num, partial_den, n_chunks, n_tensors, DTYPE: tl.constexpr, ACC: tl.constexpr,
                     TENSORS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    w = tl.program_id(0)
    b, i, begin, row = _locate(table, w, n_chunks, n_tensors, TENSORS, CHUNK)
    offset = b.to(tl.int64) * row
    student = _address(table, 2 * n_tensors + i, DTYPE) + offset
    start = _address(table, 3 * n_tensors + i, DTYPE) + offset
    target = _address(table, 4 * n_tensors + i, DTYPE) + offset
    num = tl.zeros((BLOCK,), dtype=ACC)
    den = tl.zeros((BLOCK,), dtype=ACC)
    for j in range(0, CHUNK, BLOCK):
        cols = begin + j + tl.arange(0, BLOCK)
        mask = cols < row
        t = tl.load(target + cols, mask=mask, other=0.0).to(ACC)
        d = tl.load(student + cols, mask=mask, other=0.0).to(ACC) - t
        e = tl.load(start + cols, mask=mask, other=0.0).to(ACC) - t
        num += d * d
        den += e * e
    tl.store(partial_num + w, tl.sum(num, axis=0))
    tl.store(partial_den + w, tl.sum(den, axis=0))


@triton.jit
def _finish_kernel(partial_num, partial_den, num, den, n_chunks, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    base = b.to(tl.int64) * n_chunks
    num_b = tl.zeros((BLOCK,), dtype=tl.float64)
    den_b = tl.zeros((BLOCK,), dtype=tl.float64)
    for k in range(0, n_chunks, BLOCK):
        index = k + tl.arange(0, BLOCK)
        mask = index < n_chunks
        num_b += tl.load(partial_num + base + index, mask=mask, other=0.0).to(tl.float64)
        den_b += tl.load(partial_den + base + index, mask=mask, other=0.0).to(tl.float64)
    total_num = tl.sum(num_b, axis=0)
    total_den = tl.sum(den_b, axis=0)
    tl.store(num + b, total_num.to(num.dtype.element_ty))
    tl.store(den + b, total_den.to(den.dtype.element_ty))


@triton.jit
def _gradients_kernel(table, grad, loss, den, n_chunks, n_tensors, DTYPE: tl.constexpr, ACC: tl.constexpr,
                      TENSORS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ROUND_BY_HAND: tl.constexpr):
    w = tl.program_id(0)
    b, i, begin, row = _locate(table, w, n_chunks, n_tensors, TENSORS, CHUNK)
    offset = b.to(tl.int64) * row
    a = 2 * tl.load(grad + b).to(ACC) / tl.load(den + b).to(ACC)
    c = a * tl.load(loss + b).to(ACC)
    student = _address(table, 2 * n_tensors + i, DTYPE) + offset
    start = _address(table, 3 * n_tensors + i, DTYPE) + offset
    target = _address(table, 4 * n_tensors + i, DTYPE) + offset
    # a gradient that is not wanted has address 0: its stores (and loads only it needs) get an empty range
    student_end = tl.where(tl.load(table + 5 * n_tensors + i) != 0, row, 0)
    start_end = tl.where(tl.load(table + 6 * n_tensors + i) != 0, row, 0)
    target_end = tl.where(tl.load(table + 7 * n_tensors + i) != 0, row, 0)
    d_student = _address(table, 5 * n_tensors + i, DTYPE) + offset
    d_start = _address(table, 6 * n_tensors + i, DTYPE) + offset
    d_target = _address(table, 7 * n_tensors + i, DTYPE) + offset
    for j in range(0, CHUNK, BLOCK):
        cols = begin + j + tl.arange(0, BLOCK)
        t = tl.load(target + cols, mask=cols < row, other=0.0).to(ACC)
        ds = a * (tl.load(student + cols, mask=cols < tl.maximum(student_end, target_end), other=0.0).to(ACC) - t)
        dst = c * (t - tl.load(start + cols, mask=cols < tl.maximum(start_end, target_end), other=0.0).to(ACC))
        tl.store(d_student + cols, _to_output(ds, DTYPE, ROUND_BY_HAND), mask=cols < student_end)
        tl.store(d_start + cols, _to_output(dst, DTYPE, ROUND_BY_HAND), mask=cols < start_end)
        tl.store(d_target + cols, _to_output(-(ds + dst), DTYPE, ROUND_BY_HAND), mask=cols < target_end)


def forward(student: list[torch.Tensor], start: list[torch.Tensor], target: list[torch.Tensor],
            trajectories: int) -> tuple[torch.Tensor, torch.Tensor]:
    table, n_chunks = _table(trajectories, student, start, target)
    acc = accumulation_dtype(student[0].dtype)
    partial_num = torch.empty(trajectories * n_chunks, dtype=acc, device=student[0].device)
    partial_den = torch.empty_like(partial_num)
    _partials_kernel[(trajectories * n_chunks,)](
        table, partial_num, partial_den, n_chunks, len(student), DTYPE=_TRITON_DTYPES[student[0].dtype],
        ACC=_TRITON_DTYPES[acc], TENSORS=_tensors_block(student), CHUNK=CHUNK, BLOCK=BLOCK, **LAUNCH)
    num = torch.empty(trajectories, dtype=acc, device=student[0].device)
    den = torch.empty_like(num)
    _finish_kernel[(trajectories,)](partial_num, partial_den, num, den, n_chunks, BLOCK=FINISH_BLOCK, **LAUNCH)
    return num, den


def backward(grad: torch.Tensor, loss: torch.Tensor, den: torch.Tensor, student: list[torch.Tensor], start: list[torch.Tensor],
             target: list[torch.Tensor], needs: list[bool]) -> list[torch.Tensor]:
    grads = [torch.empty_like(x) if need else None for x, need in zip(student + start + target, needs)]
    trajectories = grad.shape[0]
    table, n_chunks = _table(trajectories, student, start, target, grads)
    _gradients_kernel[(trajectories * n_chunks,)](
        table, grad, loss, den, n_chunks, len(student), DTYPE=_TRITON_DTYPES[student[0].dtype],
        ACC=_TRITON_DTYPES[accumulation_dtype(student[0].dtype)], TENSORS=_tensors_block(student), CHUNK=CHUNK, BLOCK=BLOCK,
        ROUND_BY_HAND=triton_interpreted(), **LAUNCH)
    return [g for g in grads if g is not None]


def _table(trajectories, student, start, target, grads=None) -> tuple[torch.Tensor, int]:
    """The address table described in the module docstring, and the number of chunks per row."""
    rows = [x.numel() // trajectories for x in student]
    ends, total = [], 0
    for row in rows:
        total += triton.cdiv(row, CHUNK)
        ends.append(total)
    addresses = [x.data_ptr() for x in student + start + target]
    if grads is not None:
        addresses += [0 if g is None else g.data_ptr() for g in grads]
    table = torch.tensor(ends + rows + addresses, dtype=torch.int64).to(student[0].device, non_blocking=True)
    return table, total


def _tensors_block(student: list[torch.Tensor]) -> int:
    return max(16, triton.next_power_of_2(len(student)))
