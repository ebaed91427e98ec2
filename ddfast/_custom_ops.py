"""``custom_op``: the fused operators as ``torch.library`` operators whose first eager call stays cheap.

``torch.library.custom_op`` wraps each kernel in ``torch._disable_dynamo``, which imports
``torch._dynamo`` (one to two seconds on a CPU) the first time any operator runs, compiled or not.
Operators defined here through ``torch.library.Library`` keep what ``torch.compile`` needs (a schema,
a fake implementation, an autograd formula, optionally a vmap rule) and disable dynamo inside the
kernel only once dynamo is imported: before that, no ``torch.compile`` can be running.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch

_LIBRARY = torch.library.Library("ddfast", "FRAGMENT")


def _outside_dynamo(kernel: Callable) -> Callable:
    """``kernel``, never traced by dynamo; ``torch._dynamo`` is not imported for it."""
    disabled = []

    @functools.wraps(kernel)
    def run(*args, **kwargs):
        if "torch._dynamo" not in sys.modules:
            return kernel(*args, **kwargs)
        if not disabled:
            disabled.append(torch.compiler.disable(kernel, recursive=True))
        return disabled[0](*args, **kwargs)

    return run


class Operator:
    """``ddfast::<name>`` with ``kernel`` (its annotations give the schema) as its implementation on every device."""

    def __init__(self, qualname: str, kernel: Callable):
        namespace, self.name = qualname.split("::")
        if namespace != "ddfast":
            raise ValueError(f"operators live in the ddfast namespace, got {qualname!r}")
        self.qualname = qualname
        _LIBRARY.define(self.name + torch.library.infer_schema(kernel, mutates_args=()))
        _LIBRARY.impl(self.name, _outside_dynamo(kernel), "CompositeExplicitAutograd")
        functools.update_wrapper(self, kernel)

    def __call__(self, *args, **kwargs):
        return getattr(torch.ops.ddfast, self.name)(*args, **kwargs)

    def register_fake(self, fake: Callable) -> Callable:
        torch.library.register_fake(self.qualname, fake, lib=_LIBRARY)
        return fake

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context, lib=_LIBRARY)

    def register_vmap(self, rule: Callable) -> Callable:
        torch.library.register_vmap(self.qualname, rule, lib=_LIBRARY)
        return rule


def custom_op(qualname: str) -> Callable[[Callable], Operator]:
    """Decorator: ``@custom_op("ddfast::<name>")`` over a kernel that mutates none of its inputs."""
    return lambda kernel: Operator(qualname, kernel)
