"""The argument forms of ``trajectory_mse``, checked against each other.

``batched=None`` (the default): a tensor is ``(B, P)``, B trajectories of P parameters each, or
``(P,)``, one trajectory; a list (or tuple) holds the per-parameter tensors of one trajectory, of
any shapes (``list(model.parameters())``, the values of ``functional_call``'s dict).

``batched=True``: as above for tensors, but a list holds per-parameter tensors of shape
``(B, *param_shape)``, the leading dimension shared: a ``(B, P)`` tensor split into parameters
(e.g. the stacked parameters of B students).

``batched=False``: each argument is one trajectory (B = 1), a tensor or list of any shapes.

``student``, ``start`` and ``target`` must have the same form, dtype and device, and match tensor by
tensor in shape. The kernels get three lists of contiguous tensors (a non-contiguous one is copied, and
inside the operators one whose address is not a multiple of its element size; no other is) and B;
they see tensor i as a ``(B, n_i)`` matrix, ``n_i = numel / B``.
"""

from __future__ import annotations

import torch

from ... import _checks

NAMES = ("student", "start", "target")


def as_lists(student, start, target, *, batched: bool | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], int]:
    """Check the three arguments; return them as lists of contiguous tensors, and B."""
    if batched is not None and not isinstance(batched, bool):
        raise TypeError(f"batched must be None, True or False, got {type(batched).__name__}")
    forms = {name: isinstance(value, (list, tuple)) for name, value in zip(NAMES, (student, start, target))}
    lists = [_as_list(name, value) for name, value in zip(NAMES, (student, start, target))]
    if len(set(forms.values())) > 1:
        listed = ", ".join(f"{name}: {'list' if is_list else 'tensor'}" for name, is_list in forms.items())
        raise TypeError(f"student, start and target must all be tensors or all be lists of tensors, got {listed}")
    is_list = forms["student"]
    if len({len(tensors) for tensors in lists}) > 1:
        raise ValueError(f"student, start and target must hold the same number of tensors, got {', '.join(str(len(t)) for t in lists)}")
    for name, tensors in zip(NAMES, lists):
        _check_like(name, tensors, lists[0], is_list)
    trajectories = _trajectories(lists[0], is_list, batched)
    if sum(x.numel() for x in lists[0]) == 0:
        raise ValueError("student, start and target have no elements: there is nothing to compare")
    return (*([x if x.is_contiguous() else x.contiguous() for x in tensors] for tensors in lists), trajectories)


def _as_list(name: str, value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            raise ValueError(f"{name} is an empty list: it must hold at least one tensor")
        return list(value)
    raise TypeError(f"{name} must be a tensor or a list of tensors, got {type(value).__name__}")


def _check_like(name: str, tensors: list, student: list, is_list: bool) -> None:
    """Every tensor is a floating tensor with student[0]'s dtype and device and student[i]'s shape."""
    def label(which: str, index: int) -> str:
        return f"{which}[{index}]" if is_list else which

    first = student[0]
    for index, (x, like) in enumerate(zip(tensors, student)):
        if not isinstance(x, torch.Tensor) or x.dtype not in _checks.FLOAT_DTYPES:
            _checks.tensor(label(name, index), x)
        if x.dtype != first.dtype:
            raise TypeError(f"{label(name, index)} has dtype {x.dtype} but {label('student', 0)} has {first.dtype}: all tensors must share one dtype")
        if x.device != first.device:
            raise ValueError(f"{label(name, index)} is on {x.device} but {label('student', 0)} is on {first.device}: "
                             "all tensors must be on one device")
        if x.shape != like.shape:
            raise ValueError(f"{label(name, index)} has shape {tuple(x.shape)} but {label('student', index)} has {tuple(like.shape)}: "
                             "student, start and target must match tensor by tensor")


def _trajectories(student: list[torch.Tensor], is_list: bool, batched: bool | None) -> int:
    """B, the number of trajectories, from the student's shapes."""
    if batched is False or (batched is None and is_list):
        return 1
    if not is_list:
        x = student[0]
        if x.dim() not in (1, 2):
            raise ValueError(f"student must have shape (B, P) or (P,), got {tuple(x.shape)} (pass batched=False for one trajectory of any shape)")
        trajectories = x.shape[0] if x.dim() == 2 else 1
    else:
        for index, x in enumerate(student):
            if x.dim() == 0:
                raise ValueError(f"student[{index}] is a 0-dimensional tensor, but with batched=True every tensor is (B, ...) "
                                 "(pass batched=False for one trajectory's parameters)")
            if x.shape[0] != student[0].shape[0]:
                raise ValueError(f"student[{index}] has leading dimension {x.shape[0]} but student[0] has {student[0].shape[0]}: with batched=True "
                                 "every tensor is (B, ...) for the same B (pass batched=False for one trajectory's parameters)")
        trajectories = student[0].shape[0]
    if trajectories == 0:
        raise ValueError("student has no trajectories (B = 0)")
    return trajectories


def rows(tensors: list[torch.Tensor], trajectories: int) -> list[torch.Tensor]:
    """The ``(B, n_i)`` views the kernels work on."""
    return [x.view(trajectories, -1) for x in tensors]


def element_aligned(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors``, each one whose address is not a multiple of its element size (a buffer read from an
    odd byte offset) copied: the kernels read every tensor as an array of its dtype."""
    return [x if x.data_ptr() % x.element_size() == 0 else x.clone() for x in tensors]
