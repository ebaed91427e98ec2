"""What the operation tests share: which backends to run, and how results are compared.

Every backend of an operation is a test parameter; one that cannot run on this machine (no GPU, no
compiler, no float64) is skipped with the reason, never dropped.
"""

from __future__ import annotations

import pytest
import torch

# without a GPU, Triton runs interpreted on CPU tensors (tests/conftest.py)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backends(registry, dtype: torch.dtype = torch.float64, *, device: str = DEVICE, reference: bool = False) -> list:
    """``pytest.param`` of each backend of ``registry`` (``reference`` too when asked), skipped where it cannot run."""
    params = []
    for name in registry.names():
        if name == "reference" and not reference:
            continue
        problem = registry.problem(name, torch.device(device), dtype)
        marks = [pytest.mark.skip(reason=f"backend {name!r} cannot run {dtype} on {device}: {problem}")] if problem else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float, atol: float, atol_relative: bool = True,
                 what: str = "") -> None:
    """Elementwise agreement; ``atol`` is relative to ``expected``'s largest magnitude (at least 1) unless
    ``atol_relative=False``."""
    scale = max(1.0, expected.detach().abs().max().item()) if expected.numel() and atol_relative else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def assert_all_close(actual, expected, *, rtol: float, atol: float, names=None, what: str = "") -> None:
    """``assert_close`` over paired sequences (a loss and its gradients), with ``names`` in the message."""
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected), f"{what}: {len(actual)} results against {len(expected)} expected"
    names = names or [f"output {i}" for i in range(len(expected))]
    for name, a, b in zip(names, actual, expected):
        assert_close(a, b, rtol=rtol, atol=atol, what=f"{what} {name}".strip())


def assert_fits_hopper(specs: list[dict]) -> None:
    """Each spec's kernel (``benchmarks.hopper``) compiles for sm_90, fits a block's shared memory and
    spills no registers."""
    from benchmarks import hopper

    found = hopper.resources(specs)
    for spec, r in zip(specs, found):
        assert 0 <= r["shared"] <= hopper.SHARED_MEMORY_PER_BLOCK, (hopper.label(spec), r)
        assert r["regs"] > 0, (hopper.label(spec), r)
    spilled = hopper.spilled(specs, found)
    assert not spilled, f"spills on sm_90 (store, load bytes): {spilled}"
