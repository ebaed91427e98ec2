"""The collectives the sharded operations use, and a counter of the bytes they move.

Every collective of ``ddfast`` goes through this module, so that :class:`count_bytes` sees each one.
Bytes are the sizes of the tensors handed to the collectives on one rank: an all-reduce counts its
tensor, an all-gather its gathered output (what the rank receives, its own part included).

A sharded call can fail on one rank only (a non-finite input, a bad label): the local work runs
before a collective that carries one extra element, a failure flag, so that every rank raises
instead of waiting for a peer that left (:func:`all_reduce` with ``guard=``). The metadata every
rank must share is compared once per call (:func:`agree`), so that every rank raises the same error.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

_COUNTERS: list[list[int]] = []


@contextmanager
def count_bytes():
    """``with count_bytes() as moved: ...``; ``moved[0]``: the bytes this rank's collectives moved inside."""
    moved = [0]
    _COUNTERS.append(moved)
    try:
        yield moved
    finally:
        _COUNTERS.remove(moved)


def _count(tensor: torch.Tensor) -> None:
    for moved in _COUNTERS:
        moved[0] += tensor.numel() * tensor.element_size()


def world(group) -> tuple[int, int]:
    """(rank, size) of this process in ``group`` (a ``torch.distributed`` process group, or
    ``torch.distributed.group.WORLD``); ``ValueError`` naming ``group`` when it cannot be used."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group= needs torch.distributed initialised (torch.distributed.init_process_group) in every process")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("group= must be a process group that this process belongs to")
    return rank, dist.get_world_size(group)


class RankFailed(RuntimeError):
    """Another rank of the group raised during a sharded call; its own error says why."""


def _raise_if_failed(failed: bool, failure: BaseException | None, op: str) -> None:
    if failure is not None:
        raise failure
    if failed:
        raise RankFailed(f"{op}: another rank of the process group raised; its error says why")


def all_reduce(tensor: torch.Tensor, how: str, group, *, guard: str | None = None,
               failure: BaseException | None = None) -> torch.Tensor:
    """``tensor`` reduced over ``group`` by ``how`` (``"sum"`` or ``"max"``), as a new tensor.

    With ``guard`` (the operation's name) the collective also carries a failure flag: ``failure`` is
    this rank's exception from the local work before it (``None``: it succeeded; a failing rank passes
    a placeholder ``tensor`` of the same shape); where any rank failed, a failing rank re-raises its
    own exception and the others raise :class:`RankFailed`.
    """
    flat = tensor.reshape(-1)
    flat = torch.cat([flat, flat.new_full((1,), float(failure is not None))]) if guard else flat.clone()
    _count(flat)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX if how == "max" else dist.ReduceOp.SUM, group=group)
    if guard:
        _raise_if_failed(float(flat[-1]) > 0, failure, guard)
        flat = flat[:-1]
    return flat.view(tensor.shape)


def all_gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """The concatenation over ranks of each rank's ``x`` (its ``sizes[rank]`` rows), in rank order."""
    largest = max(sizes)
    padded = x.new_zeros((largest, *x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    for part in parts:
        _count(part)
    return torch.cat([part[:rows] for part, rows in zip(parts, sizes)])


def agree(group, op: str, fields: dict[str, int], same: tuple[str, ...], failure: BaseException | None = None,
          like=None) -> dict[str, list[int]]:
    """Every rank's ``fields`` (integers), gathered: ``{name: [value on rank 0, rank 1, ...]}``.

    ``failure``: this rank's exception from checking its arguments (``None``: they passed; its
    ``fields`` are then ignored), raised here on this rank and as :class:`RankFailed` on the others.
    ``like``: an input tensor, whose device the collective uses (NCCL needs CUDA tensors).
    The fields named in ``same`` must be equal on every rank; every rank raises the same
    ``ValueError`` naming the field (and ``op``) where they are not.
    """
    _, size = world(group)
    values = [0] * len(fields) if failure is not None else list(fields.values())
    mine = torch.tensor([int(failure is not None), *values], dtype=torch.int64, device=_device(group, like))
    parts = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(parts, mine, group=group)
    for part in parts:
        _count(part)
    _raise_if_failed(any(int(part[0]) for part in parts), failure, op)
    table = {name: [int(part[i + 1]) for part in parts] for i, name in enumerate(fields)}
    for name in same:
        if len(set(table[name])) > 1:
            raise ValueError(f"{op} with group=: {name} must be the same on every rank, got {table[name]} (rank by rank)")
    return table


def _device(group, like) -> torch.device:
    """``like``'s device, or where a rank whose arguments are not tensors sends: CUDA under NCCL."""
    if isinstance(like, torch.Tensor):
        return like.device
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


def offsets(sizes: list[int]) -> list[int]:
    """Where each rank's rows start in the concatenation."""
    starts = [0]
    for rows in sizes[:-1]:
        starts.append(starts[-1] + rows)
    return starts
