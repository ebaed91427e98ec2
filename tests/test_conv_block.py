"""The first-block kernel equals the layers it fuses (conv, instance norm, ReLU, average pool): forward and every input's
gradient in float64 on odd shapes and paddings, float32 to rounding; where fusable's copies use it; what it refuses."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddfast.distill.training import conv_block as block_kernel
from ddfast.distill.training.conv_block import conv_block
from ddfast.distill.training.fusable import PooledConvBlock, fusable
from ddfast.distill.training.models import ConvNet

pytestmark = pytest.mark.skipif(not block_kernel.available(), reason="the first-block kernel cannot be built here (no C++ compiler)")


def layers(x, weight, bias, gamma, beta, padding, k, eps=1e-5):
    y = F.conv2d(x, weight, bias, padding=padding)
    return F.avg_pool2d(torch.relu(F.group_norm(y, weight.shape[0], gamma, beta, eps)), k)


def values(run, tensors, seed=1):
    tensors = [t.detach().requires_grad_(True) if t is not None else None for t in tensors]
    out = run(*tensors)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.dtype)
    inputs = [t for t in tensors if t is not None]
    return [out, *torch.autograd.grad((out * weights).sum(), inputs)]


@pytest.mark.parametrize("n, c, o, size, kernel, padding, k, absent", [
    (3, 1, 20, (28, 28), 3, (3, 3), 2, ()), (2, 3, 19, (9, 7), 3, (1, 2), 3, ()), (2, 2, 5, (8, 8), 1, (0, 0), 4, ()),
    (2, 1, 17, (6, 10), 3, (1, 1), 2, ("bias",)), (1, 3, 8, (4, 4), 3, (1, 1), 2, ("gamma", "beta"))],
    ids=["mnist-first", "rgb-uneven-padding-pool-3", "1x1-pool-4", "no-bias", "not-affine"])
def test_conv_block_equals_the_layers_float64(n, c, o, size, kernel, padding, k, absent):
    torch.manual_seed(0)
    tensors = {"x": torch.randn(n, c, *size, dtype=torch.float64), "weight": torch.randn(o, c, kernel, kernel, dtype=torch.float64),
               **{name: torch.randn(o, dtype=torch.float64) for name in ("bias", "gamma", "beta")}}
    tensors.update({name: None for name in absent})
    tensors = list(tensors.values())
    got = values(lambda *t: conv_block(*t, padding, k, 1e-5), tensors)
    expected = values(lambda *t: layers(*t, padding, k), tensors)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        # the conv bias's gradient is zero in exact arithmetic (the norm removes each channel's mean): compare absolutely
        atol = 1e-12 if i == 3 and "bias" not in absent else 1e-13
        torch.testing.assert_close(g, e, rtol=1e-11, atol=atol)


def test_conv_block_float32_stays_within_rounding():
    torch.manual_seed(0)
    tensors = [torch.randn(8, 1, 28, 28), torch.randn(32, 1, 3, 3), torch.randn(32), torch.rand(32) + 0.5, torch.randn(32)]
    got = values(lambda *t: conv_block(*t, (3, 3), 2, 1e-5), tensors)
    expected = values(lambda *t: layers(*t, (3, 3), 2), [t.double() for t in tensors])
    scale = [e.abs().max() for e in expected]
    scale[3] = scale[2]  # the conv bias's gradient is zero in exact arithmetic: its rounding against the weight's gradient
    for g, e, s in zip(got, expected, scale, strict=True):
        assert (g.double() - e).abs().max() / s < 1e-5


def test_the_gradient_of_conv_block_is_not_differentiated_silently():
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    out = conv_block(x, weight, None, None, None, (1, 1), 2, 1e-5)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), weight, create_graph=True)
    with pytest.raises(RuntimeError, match="cannot be differentiated again"):
        torch.autograd.grad(grad.sum(), x)


@pytest.mark.parametrize("x, weight, message", [
    (torch.zeros(2, 1, 8, 8, dtype=torch.float64), torch.zeros(4, 1, 3, 3), "both be float32 or float64"),
    (torch.zeros(2, 1, 7, 8), torch.zeros(4, 1, 3, 3), "divisible by the pool"),
    (torch.zeros(2, 2, 8, 8), torch.zeros(4, 1, 3, 3), r"x \(N, C, H, W\) and weight")], ids=["mixed-dtypes", "odd-output", "channels"])
def test_conv_block_names_bad_input(x, weight, message):
    with pytest.raises(RuntimeError, match=message):
        conv_block(x, weight, None, None, None, (1, 1), 2, 1e-5)


def test_compiled_copies_use_the_kernel_for_inputs_without_gradient(monkeypatch):
    """fusable(cpu_kernels=True) blocks: the kernel where the input needs no gradient (with or without the parameters'),
    the phase form where it does; the values are the network's (float64)."""
    calls = []
    forward = block_kernel.conv_block_forward
    monkeypatch.setattr("ddfast.distill.training.fusable.conv_block",
                        lambda *args: calls.append(args[0].requires_grad) or block_kernel.conv_block(*args))
    torch.manual_seed(0)
    net = ConvNet(1, 10, 28, width=16).double()
    copy = fusable(ConvNet(1, 10, 28, width=16).double(), cpu_kernels=True)
    copy.load_state_dict(net.state_dict())
    assert isinstance(copy.features[0], PooledConvBlock) and copy.features[0].kernel and forward is block_kernel.conv_block_forward
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    for requires_grad in (False, True):
        x_ = x.clone().requires_grad_(requires_grad)
        got, expected = copy(x_), net(x_)
        inputs = [x_, *net.parameters()] if requires_grad else list(net.parameters())
        copies = [x_, *copy.parameters()] if requires_grad else list(copy.parameters())
        for g, e in zip(torch.autograd.grad(got.sum(), copies), torch.autograd.grad(expected.sum(), inputs), strict=True):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(copy(x), net(x), rtol=1e-12, atol=1e-13)
    assert calls == [False, False]  # the parameters' gradients and the forward without gradients; not with the input's
    assert not fusable(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(4, 4), nn.ReLU(), nn.AvgPool2d(2)),
                       cpu_kernels=True, func_transforms=True)[0].kernel
