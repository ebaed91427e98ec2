"""The fusable forms of convolutions, pools and first blocks equal the layers they replace (float64, forward and every
gradient, first and second order)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from ddfast.distill.training.fusable import BlockMean, NormParameters, PooledConvBlock, ShiftedConv, fusable, phase_merge, phase_split
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


def test_phase_split_holds_the_strided_phases_and_merge_inverts_it():
    x = torch.randn(2, 3, 6, 9, dtype=torch.float64)
    phases = phase_split(x, 3)
    assert phases.shape == (3, 3, 2, 3, 2, 3)
    for a in range(3):
        for b in range(3):
            torch.testing.assert_close(phases[a, b], x[:, :, a::3, b::3], rtol=0, atol=0)
    torch.testing.assert_close(phase_merge(phases, 3), x, rtol=0, atol=0)


def test_phase_split_and_merge_are_differentiable_twice():
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: phase_split(t, 2), (x,))
    assert torch.autograd.gradgradcheck(lambda t: phase_split(t, 2).pow(2), (x,))
    phases = torch.randn(2, 2, 1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: phase_merge(t, 2).pow(2), (phases,))


def block(channels: int, padding, k: int, norm: str, bias: bool = True, affine: bool = True) -> nn.Sequential:
    conv = nn.Conv2d(channels, 5, 3, padding=padding, bias=bias)
    layers = {"instance": nn.GroupNorm(5, 5, affine=affine), "none": nn.Identity()}[norm]
    sequence = nn.Sequential(conv, layers, nn.ReLU(inplace=True), nn.AvgPool2d(k)).double()
    if norm == "instance" and affine:
        with torch.no_grad():
            sequence[1].weight.uniform_(0.5, 1.5)
            sequence[1].bias.normal_()
    return sequence


def block_values(sequence: nn.Sequential, x: torch.Tensor, second_order: bool):
    """The output, the gradients of a weighted sum of it in x and every parameter, and (second order) the gradients of the
    squared first-order gradients in the same."""
    x = x.detach().requires_grad_(True)
    out = sequence(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    inputs = [x, *sequence.parameters()]
    grads = torch.autograd.grad((out * weights).sum(), inputs, create_graph=second_order)
    if not second_order:
        return (out, *grads)
    return (out, *grads, *torch.autograd.grad(sum(g.pow(2).sum() for g in grads), inputs, allow_unused=True, materialize_grads=True))


@pytest.mark.parametrize("channels, padding, size, k, norm, bias, affine", [
    (1, 3, (28, 28), 2, "instance", True, True), (3, 1, (8, 10), 2, "instance", True, True), (1, 1, (9, 9), 3, "instance", False, True),
    (2, (0, 1), (8, 4), 2, "instance", True, False), (1, 1, (6, 6), 2, "none", True, True), (1, 1, (7, 7), 2, "instance", True, True),
    (1, 0, (4, 4), 2, "instance", True, True)],
    ids=["mnist-first", "rgb-rectangular", "3x3-pool-no-bias", "uneven-padding-no-affine", "no-norm", "odd-output-layer-by-layer",
         "one-pixel-per-phase"])
def test_pooled_conv_block_equals_the_layers(channels, padding, size, k, norm, bias, affine):
    torch.manual_seed(0)
    sequence = block(channels, padding, k, norm, bias, affine)
    x = torch.randn(3, channels, *size, dtype=torch.float64)
    expected = block_values(sequence, x, second_order=True)
    names = [name for name, _ in sequence.named_parameters()]
    fusable(sequence)
    assert isinstance(sequence[0], PooledConvBlock) and [name for name, _ in sequence.named_parameters()] == names
    for got, want in zip(block_values(sequence, x, second_order=True), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_pooled_conv_block_reads_substituted_norm_parameters():
    """functional_call swaps the norm's parameters at the norm's place; the block computes with the swapped ones."""
    torch.manual_seed(0)
    sequence = block(1, 1, 2, "instance")
    state = {name: torch.randn_like(t) for name, t in sequence.named_parameters()}
    x = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    expected = functional_call(sequence, state, (x,))
    torch.testing.assert_close(functional_call(fusable(sequence), state, (x,)), expected, rtol=1e-12, atol=1e-13)


def test_fusable_rewrites_a_convnet_and_keeps_its_values_and_names():
    torch.manual_seed(0)
    net = ConvNet(1, 10, 28, width=8).double()
    names = [name for name, _ in net.named_parameters()]
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    expected = net(x)
    rewritten = fusable(net)
    assert isinstance(rewritten.features[0], PooledConvBlock) and isinstance(rewritten.features[1], NormParameters)
    assert isinstance(rewritten.features[4], nn.Conv2d)  # 128 inputs: kept
    assert sum(isinstance(m, BlockMean) for m in rewritten.modules()) == 2
    assert [name for name, _ in rewritten.named_parameters()] == names
    torch.testing.assert_close(rewritten(x), expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("norm, k", [(nn.BatchNorm2d(5), 2), (nn.GroupNorm(1, 5), 2), (nn.GroupNorm(5, 5), 1)],
                         ids=["batch-norm", "layer-norm-like-group", "one-pixel-pool"])
def test_fusable_keeps_other_blocks_layer_by_layer(norm, k):
    sequence = nn.Sequential(nn.Conv2d(1, 5, 3, padding=1), norm, nn.ReLU(), nn.AvgPool2d(k))
    fusable(sequence)
    assert isinstance(sequence[0], ShiftedConv) and sequence[1] is norm and isinstance(sequence[3], BlockMean)


@pytest.mark.parametrize("layer", [nn.Conv2d(1, 4, 3, stride=2), nn.Conv2d(2, 2, 3, groups=2), nn.Conv2d(1, 4, 3, padding="same"),
                                   nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.Conv2d(4, 4, 3),
                                   nn.AvgPool2d(2, stride=1), nn.AvgPool2d(2, padding=1), nn.AvgPool2d(2, ceil_mode=True),
                                   nn.AvgPool2d(3, divisor_override=2), nn.MaxPool2d(2)],
                         ids=["strided", "grouped", "same-padding", "reflect-padding", "many-inputs", "overlapping-pool", "padded-pool",
                              "ceil-pool", "divisor-override", "max-pool"])
def test_fusable_leaves_layers_it_cannot_rewrite_exactly(layer):
    assert fusable(nn.Sequential(layer))[0] is layer
