"""Gradient matching: DC (Zhao, Mopuri & Bilen 2021) and DSA (the same with Siamese augmentation).

Each iteration starts a fresh network; ``outer_loop`` times, the per-class gradients of the
cross-entropy on real and synthetic batches are matched layer by layer and the images take one
step, then (except after the last) the network trains ``inner_loop`` epochs on the synthetic set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .method import Method, register
from .settings import COUNT, NON_NEGATIVE_INT, POSITIVE, check
from .training.loop import train_network
from .training.speed import FastNetwork, network_state

# (outer_loop, inner_loop) of the reference code per IPC
UPSTREAM_LOOPS = {1: (1, 1), 10: (10, 50), 50: (50, 10)}


@dataclass(frozen=True)
class GradientMatchingOptions:
    outer_loop: int = 10
    inner_loop: int = 50
    net_lr: float = 0.01  # SGD on the network between outer steps
    train_batch: int = 256  # batch size of those network updates

    def __post_init__(self):
        check(self, outer_loop=COUNT, inner_loop=NON_NEGATIVE_INT, net_lr=POSITIVE, train_batch=COUNT)


METRICS = ("cos", "mse", "l1")


def gradient_distance(syn_grads: Sequence[torch.Tensor], real_grads: Sequence[torch.Tensor], eps: float = 1e-6,
                      metric: str = "cos") -> torch.Tensor:
    """Layer-wise distance between the gradients, summed over layers; 1-D parameters are ignored.

    ``cos`` (DC): each gradient reshaped to (out, -1) (conv: (out, in * kh * kw)), the sum over output
    rows of (1 - cos); ``mse`` / ``l1`` (IDC): the sum of squared / absolute differences.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    total = syn_grads[0].new_zeros(())
    for gs, gr in zip(syn_grads, real_grads, strict=True):
        if gs.dim() < 2:
            continue
        if metric == "mse":
            total = total + (gs - gr).pow(2).sum()
        elif metric == "l1":
            total = total + (gs - gr).abs().sum()
        else:
            gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
            cos = (gs * gr).sum(-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + eps)
            total = total + (1 - cos).sum()
    return total


def matching_loss(network: nn.Module, real: Sequence[torch.Tensor], syn: Sequence[torch.Tensor], *, metric: str = "cos",
                  params: Sequence[torch.Tensor] | None = None, fast: FastNetwork | None = None) -> torch.Tensor:
    """Gradient-matching loss summed over classes; ``real[c]`` and ``syn[c]`` are images of class c.

    Matches the gradients of ``params`` (default: every trainable parameter) with ``gradient_distance``'s
    ``metric``. Differentiable with respect to the synthetic images (the real gradients are constants).
    ``fast`` computes the gradients under a run's speed settings (``FastNetwork.gradients``: compiled).
    """
    params = [p for p in network.parameters() if p.requires_grad] if params is None else list(params)
    state, names = network_state(network), _names(network, params)

    def gradients(x: torch.Tensor, c: int, create_graph: bool) -> list[torch.Tensor]:
        labels = torch.full((len(x),), c, device=x.device)
        if fast is not None:
            return fast.gradients(state, names, x, labels, create_graph=create_graph)
        return list(torch.autograd.grad(F.cross_entropy(network(x), labels), params, create_graph=create_graph))

    total = None
    for c, (real_c, syn_c) in enumerate(zip(real, syn, strict=True)):
        real_grads = [g.detach() for g in gradients(real_c, c, False)]
        distance = gradient_distance(gradients(syn_c, c, True), real_grads, metric=metric)
        total = distance if total is None else total + distance
    return total


def _names(network: nn.Module, params: Sequence[torch.Tensor]) -> list[str]:
    """The names of ``params`` in ``network``, in their order."""
    by_id = {id(p): name for name, p in network.named_parameters()}
    if any(id(p) not in by_id for p in params):
        raise ValueError("params must be parameters of the network")
    return [by_id[id(p)] for p in params]


class GradientMatching(Method):
    Options = GradientMatchingOptions

    @classmethod
    def check_config(cls, config) -> None:
        if config.model.norm == "batchnorm":
            raise ValueError(f"method {cls.name!r} matches per-class gradients and does not support model.norm=batchnorm; use instancenorm or none")

    @classmethod
    def preset(cls, name: str, dataset: str, ipc: int) -> dict[str, Any]:
        if name == "quick":
            return {"iterations": 20, "image_lr": 0.1, "real_per_class": 64, "dsa": cls.name == "dsa",
                    "options": GradientMatchingOptions(outer_loop=2, inner_loop=5)}
        if ipc not in UPSTREAM_LOOPS:
            raise ValueError(f"the upstream {cls.name} loops are defined for ipc in {sorted(UPSTREAM_LOOPS)}, got {ipc}; "
                             "use preset quick with --set options.outer_loop=... --set options.inner_loop=...")
        outer, inner = UPSTREAM_LOOPS[ipc]
        return {"iterations": 1000, "image_lr": 0.1, "image_momentum": 0.5, "real_per_class": 256, "dsa": cls.name == "dsa",
                "options": GradientMatchingOptions(outer_loop=outer, inner_loop=inner)}

    def step(self, iteration: int) -> dict[str, float]:
        ctx, config, options = self.ctx, self.ctx.config, self.options
        syn = ctx.synthetic
        network = ctx.fresh_model()
        totals: dict[str, float] = {}
        for outer in range(options.outer_loop):
            real, fake = [], []
            for c in range(ctx.data.info.num_classes):
                real_c, syn_c = ctx.sampler.sample(c, config.real_per_class), syn.of_class(c)
                if self.dsa is not None:
                    real_c, syn_c = self.dsa.match(real_c, syn_c)
                real.append(real_c)
                fake.append(syn_c)
            fast = self.fast(network)
            match = matching_loss(network, real, fake, fast=fast)
            reg, logs = self.regularize(iteration)
            loss = match + reg
            self.update_images(loss)
            for key, value in {"loss": loss.item(), "match": match.item(), **logs}.items():
                totals[key] = totals.get(key, 0.0) + value / options.outer_loop
            if outer < options.outer_loop - 1 and options.inner_loop:
                train_network(network, syn.images.detach(), syn.labels, epochs=options.inner_loop, lr=options.net_lr,
                              batch_size=options.train_batch, momentum=0.0, weight_decay=0.0, dsa=self.dsa, decay_at_half=False,
                              fast=fast)
        return totals


@register
class DC(GradientMatching):
    name = "dc"


@register
class DSAMethod(GradientMatching):
    name = "dsa"
