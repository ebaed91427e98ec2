"""Winograd F(4x4, 3x3) convolutions equal ``F.conv2d``: forward and every input's gradient, first and second order, in
float64 on shapes that are not multiples of the tile; float32 to the transforms' rounding; compiled copies of a ConvNet."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddfast.distill.training import winograd
from ddfast.distill.training.fusable import fusable
from ddfast.distill.training.models import ConvNet
from ddfast.distill.training.winograd import WinogradConv, winograd_conv2d

pytestmark = pytest.mark.skipif(not winograd.available(), reason="the Winograd transform kernels cannot be built here (no C++ compiler)")


def values(conv, x, weight, bias):
    """The output, its gradients (random output weights) and a second-order gradient, all in the inputs' dtype."""
    x, weight = x.detach().requires_grad_(True), weight.detach().requires_grad_(True)
    bias = None if bias is None else bias.detach().requires_grad_(True)
    y = conv(x, weight, bias)
    seed = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    inputs = [t for t in (x, weight, bias) if t is not None]
    grads = torch.autograd.grad((y * seed).sum(), inputs, create_graph=True)
    second = torch.autograd.grad(sum(g.pow(2).sum() for g in grads), [x, weight])
    return [y, *grads, *second]


@pytest.mark.parametrize("n, c, o, h, w, padding, bias", [(2, 5, 7, 9, 11, 1, True), (3, 4, 6, 16, 16, 1, False), (1, 3, 2, 5, 6, 2, True),
                                                        (2, 3, 4, 4, 4, 0, True), (1, 2, 3, 3, 3, 1, True)],
                         ids=["odd-maps", "whole-tiles", "padding-2", "unpadded-one-tile", "map-below-a-tile"])
def test_winograd_conv2d_equals_the_convolution_float64(n, c, o, h, w, padding, bias):
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w, dtype=torch.float64)
    weight, b = torch.randn(o, c, 3, 3, dtype=torch.float64), torch.randn(o, dtype=torch.float64) if bias else None
    got = values(lambda x, w, b: winograd_conv2d(x, w, b, padding), x, weight, b)
    expected = values(lambda x, w, b: F.conv2d(x, w, b, padding=padding), x, weight, b)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-11, atol=1e-11)


def test_winograd_conv2d_float32_stays_within_the_transforms_rounding():
    torch.manual_seed(0)
    x = torch.randn(8, 64, 16, 16).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(64, 64, 3, 3) * 0.05, torch.randn(64)
    exact = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    error = (winograd_conv2d(x, weight, bias, 1).double() - exact).abs().max() / exact.abs().max()
    assert 0 < error < 5e-5  # a direct float32 sum is about 1e-6 here; the F(4x4, 3x3) points amplify rounding


def test_the_transforms_are_each_others_adjoints():
    torch.manual_seed(0)
    x, v = torch.randn(2, 7, 10, 5, dtype=torch.float64), torch.randn(2 * 2 * 3, 36, 5, dtype=torch.float64)
    # <input(x), v> == <x, input_adjoint(v)> for output maps of 7 x 10 (padding 1 on a 7 x 10 input is 'same')
    lhs = (winograd.winograd_input(x, 1, 7, 10) * v).sum()
    rhs = (x * winograd.winograd_input_adjoint(v, 2, 7, 10, 1, 7, 10)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=0)
    m, gy = torch.randn(8, 36, 3, dtype=torch.float64), torch.randn(2, 7, 6, 3, dtype=torch.float64)
    torch.testing.assert_close((winograd.winograd_output(m, 2, 7, 6) * gy).sum(), (m * winograd.winograd_output_adjoint(gy)).sum(),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("bad, message", [(torch.zeros(2, 4, 4, 3, dtype=torch.bfloat16), "float32 or float64"),
                                          (torch.zeros(4, 4, 3), "4 dimensions")], ids=["bfloat16", "three-dims"])
def test_the_transform_kernels_name_bad_input(bad, message):
    with pytest.raises(RuntimeError, match=message):
        winograd.winograd_input(bad, 1, 4, 4)


def test_winograd_conv_runs_the_direct_convolution_where_the_transforms_do_not_pay(monkeypatch):
    conv = nn.Conv2d(64, 64, 3, padding=1)
    layer, calls = WinogradConv(conv), []
    monkeypatch.setattr(winograd, "winograd_conv2d", lambda *args: calls.append(args) or F.conv2d(args[0], args[1], args[2], padding=args[3]))
    x = torch.randn(64, 64, 8, 8)  # 256 tiles
    layer(x)
    layer(x[:10])  # 40 tiles
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    layer.double()(x.double())
    assert len(calls) == 2 and calls[1][0].dtype == torch.float64


@pytest.mark.parametrize("layer, replaced", [(nn.Conv2d(64, 64, 3, padding=1), True), (nn.Conv2d(32, 64, 3, padding=0), True),
                                             (nn.Conv2d(16, 64, 3, padding=1), False), (nn.Conv2d(64, 64, 3, stride=2, padding=1), False),
                                             (nn.Conv2d(64, 64, 5, padding=2), False), (nn.Conv2d(64, 64, 3, padding=(1, 0)), False),
                                             (nn.Conv2d(64, 64, 3, padding=1, groups=2), False),
                                             (nn.Conv2d(64, 64, 3, padding=1, padding_mode="reflect"), False)],
                         ids=["wide-padded", "unpadded", "narrow", "strided", "5x5", "uneven-padding", "grouped", "reflect"])
def test_replaceable_takes_only_what_the_transforms_compute(layer, replaced):
    assert winograd.replaceable(layer) is replaced


def test_a_compiled_winograd_convnet_embedding_equals_the_network_float64():
    """The compiled copy the loops use on the CPU (first block fused, Winograd 3x3 convolutions), forward and input gradient."""
    torch.manual_seed(0)
    net = ConvNet(1, 10, 28, width=32).double()
    copy = fusable(ConvNet(1, 10, 28, width=32).double(), cpu_kernels=True)
    copy.load_state_dict(net.state_dict())
    assert sum(isinstance(m, WinogradConv) for m in copy.modules()) == 2
    compiled = torch.compile(copy.embed, dynamic=False)
    # the second block's 16 x 16 maps are 16 x 4 x 4 = MIN_TILES tiles: Winograd; the third's 8 x 8, 64 tiles: direct
    x = torch.randn(16, 1, 28, 28, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    got, expected = [], []
    for run, out in ((compiled, got), (net.embed, expected)):
        x_ = x.detach().requires_grad_(True)
        y = run(x_)
        out += [y, torch.autograd.grad(y.pow(2).sum(), x_)[0]]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-11)
