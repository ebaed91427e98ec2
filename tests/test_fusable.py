"""The fusable forms of convolutions and pools equal the layers they replace (float64, forward and every gradient)."""

import pytest
import torch
from torch import nn

from ddfast.distill.training.fusable import BlockMean, ShiftedConv, fusable
from ddfast.distill.training.models import ConvNet


def forward_and_grads(layer: nn.Module, x: torch.Tensor, out_grad_seed: int = 0):
    x = x.detach().requires_grad_(True)
    out = layer(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(out_grad_seed), dtype=out.dtype)
    inputs = [x, *layer.parameters()]
    return (out, *torch.autograd.grad((out * weights).sum(), inputs))


@pytest.mark.parametrize("channels, kernel, padding, bias", [(1, 3, 3, True), (3, 3, 1, True), (2, 5, 0, False), (1, 3, (2, 1), True)],
                         ids=["mnist-first", "rgb-first", "5x5-unpadded-no-bias", "uneven-padding"])
def test_shifted_conv_equals_the_convolution(channels, kernel, padding, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, 6, kernel, padding=padding, bias=bias).double()
    x = torch.randn(3, channels, 11, 9, dtype=torch.float64)  # odd, non-square maps
    for got, expected in zip(forward_and_grads(ShiftedConv(conv), x), forward_and_grads(conv, x), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("size", [(8, 8), (7, 9), (3, 3)], ids=["even", "odd-floor", "one-output"])
def test_block_mean_equals_the_average_pool(size):
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    for got, expected in zip(forward_and_grads(BlockMean(2), x), forward_and_grads(nn.AvgPool2d(2), x), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_fusable_rewrites_a_convnet_and_keeps_its_values_and_names():
    torch.manual_seed(0)
    net = ConvNet(1, 10, 28, width=8).double()
    names = [name for name, _ in net.named_parameters()]
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    expected = net(x)
    rewritten = fusable(net)
    assert isinstance(rewritten.features[0], ShiftedConv) and isinstance(rewritten.features[4], nn.Conv2d)  # 128 inputs: kept
    assert sum(isinstance(m, BlockMean) for m in rewritten.modules()) == 3
    assert [name for name, _ in rewritten.named_parameters()] == names
    torch.testing.assert_close(rewritten(x), expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("layer", [nn.Conv2d(1, 4, 3, stride=2), nn.Conv2d(2, 2, 3, groups=2), nn.Conv2d(1, 4, 3, padding="same"),
                                   nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 3),
                                   nn.AvgPool2d(2, stride=1), nn.AvgPool2d(2, padding=1), nn.AvgPool2d(2, ceil_mode=True),
                                   nn.AvgPool2d(3, divisor_override=2), nn.MaxPool2d(2)],
                         ids=["strided", "grouped", "same-padding", "reflect-padding", "many-inputs", "overlapping-pool", "padded-pool",
                              "ceil-pool", "divisor-override", "max-pool"])
def test_fusable_leaves_layers_it_cannot_rewrite_exactly(layer):
    assert fusable(nn.Sequential(layer))[0] is layer
