"""Layers rewritten in the form that ``torch.compile`` fuses, for compiled copies of a network.

Two layers of the small distillation networks are costly in compiled second-order programs on a
CPU: the first convolution (one to three input channels: oneDNN runs it at a few GFLOP/s and its
double backward in separate passes over the largest feature maps) and the 2x2 average pooling
(whose backward inductor lowers as a gather). ``fusable(module)`` replaces them, in place, by
equal computations made of element-wise ops and reshapes, which inductor fuses with the norm and
ReLU around them; parameter names are unchanged, and values change only by rounding (the order of
the sums). Other layers are left as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_TAPS = 27  # in_channels * kh * kw up to which a convolution becomes a sum of shifted products (RGB 3x3)


class BlockMean(nn.Module):
    """``nn.AvgPool2d(k)`` (stride k, no padding, floor) as a reshape and a mean: (N, C, H, W) -> (N, C, H // k, W // k)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w, k = *x.shape, self.k
        x = x[:, :, : h // k * k, : w // k * k]
        return x.reshape(n, c, h // k, k, w // k, k).mean((3, 5))


class ShiftedConv(nn.Module):
    """``conv`` (stride 1, zero padding, few input channels) as a sum over its taps of weight column x shifted input.

    Holds ``conv``'s own ``weight`` (O, C, kh, kw) and ``bias`` (O or None) under the same names.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias, self.padding = conv.weight, conv.bias, conv.padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (ph, pw), (out, channels, kh, kw) = self.padding, self.weight.shape
        x = F.pad(x, (pw, pw, ph, ph))
        h, w = x.shape[-2] - kh + 1, x.shape[-1] - kw + 1
        y = None
        for c in range(channels):
            for i in range(kh):
                for j in range(kw):
                    term = self.weight[:, c, i, j].view(1, out, 1, 1) * x[:, c : c + 1, i : i + h, j : j + w]
                    y = term if y is None else y + term
        return y if self.bias is None else y + self.bias.view(1, out, 1, 1)


def fusable(module: nn.Module) -> nn.Module:
    """``module`` with its few-channel convolutions and non-overlapping average pools replaced (in place; returned)."""
    for name, child in module.named_children():
        if _is_shiftable(child):
            setattr(module, name, ShiftedConv(child))
        elif _is_block_pool(child):
            setattr(module, name, BlockMean(_single(child.kernel_size)))
        else:
            fusable(child)
    return module


def _single(value) -> int | None:
    if isinstance(value, int):
        return value
    return value[0] if len(set(value)) == 1 else None


def _is_shiftable(layer: nn.Module) -> bool:
    return (type(layer) is nn.Conv2d and layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] <= MAX_TAPS
            and layer.groups == 1 and layer.stride == (1, 1) and layer.dilation == (1, 1) and layer.padding_mode == "zeros"
            and not isinstance(layer.padding, str))


def _is_block_pool(layer: nn.Module) -> bool:
    k = _single(layer.kernel_size) if type(layer) is nn.AvgPool2d else None
    return (k is not None and _single(layer.stride) == k and _single(layer.padding) == 0 and not layer.ceil_mode
            and layer.divisor_override is None)
