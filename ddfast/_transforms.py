"""Function transforms and higher-order gradients the fused operators refuse, with a clear error.

The fused operators are ``torch.library`` custom ops with a first-order backward formula. That
serves ``loss.backward()``, ``torch.autograd.grad``, ``torch.compile`` and ``torch.func.vmap``
(each op's operators run once per batch entry, through torch's fallback or a vmap rule of their
own). It does not serve forward-mode AD (``torch.func.jvp``, ``jacfwd``,
``torch.autograd.forward_ad``), whose tangents would silently come out as zero,
``torch.func.grad`` / ``vjp`` / ``jacrev``, or differentiating a gradient (double backward). Those
raise here, naming the operation; ``backend="reference"`` (plain torch) supports them all.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.autograd.forward_ad as forward_ad
from torch._C._functorch import TransformType

_UNSUPPORTED = {
    TransformType.Grad: "torch.func.grad / vjp / jacrev",
    TransformType.Jvp: "forward-mode AD (torch.func.jvp / jacfwd)",
}
_ADVICE = "use loss.backward() or torch.autograd.grad, or backend='reference' (plain torch), which supports every transform"


def _flat(tensors: Iterable) -> Iterable[torch.Tensor]:
    for t in tensors:
        if isinstance(t, (list, tuple)):
            yield from _flat(t)
        elif isinstance(t, torch.Tensor):
            yield t


def refuse_unsupported(op: str, *tensors) -> None:
    """Raise ``NotImplementedError`` naming ``op`` under a transform its fused operators cannot follow.

    ``tensors`` (tensors, or lists of them) are the op's differentiable inputs: a forward-mode dual
    among them is refused. Skipped while ``torch.compile`` traces (no transform is active there).
    """
    if torch.compiler.is_compiling():
        return
    for interpreter in torch._C._functorch.get_interpreter_stack() or ():
        what = _UNSUPPORTED.get(interpreter.key())
        if what is not None:
            raise NotImplementedError(f"{op} does not support {what} with its fused backends: {_ADVICE}")
    if forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in _flat(tensors)):
        raise NotImplementedError(f"{op} does not support forward-mode AD (torch.autograd.forward_ad) with its fused "
                                  f"backends: {_ADVICE}")


def refuse_double_backward(op: str, backward_op) -> None:
    """Make differentiating ``backward_op`` (a custom op computing ``op``'s gradients) raise clearly."""

    def _second_order(ctx, *grads):
        raise NotImplementedError(f"{op} does not support double backward (differentiating its gradient, e.g. "
                                  f"torch.autograd.grad(..., create_graph=True) then backward) with its fused "
                                  f"backends: use backend='reference' (plain torch)")

    backward_op.register_autograd(_second_order, setup_context=lambda ctx, inputs, output: None)
