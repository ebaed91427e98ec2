"""The networks' first block (few-channel convolution, instance norm, ReLU, k x k average pool) as one compiled kernel
on the CPU, forward and backward (``csrc/conv_block/conv_block_cpu.cpp``).

Each image's convolution output for a vector of output channels stays in a small buffer through the norm's
statistics, the ReLU and the pool; the backward recomputes it from the few-channel input rather than reading
saved 32 x 32 x 128 maps, where inductor's kernels for the same block pass over those maps many times (64 MNIST
images: 1.2 ms forward, 7.5 ms with the parameters' gradients, against 2.3 and about 28). First-order only: its gradient is not differentiable again
(differentiating it raises), and ``torch.func`` transforms do not run it (``fusable``'s ``func_transforms``).
Values equal the layers' to rounding (the order of the sums).
"""

from __future__ import annotations

import torch

from ... import _extension
from ..._custom_ops import custom_op


def available() -> bool:
    """Whether the kernel can be built and loaded here."""
    return _extension.load("conv_block_cpu") is not None


def _kernels():
    return _extension.load("conv_block_cpu")


@custom_op("ddfast::conv_block")
def conv_block_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, ph: int, pw: int,
                       k: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (N, C, H, W), weight (O, C, kh, kw), bias / gamma / beta (O,) -> the block's output (N, Ho / k, Wo / k, O) and the norm's
    mean and 1 / std (N, O); Ho = H + 2 ph - kh + 1 and Wo = W + 2 pw - kw + 1 divisible by k. float32 or float64, CPU."""
    return _kernels().forward(x, weight, bias, gamma, beta, ph, pw, k, eps)


@custom_op("ddfast::conv_block_backward")
def conv_block_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                        mean: torch.Tensor, rstd: torch.Tensor, ph: int, pw: int, k: int,
                        need_x: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``conv_block_forward``'s output ``grad`` (N, Ho / k, Wo / k, O) with respect to x (empty unless
    ``need_x``), weight, bias, gamma and beta."""
    return _kernels().backward(grad, x, weight, bias, gamma, beta, mean, rstd, ph, pw, k, need_x)


@conv_block_forward.register_fake
def _(x, weight, bias, gamma, beta, ph, pw, k, eps):
    n, o = x.shape[0], weight.shape[0]
    ho, wo = x.shape[2] + 2 * ph - weight.shape[2] + 1, x.shape[3] + 2 * pw - weight.shape[3] + 1
    return x.new_empty((n, ho // k, wo // k, o)), x.new_empty((n, o)), x.new_empty((n, o))


@conv_block_backward.register_fake
def _(grad, x, weight, bias, gamma, beta, mean, rstd, ph, pw, k, need_x):
    o = weight.shape[0]
    return (x.new_empty(x.shape) if need_x else x.new_empty((0,)), weight.new_empty(weight.shape), *(weight.new_empty((o,)) for _ in range(3)))


def _save(ctx, inputs, output) -> None:
    x, weight, bias, gamma, beta, ph, pw, k, _ = inputs
    ctx.save_for_backward(x, weight, bias, gamma, beta, output[1], output[2])
    ctx.args = (ph, pw, k)
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad, _mean_grad, _rstd_grad):
    x, weight, bias, gamma, beta, mean, rstd = ctx.saved_tensors
    need_x = ctx.needs_input_grad[0]
    gx, gw, gb, gg, ge = conv_block_backward(grad, x, weight, bias, gamma, beta, mean, rstd, *ctx.args, need_x)
    return (gx if need_x else None), gw, gb, gg, ge, None, None, None, None


def _refuse_second_order(ctx, *grads):
    raise RuntimeError("the first-block kernel's gradient cannot be differentiated again: compute second-order gradients of the "
                       "network with fusable(..., cpu_kernels=False) or eagerly")


conv_block_forward.register_autograd(_backward, setup_context=_save)
conv_block_backward.register_autograd(_refuse_second_order, setup_context=lambda ctx, inputs, output: None)


def conv_block(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, gamma: torch.Tensor | None, beta: torch.Tensor | None,
               padding: tuple[int, int], k: int, eps: float) -> torch.Tensor:
    """``avg_pool2d(relu(group_norm(conv2d(x, weight, bias, padding=padding), O, gamma, beta, eps)), k)`` (instance norm): x (N, C,
    H, W) float32 / float64 on the CPU -> (N, O, Ho / k, Wo / k), channels-last in memory; absent bias / gamma / beta are 0 / 1 / 0."""
    o = weight.shape[0]
    bias = weight.new_zeros(o) if bias is None else bias
    gamma = weight.new_ones(o) if gamma is None else gamma
    beta = weight.new_zeros(o) if beta is None else beta
    out, _, _ = conv_block_forward(x, weight, bias, gamma, beta, padding[0], padding[1], k, eps)
    return out.permute(0, 3, 1, 2)
