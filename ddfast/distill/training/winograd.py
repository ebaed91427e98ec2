"""3x3 convolutions as Winograd F(4x4, 3x3) on the CPU: a quarter of the multiplications of the direct form.

Per 4x4 output tile, y = A^T [sum_c (G w_oc G^T) (.) (B^T d_c B)] A (Lavin & Gray 2016), d_c the tile's 6x6
input patch of channel c. The patch transform B^T d B and the output transform A^T m A are compiled kernels
(``csrc/winograd/winograd_cpu.cpp``), channels innermost; the 36 products over channels are one grouped 1x1
convolution (oneDNN: (tiles, C) x (C, O) for each of the 36 transformed positions), so the 3x3 convolution of
a (64, 128, 16, 16) batch runs in about half of oneDNN's direct time. Each transform's gradient is its
adjoint, and the other way round, so ``winograd_conv2d`` is differentiable to any order. Not under
``torch.func`` transforms: torch runs operators' registered autograd formulas only for ``torch.autograd``
(so the compiled gradient programs of ``training.speed``, made with ``torch.func.grad``, keep ``F.conv2d``).

Values change by rounding only: float64 agrees with ``F.conv2d`` to about 1e-14 relative, float32 to
about 1e-5 relative (the transforms' points 0, +-1, +-2 amplify rounding somewhat more than a direct sum).
``fusable`` uses it for the wide 3x3 convolutions of compiled networks on the CPU; without a C++ compiler
(``available()`` False) those keep ``F.conv2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ... import _extension
from ..._custom_ops import custom_op

MIN_CHANNELS = 32  # input and output channels from which the transforms' memory traffic pays for the saved products
MIN_TILES = 256  # output tiles (4x4) of a call from which it pays (64 images of 8x8: yes; 10 of 16x16: no)

# G (6 x 3) of F(4x4, 3x3); the filter transform G w G^T is done in torch (differentiable), as one product with G (x) G
_G = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6), (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))


def available() -> bool:
    """Whether the transform kernels can be built and loaded here."""
    return _extension.load("winograd_cpu") is not None


def _kernels():
    return _extension.load("winograd_cpu")


def _tiles(n: int, height: int, width: int) -> int:
    return n * -(-height // 4) * -(-width // 4)


@custom_op("ddfast::winograd_input")
def winograd_input(x: torch.Tensor, pad: int, out_h: int, out_w: int) -> torch.Tensor:
    """x (N, H, W, C) float32 / float64 -> (T, 36, C): each output tile's 6x6 patch (from row 4i - pad, column
    4j - pad; zero outside x) transformed as B^T d B; T = N * ceil(out_h / 4) * ceil(out_w / 4) tiles."""
    return _kernels().input(x, pad, out_h, out_w)


@custom_op("ddfast::winograd_input_adjoint")
def winograd_input_adjoint(v: torch.Tensor, n: int, height: int, width: int, pad: int, out_h: int, out_w: int) -> torch.Tensor:
    """The adjoint of ``winograd_input``: (T, 36, C) -> (n, height, width, C)."""
    return _kernels().input_adjoint(v, n, height, width, pad, out_h, out_w)


@custom_op("ddfast::winograd_output")
def winograd_output(m: torch.Tensor, n: int, out_h: int, out_w: int) -> torch.Tensor:
    """(T, 36, O) -> (n, out_h, out_w, O): each tile's 6x6 values transformed as A^T m A, cropped to the output."""
    return _kernels().output(m, n, out_h, out_w)


@custom_op("ddfast::winograd_output_adjoint")
def winograd_output_adjoint(gy: torch.Tensor) -> torch.Tensor:
    """The adjoint of ``winograd_output``: (N, Ho, Wo, O) -> (T, 36, O)."""
    return _kernels().output_adjoint(gy)


winograd_input.register_fake(lambda x, pad, out_h, out_w: x.new_empty((_tiles(x.shape[0], out_h, out_w), 36, x.shape[3])))
winograd_input_adjoint.register_fake(lambda v, n, height, width, pad, out_h, out_w: v.new_empty((n, height, width, v.shape[2])))
winograd_output.register_fake(lambda m, n, out_h, out_w: m.new_empty((n, out_h, out_w, m.shape[2])))
winograd_output_adjoint.register_fake(lambda gy: gy.new_empty((_tiles(*gy.shape[:3]), 36, gy.shape[3])))


def _keep_args(ctx, inputs, output) -> None:
    ctx.size, ctx.args = inputs[0].shape[:3], inputs[1:]


winograd_input.register_autograd(lambda ctx, g: (winograd_input_adjoint(g, *ctx.size, *ctx.args), None, None, None),
                                 setup_context=_keep_args)
winograd_input_adjoint.register_autograd(lambda ctx, g: (winograd_input(g, *ctx.args[3:]), None, None, None, None, None, None),
                                         setup_context=_keep_args)
winograd_output.register_autograd(lambda ctx, g: (winograd_output_adjoint(g), None, None, None), setup_context=_keep_args)
winograd_output_adjoint.register_autograd(lambda ctx, g: (winograd_output(g, *ctx.size),), setup_context=_keep_args)


def winograd_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)`` for a 3x3 ``weight`` (O, C, 3, 3) and x (N, C, H, W) float32 or
    float64 on the CPU; the output (N, O, H + 2 padding - 2, W + 2 padding - 2) is channels-last in memory."""
    n, channels, height, width = x.shape
    out = weight.shape[0]
    out_h, out_w = height + 2 * padding - 2, width + 2 * padding - 2
    v = winograd_input(x.permute(0, 2, 3, 1).contiguous(), padding, out_h, out_w)  # (T, 36, C); compiled: NHWC written by x's producer
    g = weight.new_tensor(_G)
    u = (weight.reshape(-1, 9) @ torch.kron(g, g).t()).t().reshape(36 * out, channels, 1, 1)  # [6a + b, o, c]
    rows = n * -(-out_h // 4)
    v = v.view(1, rows, -1, 36 * channels).permute(0, 3, 1, 2)  # (1, 36 C, rows, columns), channels-last: one GEMM per position
    m = F.conv2d(v, u, groups=36).permute(0, 2, 3, 1).reshape(-1, 36, out)
    y = winograd_output(m, n, out_h, out_w).permute(0, 3, 1, 2)
    return y if bias is None else y + bias.view(1, out, 1, 1)


class WinogradConv(nn.Module):
    """``conv`` (3x3, stride 1, zero padding) through ``winograd_conv2d`` for float32 / float64 inputs of ``MIN_TILES`` output
    tiles or more outside autocast (bfloat16 products lose too much in the transforms), ``F.conv2d`` otherwise. Holds
    ``conv``'s ``weight`` and ``bias``."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias, self.padding = conv.weight, conv.bias, conv.padding[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_h, out_w = x.shape[2] + 2 * self.padding - 2, x.shape[3] + 2 * self.padding - 2
        if (x.dtype in (torch.float32, torch.float64) and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
                and _tiles(x.shape[0], out_h, out_w) >= MIN_TILES):
            return winograd_conv2d(x, self.weight, self.bias, self.padding)
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)


def replaceable(layer: nn.Module) -> bool:
    """Whether ``layer`` is a convolution that ``WinogradConv`` computes: 3x3, stride 1, equal zero padding, wide."""
    return (type(layer) is nn.Conv2d and layer.kernel_size == (3, 3) and layer.stride == (1, 1) and layer.dilation == (1, 1)
            and layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)
            and layer.padding[0] == layer.padding[1] and min(layer.in_channels, layer.out_channels) >= MIN_CHANNELS)
