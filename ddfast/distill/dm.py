"""Distribution matching (DM, Zhao & Bilen 2023): match per-class mean embeddings of real and
synthetic images under a fresh, randomly initialised network each iteration.

loss = sum_c || mean(embed(real_c)) - mean(embed(syn_c)) ||^2, with DSA (the same parameters for
the real and the synthetic batch of a class), plus the regularisers when configured. Under
torchrun each process computes the classes c with c % WORLD_SIZE == RANK and the gradients are summed
(the regularisers split their own work: ``cmi_regularizer``, ``mim_regularizer``).

On CUDA, where the network treats samples independently (instance norm or none, not batch norm),
all classes' real batches go through it in a few large forward passes and all synthetic images in
one, with per-class means taken afterwards: the same loss and gradients as one pass per class and
side (to rounding), in a few kernel launches instead of many small ones. On the CPU the per-class
passes are faster (a class's feature maps stay in cache), so they stay the default there. Either way
the embeddings run under the run's ``speed`` settings (``training.speed``: compiled, channels-last on
the CPU; ``benchmarks/loops.py`` measures each path).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .method import Method, register
from .training.speed import FastNetwork

REAL_CHUNK = 256  # real images per no-grad forward pass (whole classes; bounds the activations' memory)


def mean_embedding_distance(real_features: torch.Tensor, syn_features: torch.Tensor) -> torch.Tensor:
    """||mean of real_features (N, F) - mean of syn_features (M, F)||^2, a scalar."""
    return (real_features.mean(0) - syn_features.mean(0)).pow(2).sum()


def samples_independent(network: nn.Module) -> bool:
    """True when no layer mixes samples of a batch (no batch norm), so batching classes changes nothing."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules())


def class_mean_distances(network: nn.Module, reals: list[torch.Tensor], syns: list[torch.Tensor], *, batched: bool | None = None,
                         fast: FastNetwork | None = None) -> torch.Tensor:
    """sum over classes c of ``mean_embedding_distance(embed(reals[c]), embed(syns[c]))``, a scalar.

    ``reals[c]`` (N_c, C, H, W) and ``syns[c]`` (M_c, C, H, W) are class c's batches; the real side runs
    without gradients. ``batched`` (default: on CUDA when ``samples_independent(network)``) runs the
    real batches in forward passes of whole classes up to ``REAL_CHUNK`` images and the synthetic ones
    in one; otherwise one pass per class and side, as the reference code does. ``fast`` runs the
    embeddings under a run's speed settings (layout, compilation, precision), ``network.embed`` without.
    """
    if batched is None:
        batched = syns[0].is_cuda and samples_independent(network)
    embed = network.embed if fast is None else (lambda x: fast.embed(network, x))
    if not batched:
        total = torch.zeros((), device=syns[0].device)
        for real, syn in zip(reals, syns):
            with torch.no_grad():
                real_features = embed(real)
            total = total + mean_embedding_distance(real_features, embed(syn))
        return total
    with torch.no_grad():
        real_means = torch.cat([_class_means(embed(torch.cat(group)), [len(r) for r in group]) for group in _chunks(reals)])
    syn_means = _class_means(embed(torch.cat(syns)), [len(s) for s in syns])
    return (real_means - syn_means).pow(2).sum()


def _class_means(features: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    return torch.stack([part.mean(0) for part in features.split(sizes)])


def _chunks(batches: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups, count = [[]], 0
    for batch in batches:
        if groups[-1] and count + len(batch) > REAL_CHUNK:
            groups.append([])
            count = 0
        groups[-1].append(batch)
        count += len(batch)
    return groups


@register
class DM(Method):
    name = "dm"
    distributed = True

    @classmethod
    def preset(cls, name: str, dataset: str, ipc: int) -> dict[str, Any]:
        if name == "upstream":
            return {"iterations": 20000, "image_lr": 1.0, "image_momentum": 0.5, "real_per_class": 256, "dsa": True}
        return {"iterations": 100, "image_lr": 1.0, "image_momentum": 0.5, "real_per_class": 64, "dsa": True}

    def step(self, iteration: int) -> dict[str, float]:
        ctx, config = self.ctx, self.ctx.config
        network = ctx.fresh_model().requires_grad_(False)
        images = ctx.synthetic.images
        own = set(ctx.world.classes(ctx.data.info.num_classes))
        reals, syns = [], []
        for c in range(ctx.data.info.num_classes):
            # every process draws every class's batch and transform, in class order, and keeps its own classes'
            index = ctx.sampler.draw(c, config.real_per_class)
            draw = self.dsa.match_draw(max(len(index), ctx.synthetic.ipc), *images.shape[2:]) if self.dsa is not None else None
            if c not in own:
                continue
            real, syn = ctx.sampler.images[index], ctx.synthetic.of_class(c)
            if draw is not None:
                real, syn = self.dsa.apply(real, draw), self.dsa.apply(syn, draw)
            reals.append(real)
            syns.append(syn)
        match = class_mean_distances(network, reals, syns, fast=self.fast(network))
        reg, logs = self.regularize(iteration)
        loss = match + reg
        self.update_images(loss)
        if ctx.world.distributed:  # the whole loss, for the log (each process has the regularisers' whole value)
            match = ctx.world.sum_(match.detach().clone(), "summing the loss")
            loss = match + reg
        return {"loss": loss.item(), "match": match.item(), **logs}
