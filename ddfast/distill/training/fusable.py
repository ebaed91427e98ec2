"""Layers rewritten in the form that ``torch.compile`` fuses, for compiled copies of a network.

Two layers of the small distillation networks are costly in compiled programs on a CPU: the first
convolution (one to three input channels: oneDNN runs it at a few GFLOP/s and its backward in
separate passes over the largest feature maps) and the 2x2 average pooling (whose backward inductor
lowers as a gather, with an integer division per element). ``fusable(module)`` replaces them, in
place, by equal computations made of element-wise ops and reshapes, which inductor fuses with the
norm and ReLU around them; parameter names are unchanged, and values change only by rounding (the
order of the sums). With ``cpu_kernels`` (copies on the CPU) the wide 3x3 convolutions become Winograd
F(4x4, 3x3) convolutions (``winograd``: a quarter of the products). Other layers are left as they are.

A whole first block (few-channel convolution, instance norm or none, ReLU, k x k average pool)
becomes a ``PooledConvBlock``: it computes the convolution's output as its k x k phases (the
outputs at rows i = a mod k and columns j = b mod k, each (N, O, H / k, W / k)) from the phases of
the padded input, so that the norm's statistics, the ReLU and the pool (the mean of the phases)
and all their gradients are contiguous loops without the pool's gather (a compiled first-order
gradient of the MNIST ConvNet takes 0.6 of the time of the layer-by-layer form). With ``cpu_kernels``,
calls on inputs without gradient (real batches: DM's embeddings, gradient matching's real gradients,
training epochs) run one compiled kernel for the whole block instead (``conv_block``: 7.5 ms for the
forward and backward of 64 MNIST images, against about 28 in inductor's kernels for the phase form).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..._custom_ops import custom_op
from .conv_block import available as conv_block_kernel_available
from .conv_block import conv_block
from .winograd import WinogradConv
from .winograd import available as winograd_available
from .winograd import replaceable as winograd_replaceable

MAX_TAPS = 27  # in_channels * kh * kw up to which a convolution becomes a sum of shifted products (RGB 3x3)


class BlockMean(nn.Module):
    """``nn.AvgPool2d(k)`` (stride k, no padding, floor) as a reshape and a mean: (N, C, H, W) -> (N, C, H // k, W // k)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_mean(x, self.k)


def block_mean(x: torch.Tensor, k: int) -> torch.Tensor:
    """``F.avg_pool2d(x, k)`` as a reshape and a mean."""
    n, c, h, w = x.shape
    x = x[:, :, : h // k * k, : w // k * k]
    return x.reshape(n, c, h // k, k, w // k, k).mean((3, 5))


class ShiftedConv(nn.Module):
    """``conv`` (stride 1, zero padding, few input channels) as a sum over its taps of weight column x shifted input.

    Holds ``conv``'s own ``weight`` (O, C, kh, kw) and ``bias`` (O or None) under the same names.
    """

    def __init__(self, conv: nn.Conv2d, *, tap_major: bool = True):
        super().__init__()
        self.weight, self.bias, self.padding, self.tap_major = conv.weight, conv.bias, conv.padding, tap_major

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shifted_conv(x, self.weight, self.bias, self.padding, tap_major=self.tap_major)


def shifted_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: tuple[int, int], *,
                 tap_major: bool = True) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=padding)`` (stride 1) as a sum over the taps of weight column x shifted input
    (``tap_major``: the columns from a tap-major copy of the weight, ``tap_columns``)."""
    (ph, pw), (out, channels, kh, kw) = padding, weight.shape
    x = F.pad(x, (pw, pw, ph, ph))
    h, w = x.shape[-2] - kh + 1, x.shape[-1] - kw + 1
    taps = tap_columns(weight, tap_major)
    y = None
    for c in range(channels):
        for i in range(kh):
            for j in range(kw):
                term = taps[c, i, j].view(1, out, 1, 1) * x[:, c : c + 1, i : i + h, j : j + w]
                y = term if y is None else y + term
    return y if bias is None else y + bias.view(1, out, 1, 1)


def tap_columns(weight: torch.Tensor, tap_major: bool) -> torch.Tensor:
    """weight (O, C, kh, kw) indexed as (C, kh, kw, O): [c, i, j] is tap (c, i, j)'s column over the output channels.

    ``tap_major``: from a contiguous copy (``tap_major_copy``), so that compiled channels-last kernels, which vectorise
    over the output channels, load each column as one vector instead of gathering it (the first block of the MNIST
    ConvNet's embedding: 0.6 of the time). Otherwise a view. Not under ``torch.func`` transforms: torch runs operators'
    registered autograd formulas only for ``torch.autograd``.
    """
    return tap_major_copy(weight) if tap_major else weight.permute(1, 2, 3, 0)


@custom_op("ddfast::tap_major_copy")
def tap_major_copy(weight: torch.Tensor) -> torch.Tensor:
    """weight (O, C, kh, kw) -> (C, kh, kw, O), contiguous. An operator of its own, so that inductor writes the copy once
    instead of inlining the gather into every kernel that reads it."""
    return weight.permute(1, 2, 3, 0).contiguous()


tap_major_copy.register_fake(lambda w: w.new_empty((w.shape[1], w.shape[2], w.shape[3], w.shape[0])))
tap_major_copy.register_autograd(lambda ctx, grad: grad.permute(3, 0, 1, 2), setup_context=lambda ctx, inputs, output: None)


@custom_op("ddfast::phase_split")
def phase_split(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, C, H, W) -> (k, k, N, C, H / k, W / k): [a, b] holds x[..., a::k, b::k]; k >= 2, H and W divisible by k.

    An operator of its own, so that inductor writes the phases once instead of gathering them in every kernel that reads them.
    """
    n, c, h, w = x.shape
    return x.view(n, c, h // k, k, w // k, k).permute(3, 5, 0, 1, 2, 4).contiguous()


@custom_op("ddfast::phase_merge")
def phase_merge(phases: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of ``phase_split``: (k, k, N, C, h, w) -> (N, C, h * k, w * k)."""
    _, _, n, c, h, w = phases.shape
    return phases.permute(2, 3, 4, 0, 5, 1).reshape(n, c, h * k, w * k)


phase_split.register_fake(lambda x, k: x.new_empty((k, k, x.shape[0], x.shape[1], x.shape[2] // k, x.shape[3] // k)))
phase_merge.register_fake(lambda p, k: p.new_empty((p.shape[2], p.shape[3], p.shape[4] * k, p.shape[5] * k)))


def _keep_k(ctx, inputs, output) -> None:
    ctx.k = inputs[1]


phase_split.register_autograd(lambda ctx, grad: (phase_merge(grad, ctx.k), None), setup_context=_keep_k)
phase_merge.register_autograd(lambda ctx, grad: (phase_split(grad, ctx.k), None), setup_context=_keep_k)


class NormParameters(nn.Module):
    """An instance norm's affine parameters at the norm's place (same names); the norm itself runs in a ``PooledConvBlock``."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.weight, self.bias, self.eps = norm.weight, norm.bias, norm.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class PooledConvBlock(nn.Module):
    """conv -> instance norm (or none) -> ReLU -> ``AvgPool2d(k)``, computed over the k x k phases of the conv's output.

    Holds ``conv``'s ``weight`` (O, C, kh, kw) and ``bias`` (O or None); ``norm`` (a ``NormParameters`` registered elsewhere
    under the norm's own name, or None) is read at each call. (N, C, H, W) -> (N, O, H_out / k, W_out / k). Where the conv's
    output is not divisible by k (the pool drops rows the norm counts), it runs the layers one after the other instead.
    ``tap_major``: weight columns from ``tap_columns``' copy; ``kernel``: ``conv_block`` where it applies (with a norm).
    """

    def __init__(self, conv: nn.Conv2d, norm: NormParameters | None, k: int, *, tap_major: bool = True, kernel: bool = False):
        super().__init__()
        self.weight, self.bias, self.padding, self.k, self.tap_major = conv.weight, conv.bias, conv.padding, k, tap_major
        self.kernel = kernel and norm is not None  # where _block_kernel_applies
        self._norm = (norm,)  # not a submodule: its parameters keep their names at the norm's place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (ph, pw), (out, channels, kh, kw), k = self.padding, self.weight.shape, self.k
        height, width = x.shape[-2] + 2 * ph - kh + 1, x.shape[-1] + 2 * pw - kw + 1
        if height % k or width % k:
            return self._layers(x)
        norm = self._norm[0]
        if self.kernel and _block_kernel_applies(x):
            return conv_block(x, self.weight, self.bias, norm.weight, norm.bias, self.padding, k, norm.eps)
        h, w = height // k, width // k
        padded = F.pad(x, (pw, pw + (-(x.shape[-1] + 2 * pw)) % k, ph, ph + (-(x.shape[-2] + 2 * ph)) % k))
        source, taps = phase_split(padded, k), tap_columns(self.weight, self.tap_major)
        outputs = []
        for a in range(k):
            for b in range(k):
                y = None if self.bias is None else self.bias.view(1, out, 1, 1)
                for c in range(channels):
                    for i in range(kh):
                        for j in range(kw):
                            (r, u), (s, v) = divmod(a + i, k), divmod(b + j, k)
                            term = taps[c, i, j].view(1, out, 1, 1) * source[u, v, :, c : c + 1, r : r + h, s : s + w]
                            y = term if y is None else y + term
                outputs.append(y)
        outputs = self._normalized(outputs, h * w * k * k)
        return sum(torch.relu(y) for y in outputs) / len(outputs)

    def _normalized(self, phases: list[torch.Tensor], count: int) -> list[torch.Tensor]:
        norm = self._norm[0]
        if norm is None:
            return phases
        mean = sum(y.sum((2, 3), keepdim=True) for y in phases) / count
        var = sum((y - mean).pow(2).sum((2, 3), keepdim=True) for y in phases) / count
        scale = torch.rsqrt(var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight.view(1, -1, 1, 1)
        shift = -mean * scale if norm.bias is None else norm.bias.view(1, -1, 1, 1) - mean * scale
        return [y * scale + shift for y in phases]

    def _layers(self, x: torch.Tensor) -> torch.Tensor:
        norm = self._norm[0]
        y = shifted_conv(x, self.weight, self.bias, self.padding, tap_major=self.tap_major)
        if norm is not None:
            y = F.group_norm(y, y.shape[1], norm.weight, norm.bias, norm.eps)
        return block_mean(torch.relu(y), self.k)


def _block_kernel_applies(x: torch.Tensor) -> bool:
    """Whether ``conv_block`` computes a block's call: float32 / float64 on the CPU outside autocast, for an input without
    gradient (real batches: 1.2 against 2.3 ms forward for 64 MNIST images, 7.5 against about 28 with the parameters'
    gradients). Where the input needs its gradient too (DM's synthetic side) the compiled phase form stays."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not x.requires_grad
            and not torch.is_autocast_enabled("cpu"))


def fusable(module: nn.Module, *, cpu_kernels: bool = False, func_transforms: bool = False) -> nn.Module:
    """``module`` with its first blocks, few-channel convolutions and non-overlapping average pools replaced (in place; returned).

    ``cpu_kernels``: where ddfast's CPU kernels are built, its wide 3x3 convolutions become ``WinogradConv`` and its first
    blocks run ``conv_block`` where that pays. ``func_transforms``: the copy runs under ``torch.func`` transforms (the
    compiled gradient programs), which do not run operators' registered autograd formulas: none of ddfast's operators on
    parameter-dependent values there (no kernels, no tap-major weight copies).
    """
    options = {"tap_major": not func_transforms, "kernel": cpu_kernels and not func_transforms and conv_block_kernel_available()}
    winograd = cpu_kernels and not func_transforms and winograd_available()
    _rewrite(module, options, winograd)
    return module


def _rewrite(module: nn.Module, options: dict, winograd: bool) -> None:
    if isinstance(module, nn.Sequential):
        _fuse_blocks(module, options)
    for name, child in module.named_children():
        if isinstance(child, (PooledConvBlock, NormParameters)):
            continue
        if _is_shiftable(child):
            setattr(module, name, ShiftedConv(child, tap_major=options["tap_major"]))
        elif _is_block_pool(child):
            setattr(module, name, BlockMean(_single(child.kernel_size)))
        elif winograd and winograd_replaceable(child):
            setattr(module, name, WinogradConv(child))
        else:
            _rewrite(child, options, winograd)


def _fuse_blocks(sequence: nn.Sequential, options: dict) -> None:
    """Each conv, norm, ReLU, pool run of ``sequence`` that ``PooledConvBlock`` computes, replaced by one (names kept)."""
    layers = list(sequence)
    for i in range(len(layers) - 3):
        conv, norm, relu, pool = layers[i : i + 4]
        pooled = _is_block_pool(pool) and _single(pool.kernel_size) > 1  # k = 1 has one phase: nothing to gain
        if _is_shiftable(conv) and (_is_instance_norm(norm) or type(norm) is nn.Identity) and type(relu) is nn.ReLU and pooled:
            held = NormParameters(norm) if _is_instance_norm(norm) else None
            sequence[i] = PooledConvBlock(conv, held, _single(pool.kernel_size), **options)
            sequence[i + 1], sequence[i + 2], sequence[i + 3] = held or nn.Identity(), nn.Identity(), nn.Identity()
            layers = list(sequence)


def _is_instance_norm(layer: nn.Module) -> bool:
    return type(layer) is nn.GroupNorm and layer.num_groups == layer.num_channels


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
