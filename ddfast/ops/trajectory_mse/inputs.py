"""The argument forms of ``trajectory_mse``, checked against each other and seen as rows.

``batched=True`` (the default):
- a tensor is ``(B, P)``: B trajectories of P parameters each, or ``(P,)``: one trajectory;
- a list (or tuple) holds per-parameter tensors of shape ``(B, *param_shape)``, the leading
  dimension shared: a ``(B, P)`` tensor split into parameters (e.g. stacked ``functional_call``
  parameters of B students).

``batched=False``: each argument is one trajectory (B = 1): a tensor of any shape (a flattened
parameter vector) or a list of tensors of any shapes (``list(model.parameters())``, the values of
``functional_call``'s dict).

``student``, ``start`` and ``target`` must have the same form, dtype and device, and match tensor by
tensor in shape. Every kernel sees them as three lists of ``(B, n_i)`` views, one per parameter,
contiguous (a non-contiguous input is copied; contiguous ones never are).
"""

from __future__ import annotations

import torch

from ddfast import _checks

NAMES = ("student", "start", "target")


def as_rows(student, start, target, *, batched: bool = True) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Check the three arguments and return them as lists of contiguous ``(B, n_i)`` tensors."""
    if not isinstance(batched, bool):
        raise TypeError(f"batched must be True or False, got {type(batched).__name__}")
    args = dict(zip(NAMES, (student, start, target)))
    lists = {name: _as_list(name, value) for name, value in args.items()}
    is_list = {name: isinstance(value, (list, tuple)) for name, value in args.items()}
    if len(set(is_list.values())) > 1:
        forms = ", ".join(f"{name}: {'list' if flag else 'tensor'}" for name, flag in is_list.items())
        raise TypeError(f"student, start and target must all be tensors or all be lists of tensors, got {forms}")
    counts = [len(tensors) for tensors in lists.values()]
    if len(set(counts)) > 1:
        raise ValueError(f"student, start and target must hold the same number of tensors, got {counts[0]}, {counts[1]} and {counts[2]}")

    first = lists["student"][0]
    for name, tensors in lists.items():
        for index, (x, reference) in enumerate(zip(tensors, lists["student"])):
            label = f"{name}[{index}]" if is_list[name] else name
            _checks.tensor(label, x)
            if x.dtype != first.dtype:
                raise TypeError(f"{label} has dtype {x.dtype} but {_label('student', 0, is_list)} has {first.dtype}: all tensors must share one dtype")
            if x.device != first.device:
                raise ValueError(f"{label} is on {x.device} but {_label('student', 0, is_list)} is on {first.device}: all tensors must be on one device")
            if x.shape != reference.shape:
                raise ValueError(f"{label} has shape {tuple(x.shape)} but {_label('student', index, is_list)} has {tuple(reference.shape)}: student, start and target must match tensor by tensor")

    trajectories = _trajectories(lists["student"], is_list["student"], batched)
    if trajectories == 0:
        raise ValueError("student has no trajectories (B = 0)")
    if sum(x.numel() for x in lists["student"]) == 0:
        raise ValueError("student, start and target have no elements: there is nothing to compare")
    return tuple([_row(x, trajectories) for x in tensors] for tensors in lists.values())


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every kernel sums in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_list(name: str, value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"{name} is an empty list: it must hold at least one tensor")
        return list(value)
    raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(value).__name__}")


def _trajectories(student: list[torch.Tensor], is_list: bool, batched: bool) -> int:
    """B, the number of trajectories, from the student's shapes."""
    if not batched:
        return 1
    if not is_list:
        x = student[0]
        if x.dim() not in (1, 2):
            raise ValueError(f"student must have shape (B, P) or (P,) with batched=True, got {tuple(x.shape)} (pass batched=False for one trajectory of any shape)")
        return x.shape[0] if x.dim() == 2 else 1
    for index, x in enumerate(student):
        if x.dim() == 0:
            raise ValueError(f"student[{index}] is a 0-dimensional tensor, but with batched=True every tensor is (B, ...) (pass batched=False for one trajectory's parameters)")
        if x.shape[0] != student[0].shape[0]:
            raise ValueError(f"student[{index}] has leading dimension {x.shape[0]} but student[0] has {student[0].shape[0]}: with batched=True every tensor is (B, ...) for the same B (pass batched=False for one trajectory's parameters)")
    return student[0].shape[0]


def _row(x: torch.Tensor, trajectories: int) -> torch.Tensor:
    return x.reshape(trajectories, -1).contiguous()


def _label(name: str, index: int, is_list: dict[str, bool]) -> str:
    return f"{name}[{index}]" if is_list[name] else name
