"""ddfast.ops._reduction against torch's own reductions and their autograd."""

import pytest
import torch

from ddfast.ops import _reduction


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("count", [None, 3, 0], ids=["all", "some", "none-counted"])
def test_reduce_and_its_row_gradients_match_autograd(reduction, count):
    rows = torch.tensor([0.5, -2.0, 3.0, 1.25, 4.0], dtype=torch.float64, requires_grad=True)
    counted = None if count is None else torch.tensor(count)
    loss = _reduction.reduce(rows, reduction, counted)
    denominator = rows.shape[0] if count is None else max(count, 1)
    expected = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / denominator}[reduction]
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    upstream = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    (expected_grad,) = torch.autograd.grad(loss, rows, upstream)
    grads = _reduction.row_grads(upstream, reduction, rows.shape[0], counted)
    torch.testing.assert_close(grads, expected_grad, rtol=0, atol=1e-15)
    assert grads.is_contiguous() and grads.shape == rows.shape
