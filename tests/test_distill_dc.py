import pytest
import torch
import torch.nn.functional as F
from loops_support import one_thread  # noqa: F401  (autouse)

from ddfast.distill import preset
from ddfast.distill.dc import GradientMatchingOptions, gradient_distance, matching_loss
from ddfast.distill.training.models import ConvNet


def test_gradient_distance_is_one_minus_cosine_per_output_row():
    torch.manual_seed(0)
    conv_s, conv_r = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
    lin_s, lin_r = torch.randn(5, 7), torch.randn(5, 7)
    bias_s, bias_r = torch.randn(4), torch.randn(4)
    got = gradient_distance([conv_s, bias_s, lin_s], [conv_r, bias_r, lin_r])
    expected = sum(
        (1 - F.cosine_similarity(a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double(), dim=1, eps=0)).sum()
        for a, b in ((conv_s, conv_r), (lin_s, lin_r))
    )
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # 1-D parameters are ignored, opposite gradients cost 2 per row
    assert gradient_distance([bias_s], [bias_r]).item() == 0
    assert gradient_distance([lin_s], [-lin_s]).item() == pytest.approx(2 * 5, rel=1e-5)


def test_matching_loss_vanishes_when_synthetic_equals_real_and_is_differentiable():
    torch.manual_seed(0)
    net = ConvNet(1, 3, 28, width=8, depth=2)
    real = [torch.randn(4, 1, 28, 28) for _ in range(3)]
    same = matching_loss(net, real, [r.clone() for r in real])
    assert same.abs().item() < 1e-2  # only the eps in the cosine and rounding remain
    syn = [torch.randn(2, 1, 28, 28, requires_grad=True) for _ in range(3)]
    loss = matching_loss(net, real, syn)
    assert loss.item() > 1.0
    grads = torch.autograd.grad(loss, syn)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in net.parameters())


def test_upstream_loops_per_ipc():
    assert preset("dc", "mnist", 1).options == GradientMatchingOptions(outer_loop=1, inner_loop=1)
    assert preset("dc", "mnist", 10).options == GradientMatchingOptions(outer_loop=10, inner_loop=50)
    config = preset("dsa", "cifar10", 50)
    assert config.options == GradientMatchingOptions(outer_loop=50, inner_loop=10)
    assert (config.iterations, config.image_lr, config.image_momentum, config.real_per_class, config.dsa) == (1000, 0.1, 0.5, 256, True)
    assert preset("dc", "mnist", 10).dsa is False
    with pytest.raises(ValueError, match="ipc in \\[1, 10, 50\\]"):
        preset("dc", "mnist", 3)
    with pytest.raises(ValueError, match="outer_loop"):
        GradientMatchingOptions(outer_loop=0)
